"""The TCP/TLS server the non-HTTP key-delivery protocols share (agents/kms/streamserver.py),
in process with small protocols of the tests' own over real sockets: what every protocol
gets from it without writing it again (the ETSI 004 JSON form's tests drive it in an agent)."""
from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdqkd import pki
from sdqkd.agents.kms.streamserver import Connection, Limits, RequestTooLarge, StreamServer
from sdqkd.listen import ListenError, is_loopback


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("streamserver")
    ca = pki.make_ca(d / "ca", "ca")
    return {"ca": ca, "kme": pki.issue(ca, "kme", d / "kme", server_names=["127.0.0.1"], client=True),
            "sae-a": pki.issue(ca, "sae-a", d / "sae", client=True)}


async def echo(conn: Connection) -> None:
    """Answers each chunk with the caller, the pool thread's name and the chunk."""
    while data := await conn.read(4096):
        thread = await conn.call(lambda: threading.current_thread().name)
        await conn.send(f"{conn.caller}|{thread}|".encode() + data)
        conn.next_request()


SECRET = os.urandom(12).hex()  # stands for key bytes a failing call might quote


async def broken(conn: Connection) -> None:
    await conn.read(10)
    raise RuntimeError(SECRET)


@pytest.fixture
def tls(certs: dict[str, tuple[Path, Path]]) -> Iterator[StreamServer]:
    srv = StreamServer(echo, "127.0.0.1", 0, pki.server_ssl_context(*certs["kme"], certs["ca"][0]), role="test").start()
    yield srv
    srv.stop()


def connect(srv: StreamServer, certs: dict[str, tuple[Path, Path]]) -> ssl.SSLSocket:
    ctx = pki.client_ssl_context(*certs["sae-a"], certs["ca"][0])
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5), server_hostname="127.0.0.1")


def test_the_caller_is_the_certificates_sae_and_calls_run_on_the_pool(tls: StreamServer, certs: dict) -> None:
    with connect(tls, certs) as s:
        for word in (b"one", b"two"):
            s.sendall(word)
            caller, thread, data = s.recv(100).split(b"|")
            assert (caller, data) == (b"sae-a", word) and thread.startswith(b"kms-test")


def test_stop_closes_connections_and_joins_its_thread(certs: dict) -> None:
    before = {t.name for t in threading.enumerate()}
    srv = StreamServer(echo, "127.0.0.1", 0, pki.server_ssl_context(*certs["kme"], certs["ca"][0]), role="test").start()
    s = connect(srv, certs)
    s.sendall(b"x")
    s.recv(100)
    srv.stop()
    assert s.recv(100) == b""
    s.close()
    assert not any(t.name.startswith("stream-test") for t in threading.enumerate())
    assert {t.name for t in threading.enumerate() if not t.name.startswith("kms-test")} <= before
    with socket.socket() as again:  # the port is free
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", srv.port))


def test_plain_tcp_only_on_loopback(certs: dict) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("kme.example")
    with pytest.raises(ValueError, match="loopback"):
        StreamServer(echo, "0.0.0.0", 0, None)
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.load_cert_chain(*map(str, certs["kme"]))
    with pytest.raises(ValueError, match="client certificate"):
        StreamServer(echo, "127.0.0.1", 0, lax)
    srv = StreamServer(echo, "127.0.0.1", 0, None).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"hi")
            assert s.recv(100).startswith(b"None|")
    finally:
        srv.stop()


def test_a_taken_port_is_a_listen_error_naming_the_server(tls: StreamServer) -> None:
    with pytest.raises(ListenError, match=f"ETSI 004 JSON cannot listen on 127.0.0.1:{tls.port}: address already in use"):
        StreamServer(echo, "127.0.0.1", tls.port, None, role="ETSI 004 JSON").start()


def test_a_handler_bug_closes_its_connection_logs_no_message_and_the_server_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    srv = StreamServer(broken, "127.0.0.1", 0, None, limits=Limits(max_connections=2)).start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
                s.sendall(b"x")
                assert s.recv(100) == b""
    finally:
        srv.stop()
    assert "unexpected RuntimeError" in caplog.text and SECRET not in caplog.text


async def framed(conn: Connection) -> None:
    """A length-prefixed protocol, as the ETSI binary form is: each body comes back reversed."""
    while True:
        try:
            body = await conn.readexactly(int.from_bytes(await conn.readexactly(4), "big"))
        except RequestTooLarge:
            await conn.send(b"too large")
            await conn.linger()
            return
        await conn.send(body[::-1])
        conn.next_request()


def test_a_length_prefixed_protocol_gets_size_bounds_per_request() -> None:
    srv = StreamServer(framed, "127.0.0.1", 0, None, limits=Limits(max_request=256)).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            for body in (b"a" * 200 + b"b", b"c" * 250):  # each fits; together they would not
                s.sendall(len(body).to_bytes(4, "big") + body)
                got = b""
                while len(got) < len(body):
                    got += s.recv(1000)
                assert got == body[::-1]
            s.sendall((10_000).to_bytes(4, "big") + b"x" * 10_000)
            assert s.recv(100) == b"too large" and s.recv(100) == b""
    finally:
        srv.stop()
