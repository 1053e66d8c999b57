"""The key-delivery front ends bounded under abuse (issue 17): a real agent process (its
HTTPS server carrying ETSI 014, ETSI 004 and the QaaS APIs) against half-open and
trickling connections, too many connections, and hostile JSON."""
from __future__ import annotations

import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kmeproc import KmeAgent as Node, start_kme_agent as start_node

HEADER_TIMEOUT = 10.0  # the agents of this module: the default bound
SLACK = 5.0  # the TLS close (server's close_notify, up to min(5 s, bound) for the client's) and scheduling


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("abuse"), "alice", header_timeout=HEADER_TIMEOUT, max_connections=1000)
    yield n
    n.proc.stop()


def one_key_round(node: Node) -> None:
    """An ETSI 014 key for sae-b from sae-a, and sae-b getting it: the service works."""
    with node.client("sae-a") as a, node.client("sae-b") as b:
        r = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1})
        assert r.status_code == 200, r.text
        [key] = r.json()["keys"]
        r = b.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": key["key_ID"]})
        assert r.status_code == 200 and r.json()["keys"] == [key], r.text


# --- connections that ask nothing ---------------------------------------------------------

class Conns:
    """Client sockets, each with the time it was opened and (once the server let go) closed."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.opened: dict[socket.socket, float] = {}
        self.closed: dict[socket.socket, float] = {}

    def add(self, s: socket.socket) -> None:
        s.setblocking(False)
        self.opened[s] = time.monotonic()

    def open(self) -> list[socket.socket]:
        return [s for s in self.opened if s not in self.closed]

    def poll(self) -> None:
        ready, _, _ = select.select(self.open(), [], [], 0) if self.open() else ([], [], [])
        for s in ready:
            try:
                while s.recv(65536):
                    pass  # nothing is expected; read to the end
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except (OSError, ssl.SSLError):
                pass
            self.closed[s] = time.monotonic()  # recv() gave b"" (EOF, close_notify) or an error: closed

    def lifetimes(self) -> list[float]:
        return sorted(self.closed[s] - self.opened[s] for s in self.closed)

    def close_all(self) -> None:
        for s in self.opened:
            s.close()


def tcp_only(node: Node, n: int) -> Conns:
    c = Conns("TCP, no TLS")
    for _ in range(n):
        c.add(socket.create_connection(("127.0.0.1", node.port)))
    return c


def tls_only(node: Node, n: int) -> Conns:
    c = Conns("TLS, no request")
    ctx = node.tls()
    for _ in range(n):
        c.add(ctx.wrap_socket(socket.create_connection(("127.0.0.1", node.port)), server_hostname="127.0.0.1"))
    return c


HEAD = b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 200


def trickle(conns: Conns, stop: threading.Event) -> None:
    """One byte of a request head a second on each connection, until it is closed."""
    i = 0
    while not stop.wait(1.0):
        for s in conns.open():
            try:
                s.send(HEAD[i:i + 1])
            except (ssl.SSLWantWriteError, BlockingIOError):
                pass
            except OSError:
                pass  # closed: poll() sees it
        i += 1


def test_half_open_and_trickling_connections_are_closed_within_the_bound(node: Node) -> None:
    """200 TCP connections that never start TLS, 200 TLS connections that never send a byte,
    200 that trickle a request head a byte a second: each is closed within
    header_timeout (+ the TLS close); a normal ETSI 014 client is served meanwhile; the
    server spends no thread on them and gets all its descriptors back."""
    one_key_round(node)  # warm: the pools the first request starts are up before counting
    threads0, fds0 = node.threads(), node.fds()
    start = time.monotonic()
    kinds = [tcp_only(node, 200)]
    time.sleep(0.2)  # accepted: a descriptor each, and no thread
    tcp_held = {"threads": node.threads(), "fds": node.fds()}
    kinds += [tls_only(node, 200), tls_only(node, 200)]
    kinds[2].kind = "TLS, head trickled 1 byte/s"
    opened_in = time.monotonic() - start
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=(kinds[2], stop), daemon=True)
    trickler.start()
    try:
        time.sleep(0.3)
        for k in kinds:
            k.poll()
        held = sum(len(k.open()) for k in kinds)
        during = {"threads": node.threads(), "fds": node.fds()}
        t = time.monotonic()
        one_key_round(node)  # 600 connections held open: a real client is still served
        served_in = time.monotonic() - t
        deadline = time.monotonic() + HEADER_TIMEOUT + SLACK + 5
        while time.monotonic() < deadline and any(k.open() for k in kinds):
            for k in kinds:
                k.poll()
            time.sleep(0.05)
    finally:
        stop.set()
        trickler.join(5)
        for k in kinds:
            k.close_all()
    for k in kinds:
        life = k.lifetimes()
        print(f"{k.kind}: {len(life)}/200 closed by the server, after {life[0]:.2f} .. {life[-1]:.2f} s" if life else k.kind)
    print(f"opened 600 in {opened_in:.2f} s; with the 200 TCP ones: {tcp_held}; with all ({held} open): {during}; before: threads {threads0}, fds {fds0}; "
          f"a key round took {served_in:.2f} s meanwhile")
    for k in kinds:
        assert not k.open(), f"{k.kind}: {len(k.open())} connections still open"
        life = k.lifetimes()
        assert life[-1] <= opened_in + HEADER_TIMEOUT + SLACK, f"{k.kind}: the last one lived {life[-1]:.1f} s"
        assert life[0] >= HEADER_TIMEOUT - 0.5, f"{k.kind}: closed after {life[0]:.1f} s, before the bound"
    assert during["threads"] == threads0, "a thread per connection?"
    assert tcp_held["fds"] >= fds0 + 195 and tcp_held["threads"] == threads0
    assert held == 600 and during["fds"] >= fds0 + 590  # all held at once, a descriptor each
    t = time.monotonic()
    while node.fds() > fds0 + 2 and time.monotonic() - t < 5:
        time.sleep(0.1)
    after = {"threads": node.threads(), "fds": node.fds()}
    print(f"after: {after}")
    assert after["threads"] == threads0 and after["fds"] <= fds0 + 2
    one_key_round(node)
    assert "Traceback" not in node.proc.log()


def test_connections_past_the_limit_are_refused_at_once(tmp_path: Path) -> None:
    """max_connections open (here TCP only, the cheapest for a client): the next ones are
    closed on accept, before any TLS work; once those go, clients are served again."""
    node = start_node(tmp_path, "bob", header_timeout=30, max_connections=20)
    try:
        one_key_round(node)
        time.sleep(0.3)  # the server has seen the key round's clients go (their slots are free)
        threads0 = node.threads()
        held = tcp_only(node, 20)
        time.sleep(0.3)
        extra = tcp_only(node, 30)
        deadline = time.monotonic() + 3
        while extra.open() and time.monotonic() < deadline:
            extra.poll()
            time.sleep(0.02)
        held.poll()
        life = extra.lifetimes()
        print(f"30 over the limit: all closed within {life[-1]:.3f} s; threads {threads0} -> {node.threads()}")
        assert not extra.open() and life[-1] < 1.0
        assert len(held.open()) == 20 and node.threads() == threads0
        with pytest.raises(httpx.TransportError):
            with node.client(timeout=3) as c:
                c.get("/openapi.json")  # a real client is refused too while the slots are taken
        held.close_all()
        extra.close_all()
        time.sleep(0.3)
        one_key_round(node)
        log = node.proc.log()
        assert "refusing new ones" in log and "accepting connections again" in log
    finally:
        node.proc.stop()


# --- hostile JSON ------------------------------------------------------------------------

def _deep_arrays(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _deep_objects(n: int) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


HOSTILE = {
    "100,000 nested arrays": _deep_arrays(100_000),
    "100,000 nested objects": _deep_objects(100_000),
    "33 nested arrays": b'{"number": 1, "x": ' + _deep_arrays(32) + b"}",
    "a 5,000-digit integer": b'{"number": ' + b"7" * 5000 + b"}",
    "a 5,000-digit negative integer": b'{"number": -' + b"7" * 5000 + b"}",
    "a float with 5,000 digits": b'{"number": 0.' + b"3" * 5000 + b"}",
    "a float out of range": b'{"number": 1e999}',
    "NaN": b'{"number": NaN}',
    "-Infinity": b'{"number": -Infinity}',
}
TID = str(uuid.uuid4())
ENDPOINTS = [  # every route that takes a JSON body
    ("POST", "/api/v1/keys/sae-b/enc_keys"),
    ("POST", "/api/v1/keys/sae-b/dec_keys"),
    ("POST", "/api/open_connect"),
    ("POST", "/api/close"),
    ("POST", "/api/v1/ipsec"),
    ("PUT", f"/api/v1/ipsec/{TID}/peer"),
    ("POST", f"/api/v1/ipsec/{TID}/peer/ppk"),
]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_hostile_json_is_400_on_every_json_endpoint(node: Node, method: str, path: str) -> None:
    with node.client() as c:
        for what, body in HOSTILE.items():
            t = time.monotonic()
            r = c.request(method, path, content=body, headers={"Content-Type": "application/json"})
            took = time.monotonic() - t
            assert r.status_code == 400, (what, r.status_code, r.text[:200])
            assert set(r.json()) == {"message"} and "7777777" not in r.text, (what, r.text[:200])
            assert took < 1.0, (what, took)
    assert "Traceback" not in node.proc.log() and "internal error" not in node.proc.log()


def test_hostile_numbers_in_a_query_are_400(node: Node) -> None:
    with node.client() as c:
        for params in ({"number": "7" * 5000}, {"size": "8" * 5000}, {"number": "1", "size": "8" * 11}):
            r = c.get("/api/v1/keys/sae-b/enc_keys", params=params)
            assert r.status_code == 400 and set(r.json()) == {"message"}, r.text[:200]
        r = c.get("/api/get_key", params={"key_stream_id": str(uuid.uuid4()), "index": "9" * 5000})
        assert r.status_code == 400, r.text[:200]


def test_json_within_the_limits_still_works(node: Node) -> None:
    """Deep-ish (32 levels) and long strings full of brackets are fine; the limits only
    refuse what no client of these APIs sends."""
    ext = {"name": "x", "value": "[" * 10_000}
    nested: Any = 1
    for _ in range(29):
        nested = [nested]
    with node.client() as c:
        r = c.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1, "extension_optional": [ext], "pad": nested})
        assert r.status_code == 200, r.text
        r = c.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1.0})
        assert r.status_code == 400  # a float is no integer, as before


def test_a_body_trickled_byte_by_byte_is_answered_408(node: Node) -> None:
    ctx = node.tls()
    body = b'{"number": 1, "pad": "' + b"x" * 40 + b'"}'  # 1 byte each 0.5 s: 27 s, past the bound
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", node.port)), server_hostname="127.0.0.1") as s:
        s.sendall(b"POST /api/v1/keys/sae-b/enc_keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        s.settimeout(0.5)
        start = time.monotonic()
        answer = b""
        for i in range(len(body)):
            try:
                s.sendall(body[i:i + 1])
            except OSError:
                break
            try:
                answer += s.recv(65536)
                if answer:
                    break
            except (TimeoutError, socket.timeout):
                pass
            time.sleep(0.5)
        s.settimeout(HEADER_TIMEOUT + SLACK)
        while b"\r\n\r\n" not in answer:
            got = s.recv(65536)
            if not got:
                break
            answer += got
    took = time.monotonic() - start
    print(f"answered after {took:.2f} s: {answer[:60]!r}")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert took <= HEADER_TIMEOUT + SLACK


def test_the_bounds_are_in_the_kms_config_and_checked_at_load(node: Node) -> None:
    import json

    from sdqkd.agents import config as agent_config

    data = json.loads(node.proc.config_path.read_text())
    assert agent_config.parse(data).kms.header_timeout == HEADER_TIMEOUT
    del data["kms"]["header_timeout"], data["kms"]["max_connections"]
    kms = agent_config.parse(data).kms
    assert (kms.header_timeout, kms.max_connections) == (10.0, 512)  # the defaults
    data["kms"].update(header_timeout=0, max_connections=0)
    with pytest.raises(agent_config.ConfigError) as err:
        agent_config.parse(data)
    assert any("header_timeout" in p for p in err.value.problems)
    assert any("max_connections" in p for p in err.value.problems)
    data["kms"].update(header_timeout="10", max_connections=1.5)
    with pytest.raises(agent_config.ConfigError):
        agent_config.parse(data)
