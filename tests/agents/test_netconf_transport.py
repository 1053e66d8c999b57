"""The agent's NETCONF transport against hostile and unusual clients: dropped connections of
every kind, silent TCP connections, oversized messages, login guessing, and the real
clients that used to fail (scrapli-netconf, OpenSSH with a forced tty). Each test drives
a real agent process and counts what is left behind in it."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import paramiko
import pytest
from lxml import etree

from agentproc import PASSWORD, AgentProc, agent_config
from ncraw import HELLO_10, HELLO_11, Raw, reset

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    a = agent_config(tmp_path_factory.mktemp("transport"), netconf={
        "max_message_size": LIMIT, "hello_timeout": 3, "login_timeout": 3, "max_auth_tries": 3,
        "auth_failure_delay": 0.25}).start()
    yield a
    a.stop()


# --- requests --------------------------------------------------------------------------


def _rpc(body: str, mid: int = 1) -> bytes:
    return f'<rpc message-id="{mid}" xmlns="{NC}">{body}</rpc>'.encode()


def _chunk(message: bytes) -> bytes:
    return b"\n#%d\n" % len(message) + message + b"\n##\n"


# --- what the agent holds --------------------------------------------------------------


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sessions(agent: AgentProc) -> int:
    with agent.connect() as m:
        reply = m.get(filter=("subtree", '<netconf-state xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"><sessions/></netconf-state>'))
        return len(reply.data_ele.findall(".//{urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring}session")) - 1


def _settled(agent: AgentProc, threads: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = _threads(agent.proc.pid)
        if n <= threads:
            return n
        time.sleep(0.2)
    return _threads(agent.proc.pid)


# --- dropped connections ----------------------------------------------------------------


def _drop_holding_lock(agent: AgentProc) -> None:
    r = Raw(agent)
    r.ch.sendall(_rpc("<lock><target><running/></target></lock>") + b"]]>]]>")
    assert b"<ok/>" in r.read_eom()
    r.drop()


def _drop_mid_chunk(agent: AgentProc) -> None:
    r = Raw(agent, HELLO_11)
    r.ch.sendall(b"\n#4000\n" + _rpc("<lock><target><candidate/></target></lock>")[:30])
    time.sleep(0.01)
    r.drop()


def _drop_before_hello(agent: AgentProc) -> None:
    Raw(agent, hello=None).drop()


def _drop_mid_handshake(agent: AgentProc) -> None:
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    s.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    s.recv(256)  # the server's banner
    reset(s)


DROPS = {"1.0 session holding a lock": _drop_holding_lock, "1.1 session mid-chunk": _drop_mid_chunk,
         "channel before its hello": _drop_before_hello, "TCP mid SSH handshake": _drop_mid_handshake}


def test_abrupt_disconnects_leave_no_thread_cpu_lock_or_session(agent: AgentProc) -> None:
    pid = agent.proc.pid
    # Warm up: concurrent logins and requests grow the worker pools to their fixed size.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: _sessions(agent), range(12)))
    threads = _threads(pid)
    for name, drop in DROPS.items():
        # One at a time for the lock holders: each lock is granted only if the previous
        # dropped session's lock was released.
        with concurrent.futures.ThreadPoolExecutor(1 if drop is _drop_holding_lock else 4) as pool:
            list(pool.map(lambda _: drop(agent), range(50)))
    after = _settled(agent, threads)
    assert after <= threads, f"{after - threads} threads more than before {4 * 50} dropped connections"
    cpu = _cpu_seconds(pid)
    time.sleep(2.0)
    assert _cpu_seconds(pid) - cpu < 0.3, "the agent keeps burning CPU after the drops"
    assert _sessions(agent) == 0
    with agent.connect() as m:  # the dead sessions' locks are gone
        m.lock("running")
        m.lock("candidate")
        m.unlock("candidate")
        m.unlock("running")
    assert _threads(pid) <= threads


def test_a_silent_tcp_connection_holds_up_no_other_login_and_is_closed(agent: AgentProc) -> None:
    silent = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(5)]
    try:
        start = time.monotonic()
        with agent.connect() as m:
            m.get_config("running")
        assert time.monotonic() - start < 3.0
        for s in silent:  # the login grace time (3 s here) ends them
            s.settimeout(10)
            data = s.recv(256)
            assert data.startswith(b"SSH-2.0-")
            assert s.recv(256) == b""
    finally:
        for s in silent:
            s.close()


def test_no_hello_in_time_ends_the_session(agent: AgentProc) -> None:
    r = Raw(agent, hello=None)
    assert r.closed_by_server(timeout=10)
    r.t.close()


@pytest.mark.parametrize("framing", ["1.0", "1.1"])
def test_a_message_over_the_limit_gets_too_big_and_the_session_ends(agent: AgentProc, framing: str) -> None:
    r = Raw(agent, HELLO_11 if framing == "1.1" else HELLO_10)
    try:
        big = _rpc("<get-config><source><running/></source><filter>" + "x" * (2 * LIMIT) + "</filter></get-config>")
        try:  # the server answers and closes as soon as the limit is crossed, maybe mid-send
            r.ch.sendall(_chunk(big) if framing == "1.1" else big + b"]]>]]>")
        except OSError:
            pass
        reply = r.read_chunked() if framing == "1.1" else r.read_eom()
        err = etree.fromstring(reply)
        assert err.findtext(f".//{{{NC}}}error-tag") == "too-big"
        assert r.closed_by_server()
    finally:
        r.t.close()
    with agent.connect() as m:
        m.get_config("running")


def test_a_broken_chunk_header_ends_the_session_with_malformed_message(agent: AgentProc) -> None:
    r = Raw(agent, HELLO_11)
    try:
        r.ch.sendall(b"\n#01\nx\n##\n")
        err = etree.fromstring(r.read_chunked())
        assert err.findtext(f".//{{{NC}}}error-tag") == "malformed-message"
        assert r.closed_by_server()
    finally:
        r.t.close()


def test_requests_pipelined_in_one_write_are_all_answered_in_order(agent: AgentProc) -> None:
    r = Raw(agent, HELLO_11)
    try:
        r.ch.sendall(b"".join(_chunk(_rpc("<get-config><source><running/></source></get-config>", i)) for i in range(40)))
        ids = [etree.fromstring(r.read_chunked()).get("message-id") for _ in range(40)]
        assert ids == [str(i) for i in range(40)]
    finally:
        r.drop()


# --- login ------------------------------------------------------------------------------


def _try_password(agent: AgentProc, t: paramiko.Transport, user: str, password: str) -> float:
    start = time.monotonic()
    with pytest.raises(paramiko.AuthenticationException):
        t.auth_password(user, password)
    return time.monotonic() - start


class _Guesser(asyncssh.SSHClient):
    """Tries passwords one after another on one connection, as OpenSSH's password prompt
    does (paramiko cannot: it asks for the auth service again each time)."""

    def __init__(self, tries: int) -> None:
        self.tries = tries
        self.asked: list[float] = []

    def password_auth_requested(self) -> str | None:
        self.asked.append(time.monotonic())
        return f"wrong{len(self.asked)}" if len(self.asked) <= self.tries else None

    def kbdint_auth_requested(self) -> None:
        return None


def _guess(agent: AgentProc, source: str, tries: int) -> list[float]:
    """Seconds between successive password prompts on one connection from `source`."""
    guesser = _Guesser(tries)

    async def run() -> None:
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.ConnectionLost, asyncssh.DisconnectError)):
            await asyncssh.connect("127.0.0.1", agent.port, local_addr=(source, 0), username="admin", known_hosts=None,
                                   client_factory=lambda: guesser, client_keys=None, agent_path=None, config=[],
                                   preferred_auth="password")

    asyncio.run(run())
    return [b - a for a, b in zip(guesser.asked, guesser.asked[1:])]


def test_failed_passwords_back_off_per_address_and_the_connection_ends(agent: AgentProc) -> None:
    gaps = _guess(agent, "127.0.0.3", tries=10)
    # 0.25 s after the first failure, doubling; the connection ends after max_auth_tries (3)
    assert len(gaps) == 3, gaps
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5 and gaps[2] >= 1.0, gaps
    # The address keeps its back-off on a new connection; another address does not share it.
    assert _guess(agent, "127.0.0.3", tries=1)[0] >= 2.0
    assert _guess(agent, "127.0.0.4", tries=1)[0] < 1.0


def test_unknown_users_are_refused_as_slowly_as_known_ones(tmp_path: Path) -> None:
    a = agent_config(tmp_path, name="bob", netconf={"auth_failure_delay": 0}).start()
    try:
        known, unknown = [], []
        for i in range(9):
            for user, out in (("admin", known), (f"nobody{i}", unknown)):
                t = paramiko.Transport(socket.create_connection(("127.0.0.1", a.port)))
                t.start_client(timeout=10)
                out.append(_try_password(a, t, user, "guess"))
                t.close()
        known.sort()
        unknown.sort()
        ratio = unknown[4] / known[4]  # medians; the old server refused unknown users 3x faster
        assert 0.6 < ratio < 1.6, f"median refusal: known {known[4]:.3f} s, unknown {unknown[4]:.3f} s"
    finally:
        a.stop()


# --- real clients -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["system", "paramiko"])
def test_scrapli_netconf_connects_and_reads(agent: AgentProc, transport: str) -> None:
    """scrapli-netconf's hello starts with a newline before <?xml (the old server dropped the
    whole SSH connection); its default transport ("system") is OpenSSH's ssh in a pty, typing
    the password at its prompt."""
    from scrapli_netconf.driver import NetconfDriver

    conn = NetconfDriver(host="127.0.0.1", port=agent.port, auth_username="admin", auth_password=PASSWORD,
                         auth_strict_key=False, transport=transport, timeout_ops=20, timeout_socket=10,
                         timeout_transport=20)
    conn.open()
    try:
        reply = conn.get_config(source="running")
        assert not reply.failed, reply.result
        assert agent.qkdn_id in reply.result
    finally:
        conn.close()


def test_openssh_with_a_forced_tty(agent: AgentProc, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    a = agent_config(tmp_path, name="carol", authorized_keys=[(tmp_path / "id_ed25519.pub").read_text()]).start()
    try:
        requests = HELLO_10 + _rpc("<get-config><source><running/></source></get-config>") + b"]]>]]>" + \
            _rpc("<close-session/>", 2) + b"]]>]]>"
        out = subprocess.run(
            ["ssh", "-tt", "-i", str(key), "-p", str(a.port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-s", "admin@127.0.0.1", "netconf"],
            input=requests, capture_output=True, timeout=60)
        assert b"<rpc-reply" in out.stdout and a.qkdn_id.encode() in out.stdout, out.stderr
        assert b"<ok/>" in out.stdout  # close-session answered
    finally:
        a.stop()


def test_one_connection_cannot_open_sessions_without_bound(agent: AgentProc) -> None:
    t = paramiko.Transport(socket.create_connection(("127.0.0.1", agent.port)))
    t.connect(username="admin", password=PASSWORD)
    try:
        chans = []
        for _ in range(4):  # max_sessions_per_connection
            ch = t.open_session()
            ch.invoke_subsystem("netconf")
            chans.append(ch)
        with pytest.raises(paramiko.ChannelException):
            t.open_session()
        chans[0].close()  # a closed channel frees its place
        deadline = time.monotonic() + 5
        while True:
            try:
                t.open_session().invoke_subsystem("netconf")
                break
            except paramiko.ChannelException:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        t.close()
