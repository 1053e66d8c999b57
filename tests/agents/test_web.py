"""The key-delivery HTTP layer (agents/kms/web.py on h11) over real TLS sockets: what a
client that misbehaves at the HTTP level gets, and that it cannot hold a connection."""
from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sdqkd import pki
from sdqkd.agents.kms import https, web


class Srv:
    def __init__(self, server: https.HttpsServer, ctx: ssl.SSLContext, httpx_ctx: ssl.SSLContext) -> None:
        self.server, self.ctx, self.httpx_ctx = server, ctx, httpx_ctx

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def tls(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
        return self.ctx.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Srv]:
    d = tmp_path_factory.mktemp("web")
    ca = pki.make_ca(d / "ca", "lab-ca")
    server_cert = pki.issue(ca, "kme", d / "kme", server_names=["127.0.0.1"], client=True)
    client = pki.issue(ca, "sae-a", d / "sae", client=True)
    app = https.make_app()

    async def echo(request: web.Request) -> web.Response:
        body = await https.json_object(request)
        return web.json_response({"sae": https.sae_of(request), "id": request.match_info["id"],
                                  "q": request.query.getall("q", []), "body": body})

    app.add_routes([web.get("/things/{id}", echo), web.post("/things/{id}", echo)])
    server = https.HttpsServer(app, "127.0.0.1", 0, pki.server_ssl_context(*server_cert, ca[0]),
                               limits=web.Limits(head_timeout=1.0, body_timeout=1.0, handshake_timeout=1.0,
                                                 max_connections=20)).start()
    ctx = pki.client_ssl_context(*client, ca[0])
    yield Srv(server, ctx, ctx)
    server.stop()


def test_routes_path_parameters_queries_keep_alive_and_errors(srv: Srv) -> None:
    with httpx.Client(base_url=srv.url, verify=srv.httpx_ctx, timeout=5) as c:
        ok = c.post("/things/a%20b", params=[("q", "1"), ("q", "")], json={"x": 1})
        again = c.get("/things/7")  # same connection
        head = c.head("/things/7")
        missing, wrong = c.get("/nothing"), c.delete("/things/7")
    assert ok.status_code == 200 and ok.json() == {"sae": "sae-a", "id": "a b", "q": ["1", ""], "body": {"x": 1}}
    assert again.json()["id"] == "7" and head.status_code == 200 and head.content == b""
    assert missing.status_code == 404 and missing.json()["message"]
    assert wrong.status_code == 405 and set(wrong.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}


def test_a_body_over_the_limit_is_413_and_a_broken_request_400(srv: Srv) -> None:
    with httpx.Client(base_url=srv.url, verify=srv.httpx_ctx, timeout=5) as c:
        big = c.post("/things/1", content=b"x" * (1024**2 + 1))
    assert big.status_code == 413 and big.json()["message"]
    s = srv.tls()
    s.sendall(b"GET /things/1 HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]
    assert s.recv(10) == b""  # and the connection ends


@pytest.mark.parametrize("send", [b"", b"GET /things/1 HTTP/1.1\r\nHost: x\r\n"])
def test_a_client_that_sends_no_complete_head_is_closed_at_the_head_timeout(srv: Srv, send: bytes) -> None:
    s = srv.tls()
    s.sendall(send)
    start = time.monotonic()
    s.settimeout(5)
    assert s.recv(10) == b""
    assert time.monotonic() - start < 2.5


def test_a_trickled_head_does_not_reset_the_timeout(srv: Srv) -> None:
    s = srv.tls()
    start = time.monotonic()
    closed = False
    for byte in b"GET /things/1 HTTP/1.1\r\nHost: x\r\n":
        try:
            s.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
    if not closed:
        s.settimeout(3)
        try:
            assert s.recv(10) == b""
        except (ConnectionError, ssl.SSLError):
            pass
    assert time.monotonic() - start < 4.0


def test_connections_beyond_the_limit_are_closed_and_a_silent_tcp_connection_at_the_handshake_timeout(srv: Srv) -> None:
    raw = [socket.create_connection(("127.0.0.1", srv.server.port), timeout=5) for _ in range(30)]
    try:
        time.sleep(0.3)
        assert srv.server.server is not None and srv.server.server.connections <= 20
        start = time.monotonic()
        for s in raw:
            s.settimeout(4)
            assert s.recv(10) == b""  # closed: over the limit at once, the others at the handshake timeout
        assert time.monotonic() - start < 3.0
    finally:
        for s in raw:
            s.close()
    with httpx.Client(base_url=srv.url, verify=srv.httpx_ctx, timeout=5) as c:  # and the server still serves
        assert c.get("/things/1").status_code == 200
    assert srv.server.server.connections <= 1


def test_no_thread_per_connection(srv: Srv) -> None:
    before = threading.active_count()
    socks = [srv.tls() for _ in range(15)]
    try:
        time.sleep(0.2)
        assert threading.active_count() == before
    finally:
        for s in socks:
            s.close()
