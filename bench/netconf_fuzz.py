"""Hostile NETCONF input against a real agent: mutated requests (byte flips, truncation,
splices, deep nesting, entity bombs, huge names and attributes, out-of-range values),
broken framing of both kinds, oversized messages and abrupt disconnects mid-message.
Reports what the agent holds before and after: RSS, threads, open sessions, locks,
and that it still answers. The agent's RSS must come back to within 20% of its start.

    .venv/bin/python bench/netconf_fuzz.py [--count 5000] [--seed 1] [--limit-seconds 600]

Exit status 1 when memory, threads or sessions did not come back, or the agent died.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import paramiko

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agentproc import AgentProc, agent_config  # noqa: E402
from ncraw import HELLO_10, HELLO_11, Raw  # noqa: E402

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
MAX_MESSAGE = 1024 * 1024  # the fuzzed agent's limit: oversized inputs cross it cheaply

CORPUS = [
    "<get/>",
    "<get-config><source><running/></source></get-config>",
    f'<get-config><source><candidate/></source><filter type="subtree"><qkd_node xmlns="{ETSI}"><qkd_links/></qkd_node></filter></get-config>',
    "<lock><target><candidate/></target></lock>",
    "<unlock><target><candidate/></target></unlock>",
    f'<edit-config><target><running/></target><config><qkd_node xmlns="{ETSI}"><qkdn_location_id>fuzz</qkdn_location_id></qkd_node></config></edit-config>',
    f'<edit-config><target><candidate/></target><config><qkd_node xmlns="{ETSI}"><qkd_links><qkd_link>'
    "<qkdl_id>00000000-0000-0000-0000-00000000000{i}</qkdl_id><qkdl_type "
    'xmlns:t="urn:etsi:qkd:yang:etsi-qkd-node-types">t:VIRT</qkdl_type><virt_prev_hop>x</virt_prev_hop>'
    "</qkd_link></qkd_links></qkd_node></config></edit-config>",
    "<discard-changes/>",
    "<validate><source><candidate/></source></validate>",
    "<commit><confirmed/><confirm-timeout>99999999999</confirm-timeout></commit>",
    "<kill-session><session-id>999999</session-id></kill-session>",
    '<create-subscription xmlns="urn:ietf:params:xml:ns:netconf:notification:1.0"><startTime>2020-01-01T00:00:00Z</startTime></create-subscription>',
    '<get-schema xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"><identifier>etsi-qkd-sdn-node</identifier></get-schema>',
]


def _rpc(body: str, mid: int) -> bytes:
    return f'<rpc message-id="{mid}" xmlns="{NC}">{body}</rpc>'.encode()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            del data[pos:pos + rng.randint(1, 40)]
        elif kind == 2:
            data[pos:pos] = rng.choice([b"<", b">", b"&", b"]]>]]>", b"\n#9\n", b"\x00", b"\xff\xfe", b"<!--", b"<![CDATA["])
        elif kind == 3 and data:
            a = rng.randrange(len(data))
            data[pos:pos] = data[a:a + rng.randint(1, 200)]
        elif kind == 4:
            data = data[:pos]
        else:
            data[pos:pos] = b"\xf0\x9f\x94\x91" * rng.randint(1, 4)
    return bytes(data)


def _hostile(rng: random.Random, mid: int) -> bytes:
    """A request a hostile or broken client could send (not framed)."""
    kind = rng.randrange(10)
    if kind < 5:
        body = rng.choice(CORPUS).replace("{i}", str(rng.randrange(10)))
        return _mutate(rng, _rpc(body, mid))
    if kind == 5:
        depth = rng.choice([100, 300, 5000])
        return _rpc("<get>" + "<a>" * depth + "</a>" * depth + "</get>", mid)
    if kind == 6:
        ent = '<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        return (ent + f'<rpc message-id="{mid}" xmlns="{NC}"><get-config><source><running/></source>'
                f'<filter><qkd_node xmlns="{ETSI}"><qkdn_location_id>&c;</qkdn_location_id></qkd_node></filter></get-config></rpc>').encode()
    if kind == 7:
        name = "x" * rng.choice([1000, 60000])
        return _rpc(f'<get-config><source><running/></source><filter><{name} xmlns="urn:x" {name[:500]}="1"/></filter></get-config>', mid)
    if kind == 8:
        value = rng.choice(["3.0001", "99999999999999999999999.5", "-1", "NaN", "1e400", "", "\u202e" * 50])
        return _rpc(f'<edit-config><target><running/></target><config><qkd_node xmlns="{ETSI}"><qkd_links><qkd_link>'
                    f"<qkdl_id>00000000-0000-0000-0000-000000000001</qkdl_id><qkdl_performance><expected_consumption>{value}"
                    "</expected_consumption></qkdl_performance></qkd_link></qkd_links></qkd_node></config></edit-config>", mid)
    return rng.randbytes(rng.randint(1, 2000))


def reply(session: Raw) -> bool:
    """Read one reply; False when the server ended the session."""
    try:
        session.read()
    except EOFError:
        return False
    return True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fuzz(agent: AgentProc, count: int, seed: int, limit_seconds: float) -> Counter:
    rng = random.Random(seed)
    outcome: Counter = Counter()
    session: Raw | None = None
    deadline = time.monotonic() + limit_seconds
    for i in range(count):
        if time.monotonic() > deadline:
            outcome["stopped at the time limit"] += 1
            break
        if session is None:
            session = Raw(agent, HELLO_11 if rng.random() < 0.5 else HELLO_10)
        roll = rng.random()
        try:
            if roll < 0.03:  # an abrupt disconnect mid-message
                session.ch.sendall(b"\n#5000\n<rpc " if session.chunked else b"<rpc message-id='1'")
                session.drop()
                session = None
                outcome["dropped mid-message"] += 1
                continue
            if roll < 0.05 and session.chunked:  # broken chunk framing: an error, then the session ends
                session.ch.sendall(rng.choice([b"\n#0\n", b"\n#99999999999\n", b"\n##\n", b"\n#12x\n", b"garbage\n"]))
                reply(session)
                outcome["broken framing"] += 1
            elif roll < 0.07:  # over the size limit
                session.send(_rpc("<get>" + "z" * (MAX_MESSAGE + 10) + "</get>", i))
                reply(session)
                outcome["oversized"] += 1
            else:
                session.send(_hostile(rng, i))
                outcome["hostile request"] += 1
                if not reply(session):
                    raise EOFError
                continue
        except (EOFError, OSError, paramiko.SSHException):
            outcome["sessions ended by the server"] += 1
            session.drop()
            session = None
            continue
        session.drop()  # after framing trouble or an oversized message the session is over
        session = None
    if session is not None:
        session.drop()
    return outcome


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def big_messages(sizes_mb: tuple[int, ...] = (1, 8, 30)) -> list[tuple[int, str, float]]:
    """Agent CPU to take one large request (a get-config whose filter holds N MB of text)
    under the default 32 MiB limit, in each framing: linear buffering keeps CPU per MB flat
    (the old server's quadratic buffering cost 50 s for 32 MB)."""
    agent = agent_config(Path(tempfile.mkdtemp(prefix="sdqkd-big-"))).start()
    out = []
    try:
        for chunked in (False, True):
            session = Raw(agent, HELLO_11 if chunked else HELLO_10)
            for mb in sizes_mb:
                text = "a" * (mb * 1024 * 1024 - 400)
                msg = _rpc(f'<get-config><source><running/></source><filter type="subtree"><qkd_node xmlns="{ETSI}">'
                           f"<qkdn_location_id>{text}</qkdn_location_id></qkd_node></filter></get-config>", mb)
                cpu = cpu_seconds(agent.proc.pid)
                session.send(msg)
                if not reply(session):
                    raise RuntimeError("the agent ended the session")
                out.append((mb, "1.1 chunked" if chunked else "1.0 end-of-message", cpu_seconds(agent.proc.pid) - cpu))
            session.drop()
    finally:
        agent.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit-seconds", type=float, default=600.0)
    args = ap.parse_args()
    agent = agent_config(Path(tempfile.mkdtemp(prefix="sdqkd-fuzz-")), netconf={"max_message_size": MAX_MESSAGE}).start()
    ok = True
    try:
        with agent.connect() as m:
            m.get_config("running")
        time.sleep(1.0)
        rss0, threads0 = rss_kib(agent.proc.pid), threads(agent.proc.pid)
        start = time.monotonic()
        outcome = fuzz(agent, args.count, args.seed, args.limit_seconds)
        elapsed = time.monotonic() - start
        time.sleep(3.0)
        rss1, threads1 = rss_kib(agent.proc.pid), threads(agent.proc.pid)
        with agent.connect() as m:
            m.lock("running")
            m.unlock("running")
            state = m.get(filter=("subtree", '<netconf-state xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"><sessions/></netconf-state>'))
            sessions = len(state.data_ele.findall(".//{urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring}session"))
        print(f"{sum(outcome.values())} inputs in {elapsed:.1f} s ({sum(outcome.values()) / elapsed:.0f}/s), seed {args.seed}")
        for k, v in sorted(outcome.items()):
            print(f"  {k:32} {v}")
        ratio = rss1 / rss0
        print(f"agent RSS {rss0 / 1024:.1f} MiB -> {rss1 / 1024:.1f} MiB (x{ratio:.2f}; must be <= x1.20)")
        print(f"agent threads {threads0} -> {threads1}; sessions open after: {sessions - 1} (this one not counted)")
        ok = ratio <= 1.20 and threads1 <= threads0 and sessions == 1 and agent.proc.poll() is None
    finally:
        agent.stop()
    print("one large request (agent CPU; linear buffering keeps s/MB flat):")
    for mb, framing, cpu in big_messages():
        print(f"  {mb:3d} MB {framing:20} {cpu:6.2f} s  ({cpu / mb:.3f} s/MB)")
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
