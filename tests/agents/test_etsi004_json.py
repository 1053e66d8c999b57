"""ETSI GS QKD 004 in the MadQCI JSON command form (agents/kms/etsi004_json.py), driven with
the exact bytes UPM's hybridization module sends its QKD node, against two real agent
processes planned by the lab (alice with SAE Application1, bob with Application4, one
emulated QKD link provisioned over NETCONF), over real TLS sockets; and plain TCP on
loopback from a third agent that enables it."""
from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentproc import AgentProc, agent_config
from sdqkd import pki
from sdqkd.agents import config as agent_cfg
from sdqkd.configfile import ConfigError
from sdqkd.lab import plan as lab_plan
from test_e2e_relay import PROFILE, app, config, phys, wait_active
from testlib import wait_for

# --- What the hybridization module sends -------------------------------------------------------
# QUBIP/hybridization-module @ 53d2b19036b1602d703ced114836c145ebcb6ec1,
# src/hybridization_module/key_generation/sources/qkd_source.py (QKDSource): a new plain TCP
# connection per request (socket.socket(AF_INET, SOCK_STREAM).connect(qkd_address), no TLS),
# `sendall(json.dumps(request).encode("utf8"))` with no newline and no length, then ONE
# `recv(65057)` parsed with json.loads, then close. It reads `status` (absent: -1; any non-zero
# raises, model/exceptions.py check_status), `key_stream_id` (OPEN_CONNECT) and `key_buffer`
# (GET_KEY, decoded by utils/key_formatting.py key_to_bytes: base64.b64decode first).
# Source and destination are fixed SAE names at the uuids of the hybrid URIs (the node ids):
# f"qkd://Application1@{source_uuid}", f"qkd://Application4@{destination_uuid}"; both modules
# send the same pair, with no key_stream_id field (OpenConnectRequest has source, destination,
# qos only). The qos is the hybrid request's, e.g. tests/requests/open_connect_request.json.
# The bytes below are json.dumps of OpenConnectRequest.model_dump() (pydantic 2), checked.
OPEN_CONNECT = ('{"command": "OPEN_CONNECT", "data": {"source": "qkd://Application1@<SRC>", '
                '"destination": "qkd://Application4@<DST>", "qos": {"key_chunk_size": 32, "max_bps": 32, '
                '"min_bps": 32, "jitter": 0, "priority": 0, "timeout": 0, "ttl": 0, '
                '"metadata_mimetype": "application/json"}}}')
# QKDSource.get_key: index is always 0, metadata a fixed object.
GET_KEY = ('{"command": "GET_KEY", "data": {"key_stream_id": "<KSID>", "index": 0, "metadata": '
           '{"size": 46, "buffer": "The metadata field is not used for the moment."}}}')
# QKDSource.close (its .replace("\'", \'"\') changes nothing in json.dumps output).
CLOSE = '{"command": "CLOSE", "data": {"key_stream_id": "<KSID>"}}'
RECV = 65057  # the module's one recv

SRC_SAE, DST_SAE = "Application1", "Application4"
LINK, APP = "aaaaaaaa-0000-4000-8000-0000000000e1", "cccccccc-0000-4000-8000-0000000000e1"
TOPOLOGY = {"sdqkd-lab:lab": {
    "name": "json004",
    "profile": [PROFILE],
    "node": [{"name": "alice", "qkd-interface": [{"id": 1, "profile": "dv"}], "sae": [{"id": SRC_SAE}]},
             {"name": "bob", "qkd-interface": [{"id": 1, "profile": "dv"}], "sae": [{"id": DST_SAE}]}],
    "fibre": [{"name": "ab", "a-end": {"node": "alice"}, "b-end": {"node": "bob"}, "length": "10.0", "loss": "4.0"}],
    "link": [{"name": "l1", "endpoints": ["alice:1", "bob:1"], "path": ["ab"]}],
}}
# alice's JSON form gets small bounds so the limit tests are quick
LIMITS = {"read_timeout": 2.0, "handshake_timeout": 2.0, "max_request": 4096, "max_connections": 6}


@dataclass
class Lab:
    plan: lab_plan.LabPlan
    procs: dict[str, AgentProc]

    def node(self, name: str) -> lab_plan.NodePlan:
        return self.plan.nodes[name]

    def tls(self, sae: str, node: str) -> ssl.SSLSocket:
        """A connected mutual-TLS socket of `sae` to `node`'s JSON form."""
        owner = next(n for n in self.plan.nodes.values() if sae in n.saes)
        ctx = pki.client_ssl_context(*owner.sae_certs[sae], self.plan.ca[0])
        raw = socket.create_connection(("127.0.0.1", self.node(node).etsi004_json_port), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    def ask(self, sae: str, node: str, request: str | bytes) -> dict[str, Any]:
        """The module's client: one connection, sendall, one recv(65057), json.loads, close."""
        with self.tls(sae, node) as s:
            s.sendall(request.encode("utf8") if isinstance(request, str) else request)
            return json.loads(s.recv(RECV).decode("utf8"))

    def open_request(self) -> str:
        return OPEN_CONNECT.replace("<SRC>", self.node("alice").qkdn_id).replace("<DST>", self.node("bob").qkdn_id)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    plan = lab_plan.make(TOPOLOGY, tmp_path_factory.mktemp("json004"), free_ports=True)
    cfg_path = plan.nodes["alice"].config_path
    assert cfg_path is not None
    cfg = json.loads(cfg_path.read_text())
    assert cfg["kms"]["etsi004_json"] == {"port": plan.nodes["alice"].etsi004_json_port}  # the lab enables it
    cfg["kms"]["etsi004_json"].update(LIMITS)
    cfg_path.write_text(json.dumps(cfg))
    procs = {n: AgentProc(n, np.qkdn_id, np.netconf_port, np.config_path, np.dir).start() for n, np in plan.nodes.items()}
    m = {n: procs[n].connect(password=plan.password) for n in procs}
    try:
        a, b = plan.nodes["alice"], plan.nodes["bob"]
        m["alice"].edit_config(target="running", config=config(
            phys(LINK, a.qkdn_id, 1, b.qkdn_id, 1, "TRANSMITTER"), app(APP, SRC_SAE, DST_SAE, LINK, a.qkdn_id, b.qkdn_id)))
        m["bob"].edit_config(target="running", config=config(
            phys(LINK, b.qkdn_id, 1, a.qkdn_id, 1, "RECEIVER"), app(APP, SRC_SAE, DST_SAE, LINK, b.qkdn_id, a.qkdn_id)))
        for n in procs:
            wait_active(m[n], LINK)
    finally:
        for x in m.values():
            x.close_session()
    time.sleep(1.0)  # some link key
    yield Lab(plan, procs)
    for p in procs.values():
        p.stop()


def opened(lab: Lab) -> str:
    """A stream opened at both ends the ETSI way (the destination names the source's KSID)."""
    first = lab.ask(SRC_SAE, "alice", lab.open_request())
    assert first["status"] == 1, first  # open; the peer application not yet
    ksid = first["key_stream_id"]
    joined = json.loads(lab.open_request())
    joined["data"]["key_stream_id"] = ksid
    second = lab.ask(DST_SAE, "bob", json.dumps(joined))
    assert second["status"] == 0 and second["key_stream_id"] == ksid, second
    return ksid


def first_key(lab: Lab, ksid: str) -> bytes:
    """The module's GET_KEY (index 0) at alice, retried while the link has too little key."""
    def get() -> dict[str, Any] | None:
        got = lab.ask(SRC_SAE, "alice", GET_KEY.replace("<KSID>", ksid))
        return got if got["status"] == 0 else None
    got = wait_for(get, 20, "a key chunk at alice")
    return base64.b64decode(got["key_buffer"])  # as key_to_bytes decodes it


def test_open_get_key_close_with_the_modules_bytes(lab: Lab) -> None:
    ksid = opened(lab)
    key = first_key(lab, ksid)
    at_bob = lab.ask(DST_SAE, "bob", GET_KEY.replace("<KSID>", ksid))
    assert at_bob["status"] == 0 and at_bob["index"] == 0, at_bob
    assert set(at_bob) == {"status", "index", "key_buffer", "metadata"}
    assert len(key) == 32 and base64.b64decode(at_bob["key_buffer"], validate=True) == key
    assert lab.ask(SRC_SAE, "alice", CLOSE.replace("<KSID>", ksid)) == {"status": 0}
    assert lab.ask(DST_SAE, "bob", CLOSE.replace("<KSID>", ksid)) == {"status": 0}
    gone = lab.ask(SRC_SAE, "alice", GET_KEY.replace("<KSID>", ksid))
    assert gone["status"] != 0 and gone["message"]
    for p in lab.procs.values():  # no key byte in any log
        text = p.log()
        assert ksid in text
        for form in (base64.b64encode(key).decode(), key.hex(), key.hex().upper()):
            assert form not in text


def test_both_modules_open_with_a_null_ksid_and_get_the_same_stream(lab: Lab) -> None:
    """The module's pairing: both ends send the same OPEN_CONNECT, with no key_stream_id,
    each to its own node, and must get the same stream and the same keys."""
    at_alice = lab.ask(SRC_SAE, "alice", lab.open_request())
    at_bob = lab.ask(DST_SAE, "bob", lab.open_request())
    assert at_alice["key_stream_id"] == at_bob["key_stream_id"]
    ksid = at_alice["key_stream_id"]
    key = first_key(lab, ksid)
    assert base64.b64decode(lab.ask(DST_SAE, "bob", GET_KEY.replace("<KSID>", ksid))["key_buffer"]) == key


def test_several_requests_on_one_connection_and_split_across_segments(lab: Lab) -> None:
    """Other clients of the form (the module's own test drivers, tests/bulk_driver.py) keep
    the connection for OPEN_CONNECT, GET_KEY, CLOSE; TCP may cut a request anywhere."""
    with lab.tls(SRC_SAE, "alice") as s:
        s.sendall(lab.open_request().encode())
        first = json.loads(s.recv(RECV))
        assert first["status"] == 1
        close = CLOSE.replace("<KSID>", first["key_stream_id"]).encode()
        for piece in (close[:7], close[7:30], close[30:]):
            s.sendall(piece)
            time.sleep(0.05)
        assert json.loads(s.recv(RECV)) == {"status": 0}


def test_requests_sent_in_one_write_get_one_answer_each_in_order(lab: Lab) -> None:
    """Braces and backslashes inside strings do not end a request early."""
    tricky = '{"command": "CLOSE", "data": {"key_stream_id": "}{\\\\", "note": "\\"}"}}'
    unknown = CLOSE.replace("<KSID>", KSID)
    with lab.tls(SRC_SAE, "alice") as s:
        s.sendall(f"{tricky}\n{unknown} {tricky}".encode())
        got, text = [], ""
        while len(got) < 3:
            text += s.recv(RECV).decode()
            while text:
                try:
                    obj, end = json.JSONDecoder().raw_decode(text)
                except ValueError:
                    break
                got.append(obj)
                text = text[end:]
    assert [g["status"] for g in got] == [400, 4, 400]  # the middle one: no such stream (ETSI 004 status 4)
    assert ["UUID" in g["message"] for g in got] == [True, False, True]


def test_unknown_streams_answer_status_4(lab: Lab) -> None:
    get = '{"command": "GET_KEY", "data": {"key_stream_id": "' + KSID + '", "index": 0}}'
    assert lab.ask(SRC_SAE, "alice", get)["status"] == 4
    assert lab.ask(SRC_SAE, "alice", CLOSE.replace("<KSID>", KSID))["status"] == 4


def test_field_and_command_names_in_any_case(lab: Lab) -> None:
    request = {"Command": "open_connect", "Data": {"Source": f"qkd://{SRC_SAE}@alice", "Destination": DST_SAE,
                                                   "QoS": {"Key_chunk_size": 32, "Timeout": 0, "TTL": 60}, "vendor": 1}}
    got = lab.ask(SRC_SAE, "alice", json.dumps(request))
    assert got["status"] == 1 and got["qos"]["key_chunk_size"] == 32 and got["qos"]["ttl"] == 60
    assert lab.ask(SRC_SAE, "alice", CLOSE.replace("<KSID>", got["key_stream_id"])) == {"status": 0}


KSID = str(uuid.uuid4())
SRC, DST = "qkd://Application1@<SRC>", "qkd://Application4@<DST>"


@pytest.mark.parametrize("request_", [
    '{"command": "SEND_KEY", "data": {}}',
    '{"data": {"key_stream_id": "' + KSID + '"}}',
    '{"command": "OPEN_CONNECT", "data": [1]}',
    '{"command": "OPEN_CONNECT", "data": {"destination": "' + DST + '"}}',
    '{"command": "OPEN_CONNECT", "data": {"source": "' + SRC + '", "destination": 7}}',
    '{"command": "OPEN_CONNECT", "data": {"source": "' + SRC + '", "destination": "' + DST + '", "qos": {"key_chunk_size": "32"}}}',
    '{"command": "OPEN_CONNECT", "data": {"source": "' + SRC + '", "destination": "' + DST + '", "qos": {"timeout": -1}}}',
    '{"command": "OPEN_CONNECT", "data": {"source": "' + SRC + '", "destination": "' + DST + '", "key_stream_id": "stream-1"}}',
    '{"command": "OPEN_CONNECT", "data": {"source": "http://Application1@x", "destination": "' + DST + '"}}',
    '{"command": "OPEN_CONNECT", "data": {"source": "qkd://Application1@bob", "destination": "' + DST + '"}}',
    '{"command": "GET_KEY", "data": {}}',
    '{"command": "GET_KEY", "data": {"key_stream_id": "00000000-0000-0000-0000-000000000000"}}',
    '{"command": "GET_KEY", "data": {"key_stream_id": "' + KSID + '", "index": -1}}',
    '{"command": "GET_KEY", "data": {"key_stream_id": "' + KSID + '", "metadata": {"size": "big"}}}',
    '{"command": "CLOSE", "data": {"key_stream_id": 5}}',
    '{"command": "CLOSE", "data": {"key_stream_id": "\\u00e9\\"}"}}',  # escapes inside strings
    '{"command": "OPEN_CONNECT", "data": {"source": "\xff"}}',  # not UTF-8 once encoded as latin-1
    '[{"command": "CLOSE"}]',
])
def test_a_malformed_request_gets_status_400_and_a_message(lab: Lab, request_: str) -> None:
    raw = request_.replace("<SRC>", lab.node("alice").qkdn_id).replace("<DST>", lab.node("bob").qkdn_id)
    with lab.tls(SRC_SAE, "alice") as s:
        s.sendall(raw.encode("latin-1"))
        got = json.loads(s.recv(RECV))
    assert got["status"] == 400 and isinstance(got["message"], str) and got["message"], got
    assert set(got) == {"status", "message"}


def test_not_json_is_answered_then_the_connection_closes(lab: Lab) -> None:
    with lab.tls(SRC_SAE, "alice") as s:
        s.sendall(b"hello\n")
        got = json.loads(s.recv(RECV))
        assert got["status"] == 400 and "not a JSON object" in got["message"]
        assert s.recv(RECV) == b""


def test_an_oversized_request_is_refused(lab: Lab) -> None:
    big = b'{"command": "OPEN_CONNECT", "data": {"source": "' + b"a" * (LIMITS["max_request"] + 5000)
    with lab.tls(SRC_SAE, "alice") as s:
        s.sendall(big)
        got = json.loads(s.recv(RECV))
        assert got["status"] == 400 and "longer than 4096 bytes" in got["message"]
        assert s.recv(RECV) == b""


def closed_after(s: socket.socket, limit: float) -> float:
    """Seconds until the server closes `s` (recv gives b"" or the connection resets)."""
    start = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(RECV):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - start


def test_a_silent_or_trickling_client_is_closed_at_the_read_timeout(lab: Lab) -> None:
    timeout = LIMITS["read_timeout"]
    with lab.tls(SRC_SAE, "alice") as s:
        assert timeout - 0.5 < closed_after(s, timeout + 5) < timeout + 2
    with lab.tls(SRC_SAE, "alice") as s:  # slowloris: a byte now and then never completes a request
        start = time.monotonic()
        with pytest.raises(OSError):
            for c in lab.open_request().encode():
                s.sendall(bytes([c]))
                time.sleep(0.3)
                assert time.monotonic() - start < timeout + 3
    with socket.create_connection(("127.0.0.1", lab.node("alice").etsi004_json_port)) as raw:  # no TLS handshake
        assert LIMITS["handshake_timeout"] - 0.5 < closed_after(raw, 10) < LIMITS["handshake_timeout"] + 3


def threads(proc: AgentProc) -> int:
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def test_an_abrupt_close_mid_request_leaves_no_thread_behind(lab: Lab) -> None:
    alice = lab.procs["alice"]
    for _ in range(3):  # the pool's threads exist once it has served
        lab.ask(SRC_SAE, "alice", '{"command": "CLOSE", "data": {"key_stream_id": "' + KSID + '"}}')
    before = threads(alice)
    for _ in range(20):
        s = lab.tls(SRC_SAE, "alice")
        s.sendall(lab.open_request().encode()[:50])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.close()
    time.sleep(0.5)
    assert threads(alice) == before
    assert lab.ask(SRC_SAE, "alice", CLOSE.replace("<KSID>", KSID))["status"] == 4  # still serving: no such stream


def test_beyond_max_connections_a_connection_is_closed_at_once(lab: Lab) -> None:
    held = [lab.tls(SRC_SAE, "alice") for _ in range(LIMITS["max_connections"])]
    try:
        start = time.monotonic()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            lab.tls(SRC_SAE, "alice").recv(1)
        assert time.monotonic() - start < 1.0
    finally:
        for s in held:
            s.close()

    def served() -> bool:  # once the server has seen the held ones go
        try:
            return lab.ask(SRC_SAE, "alice", CLOSE.replace("<KSID>", KSID))["status"] == 4
        except (ssl.SSLError, ConnectionError):
            return False
    wait_for(served, 5, "served again")


def test_a_client_without_a_certificate_of_the_lab_ca_is_refused(lab: Lab, tmp_path: Path) -> None:
    rogue = pki.issue(pki.make_ca(tmp_path / "ca", "other"), SRC_SAE, tmp_path, client=True)
    bare = ssl.create_default_context(cafile=str(lab.plan.ca[0]))  # no client certificate at all
    for ctx in (pki.client_ssl_context(*rogue, lab.plan.ca[0]), bare):
        raw = socket.create_connection(("127.0.0.1", lab.node("alice").etsi004_json_port), timeout=5)
        try:  # TLS 1.3: the client may finish its handshake before the server refuses
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(lab.open_request().encode())
                assert s.recv(RECV) == b""
        except (ssl.SSLError, ConnectionError):
            pass


def test_after_all_that_the_logs_hold_no_traceback_and_no_request_body(lab: Lab) -> None:
    """Runs after the tests above (file order): malformed, oversized, abrupt and refused
    connections are one line each in the log, never a traceback or what the client sent."""
    for p in lab.procs.values():
        text = p.log()
        assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
        assert "The metadata field is not used" not in text and "SEND_KEY" not in text


# --- plain TCP ---------------------------------------------------------------------------------

def kms_section(tmp: Path, qkdn_id: str, address: str, plain: bool) -> dict[str, Any]:
    cas = pki.make_lab_cas(tmp / "ca", "lab")
    kme = pki.issue(cas.kme, qkdn_id, tmp / "kme", server_names=["127.0.0.1"], client=True, kme=True)
    from agentproc import free_port
    return {"kms": {"port": free_port(), "relay_port": free_port(), "sae_ca": str(cas.sae[0]),
                    "kme_ca": str(cas.kme[0]), "cert": str(kme[0]),
                    "key": str(kme[1]), "saes": {SRC_SAE: qkdn_id, DST_SAE: qkdn_id},
                    "etsi004_json": {"port": free_port(), "address": address, "plain": plain}}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    tmp = tmp_path_factory.mktemp("plain")
    qkdn_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-test/plain004"))
    a = agent_config(tmp, "carol", qkdn_id, extra=kms_section(tmp, qkdn_id, "127.0.0.1", True)).start()
    yield a
    a.stop()


def plain_ask(agent: AgentProc, request: str) -> dict[str, Any]:
    port = json.loads(agent.config_path.read_text())["kms"]["etsi004_json"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # exactly as the module connects
        s.sendall(request.encode("utf8"))
        return json.loads(s.recv(RECV).decode("utf8"))


def test_plain_tcp_on_loopback_when_enabled(plain: AgentProc) -> None:
    got = plain_ask(plain, '{"command": "SEND_KEY", "data": {}}')
    assert got["status"] == 400 and got["message"]


def test_half_a_request_then_the_client_closes_its_side(plain: AgentProc) -> None:
    port = json.loads(plain.config_path.read_text())["kms"]["etsi004_json"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b'{"command": "OPEN_CONNECT", "data": {"source": "x"')
        s.shutdown(socket.SHUT_WR)
        got = json.loads(s.recv(RECV))
        assert got["status"] == 400 and "before the request was complete" in got["message"]
        assert s.recv(RECV) == b""


def test_plain_tcp_caller_is_the_party_at_this_node(plain: AgentProc) -> None:
    got = plain_ask(plain, OPEN_CONNECT.replace("<SRC>", plain.qkdn_id).replace("<DST>", plain.qkdn_id))
    assert got["status"] in (0, 1) and got["key_stream_id"]


def test_plain_tcp_on_a_non_loopback_address_is_refused(tmp_path: Path) -> None:
    qkdn_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-test/plain004-open"))
    proc = agent_config(tmp_path, "dave", qkdn_id, extra=kms_section(tmp_path, qkdn_id, "0.0.0.0", True))
    data = json.loads(proc.config_path.read_text())
    with pytest.raises(ConfigError, match="plain TCP only on a loopback address"):
        agent_cfg.parse(data)
    with pytest.raises(RuntimeError, match="plain TCP only on a loopback address"):
        proc.start(timeout=20)
    data["kms"]["etsi004_json"]["plain"] = False  # TLS on any address is fine
    agent_cfg.parse(data)


def test_the_config_section_is_checked_at_load_with_every_problem_at_once(tmp_path: Path) -> None:
    qkdn_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-test/json004-config"))
    data = json.loads(agent_config(tmp_path, "erin", qkdn_id,
                                   extra=kms_section(tmp_path, qkdn_id, "127.0.0.1", False)).config_path.read_text())
    data["kms"]["etsi004_json"].update(port=70000, read_timeout=0, max_request=10, max_connections=0, tls=True)
    with pytest.raises(ConfigError) as err:
        agent_cfg.parse(data)
    assert "etsi004_json.tls: unknown key" in str(err.value)  # the shape first, then the values
    del data["kms"]["etsi004_json"]["tls"]
    with pytest.raises(ConfigError) as err:
        agent_cfg.parse(data)
    text = str(err.value)
    for part in ("etsi004_json.port: out of range", "read_timeout and handshake_timeout", "max_request: from 256",
                 "max_connections from 1"):
        assert part in text
    data["kms"]["etsi004_json"] = {"port": data["kms"]["relay_port"]}
    with pytest.raises(ConfigError, match="is already the kms HTTPS or relay port"):
        agent_cfg.parse(data)
    del data["kms"]["etsi004_json"]
    assert agent_cfg.parse(data).kms.etsi004_json is None  # off unless configured
