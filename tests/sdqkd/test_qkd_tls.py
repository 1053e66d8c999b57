"""QKD-keyed TLS 1.3 between two SAEs of a real LKMS behind its real ETSI 014 HTTPS
server (the `kme` fixture of test_etsi014: one KME holding sae-a, the master, and
sae-b, the slave), and against Debian's openssl CLI as the third-party TLS 1.3 stack."""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from kmeproc import Kme, kme  # noqa: F401 - the shared in-process KME fixture

from sdqkd import qkdtls
from sdqkd.etsi014_client import DeviceApi, DeviceClient

OPENSSL = shutil.which("openssl") or "openssl"  # Debian's, from the Makefile's DEBS; missing fails the tests


def keys(k: Kme, me: str, peer: str) -> qkdtls.Etsi014Keys:
    cert, key = k.certs[me]
    return qkdtls.etsi014_keys(k.url, str(cert), str(key), str(k.ca), [peer], wait=5)


@pytest.fixture
def master(kme: Kme) -> Iterator[qkdtls.Etsi014Keys]:  # noqa: F811
    src = keys(kme, "sae-a", "sae-b")
    yield src
    src.close()


@pytest.fixture
def slave(kme: Kme) -> Iterator[qkdtls.Etsi014Keys]:  # noqa: F811
    src = keys(kme, "sae-b", "sae-a")
    yield src
    src.close()


class Running:
    """A QkdTlsServer serving `handler` in a thread; remembers the sessions it opened."""

    def __init__(self, source: qkdtls.SlaveKeys, handler=qkdtls.echo, **kw) -> None:  # type: ignore[no-untyped-def]
        self.server = qkdtls.QkdTlsServer(source, **kw)
        self.sessions: list[tuple[str, str, str]] = []

        def record(sock: qkdtls.QkdTlsSocket) -> None:
            self.sessions.append((sock.key_id, sock.version() or "", sock.cipher()[0]))
            handler(sock)

        self.thread = threading.Thread(target=self.server.serve_forever, args=(record,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def server(slave: qkdtls.Etsi014Keys) -> Iterator[Running]:
    run = Running(slave)
    yield run
    run.close()


def roundtrip(sock: qkdtls.QkdTlsSocket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the session"
        got += chunk
    return got


def eventually(check, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    """The server logs a refused session in its own thread, just after the client saw the alert."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Tampered:
    """A master whose key differs from the slave's by one bit (same key_ID)."""

    def __init__(self, inner: qkdtls.MasterKeys) -> None:
        self.inner = inner

    def new_key(self) -> tuple[str, bytes]:
        key_id, key = self.inner.new_key()
        return key_id, bytes([key[0] ^ 1]) + key[1:]


class Taken:
    """A master that offers a key it took before (the test holds the real enc_keys result)."""

    def __init__(self, key_id: str, key: bytes) -> None:
        self.pair = (key_id, key)

    def new_key(self) -> tuple[str, bytes]:
        return self.pair


def test_data_moves_both_ways_over_a_qkd_keyed_tls13_session(master, server, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    taken: list[bytes] = []
    spy = Taken(*master.new_key())
    taken.append(spy.pair[1])
    payload = os.urandom(200_000)
    with qkdtls.connect(server.server.host, server.server.port, spy) as s:
        assert s.version() == "TLSv1.3"
        assert roundtrip(s, payload) == payload  # up and back down through the echo
        assert s.key_id == spy.pair[0]
    assert server.sessions == [(spy.pair[0], "TLSv1.3", server.sessions[0][2])]
    assert server.sessions[0][2] in {"TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}
    logs = caplog.text
    assert spy.pair[0] in logs  # the key_ID is logged, the key never
    for k in taken:
        assert k.hex() not in logs and base64.b64encode(k).decode() not in logs and repr(k) not in logs


def test_asyncio_clients_get_a_session_each(master, server) -> None:  # type: ignore[no-untyped-def]
    async def one(i: int) -> str:
        reader, writer, key_id = await qkdtls.open_connection(server.server.host, server.server.port, master)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.write(b"async %d" % i)
        await writer.drain()
        assert await reader.readexactly(7) == b"async %d" % i
        writer.close()
        await writer.wait_closed()
        return key_id

    async def three() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(3)))

    ids = asyncio.run(three())
    assert len(set(ids)) == 3 and sorted(ids) == sorted(sid for sid, _, _ in server.sessions)


def test_every_session_takes_a_new_key(master, server) -> None:  # type: ignore[no-untyped-def]
    ids = []
    for i in range(2):
        with qkdtls.connect(server.server.host, server.server.port, master) as s:
            assert roundtrip(s, b"session %d" % i) == b"session %d" % i
            ids.append(s.key_id)
    assert len(set(ids)) == 2
    assert [sid for sid, _, _ in server.sessions] == ids


def test_a_client_with_a_different_key_fails_and_the_server_keeps_serving(master, server, caplog) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(qkdtls.QkdTlsError, match="handshake .* failed"):
        qkdtls.connect(server.server.host, server.server.port, Tampered(master), timeout=5)
    with pytest.raises(qkdtls.QkdTlsError, match="handshake .* failed"):
        asyncio.run(qkdtls.open_connection(server.server.host, server.server.port, Tampered(master), timeout=5))
    with qkdtls.connect(server.server.host, server.server.port, master) as s:
        assert roundtrip(s, b"still here") == b"still here"
    assert len(server.sessions) == 1
    assert eventually(lambda: "the client does not hold the key we do (BINDER_DOES_NOT_VERIFY)" in caplog.text)


def test_a_server_fed_a_different_key_refuses_the_session(master, slave) -> None:  # type: ignore[no-untyped-def]
    class Wrong:
        def key(self, key_id: str) -> bytes:
            return bytes(32)

    run = Running(Wrong())
    try:
        with pytest.raises(qkdtls.QkdTlsError):
            qkdtls.connect(run.server.host, run.server.port, master, timeout=5)
        assert run.sessions == []
    finally:
        run.close()


def test_a_consumed_key_id_is_refused_cleanly(master, server, caplog) -> None:  # type: ignore[no-untyped-def]
    once = Taken(*master.new_key())
    with qkdtls.connect(server.server.host, server.server.port, once) as s:
        assert roundtrip(s, b"first") == b"first"
    with pytest.raises(qkdtls.QkdTlsError, match=once.pair[0]):
        qkdtls.connect(server.server.host, server.server.port, once, timeout=5)  # same key_ID and key again
    assert eventually(lambda: "not found" in caplog.text)  # the KME's at-most-once answer is why
    assert len(server.sessions) == 1
    with qkdtls.connect(server.server.host, server.server.port, master) as s:
        assert roundtrip(s, b"next") == b"next"


def test_an_unreachable_server_wastes_no_key(master) -> None:  # type: ignore[no-untyped-def]
    from agentproc import free_port

    class Counting:
        calls = 0

        def new_key(self) -> tuple[str, bytes]:
            self.calls += 1
            return master.new_key()

    src = Counting()
    with pytest.raises(qkdtls.QkdTlsError, match="cannot reach"):
        qkdtls.connect("127.0.0.1", free_port(), src, timeout=5)
    assert src.calls == 0


def test_an_identity_that_is_no_key_id_never_reaches_the_kme(slave) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(qkdtls.KeyUnavailable, match="not an ETSI 014 key_ID"):
        slave.key("../../status")
    with pytest.raises(qkdtls.KeyUnavailable, match="not an ETSI 014 key_ID"):
        slave.key("urn:uuid:12345678-1234-5678-1234-567812345678")


def s_client(port: int, key_id: str, key: bytes, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-psk", key.hex(),
                           "-psk_identity", key_id, "-ciphersuites", "TLS_AES_128_GCM_SHA256", "-ign_eof"],
                          input=data, capture_output=True, timeout=20)


def test_openssl_s_client_opens_a_session_with_our_server(master, slave) -> None:  # type: ignore[no-untyped-def]
    def once(sock: qkdtls.QkdTlsSocket) -> None:  # answer one message, then close
        sock.sendall(b"echo:" + sock.recv(1024))

    run = Running(slave, once)
    try:
        key_id, key = master.new_key()
        ok = s_client(run.server.port, key_id, key, b"hello from openssl\n")
        out = ok.stdout.decode()
        assert "TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256" in out, out
        assert "Server Temp Key: X25519" in out  # psk_dhe_ke: an ECDHE share on top of the PSK
        assert "echo:hello from openssl" in out
        assert "New Session Ticket" not in out  # no resumption: every session takes a new key
        assert run.sessions == [(key_id, "TLSv1.3", "TLS_AES_128_GCM_SHA256")]

        key_id, key = master.new_key()
        bad = s_client(run.server.port, key_id, bytes([key[0] ^ 0x80]) + key[1:], b"hello\n")
        assert "echo:" not in bad.stdout.decode() and len(run.sessions) == 1
    finally:
        run.close()


def test_a_hello_retry_request_asks_the_kme_once(master, slave) -> None:  # type: ignore[no-untyped-def]
    # A P-256-only server: clients offering X25519 first (ours, openssl) get a HelloRetryRequest,
    # and OpenSSL asks for the PSK again with the second ClientHello; dec_keys works only once.
    run = Running(slave, ecdh_curve="prime256v1")
    try:
        with qkdtls.connect(run.server.host, run.server.port, master) as s:
            assert roundtrip(s, b"after a retry") == b"after a retry"
        key_id, key = master.new_key()
        out = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{run.server.port}", "-tls1_3", "-msg",
                              "-psk", key.hex(), "-psk_identity", key_id, "-ciphersuites", "TLS_AES_128_GCM_SHA256"],
                             input=b"", capture_output=True, timeout=20).stdout.decode()
        assert out.count("ServerHello") == 2 and "Server Temp Key: ECDH, prime256v1" in out, out  # HRR, then ServerHello
        assert "TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256" in out
        assert eventually(lambda: len(run.sessions) == 2) and run.sessions[1][0] == key_id
    finally:
        run.close()


def finish(proc: subprocess.Popen) -> str:
    """s_server -naccept 1 ends when the session does; never leave it running."""
    try:
        return proc.communicate(timeout=10)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0].decode()


def test_our_client_opens_a_session_with_openssl_s_server(kme, master) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from agentproc import free_port

    def s_server(psk: bytes, key_id: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen([OPENSSL, "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-nocert", "-naccept", "1",
                                 "-psk", psk.hex(), "-psk_identity", key_id, "-ciphersuites", "TLS_AES_128_GCM_SHA256"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:  # listening once it says ACCEPT
            if line.strip() == b"ACCEPT":
                break
        return proc, port

    # the slave side takes the key from its KME with dec_keys and gives it to openssl
    key_id, key = master.new_key()
    cert, pkey = kme.certs["sae-b"]
    dev = DeviceClient(DeviceApi(kme.url, "sae-b", "sae-a", str(kme.ca), str(cert), str(pkey)))
    (_, theirs), = dev.dec_keys("sae-a", [key_id])
    dev.close()
    proc, port = s_server(theirs, key_id)
    try:
        with qkdtls.connect("127.0.0.1", port, Taken(key_id, key)) as s:
            assert s.version() == "TLSv1.3" and s.cipher()[0] == "TLS_AES_128_GCM_SHA256"
            s.sendall(b"hello from sdqkd\n")
            proc.stdin.write(b"hello from openssl\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            assert s.recv(1024) == b"hello from openssl\n"
    finally:
        out = finish(proc)
    assert "hello from sdqkd" in out and "CIPHER is TLS_AES_128_GCM_SHA256" in out

    proc, port = s_server(bytes(32), key_id)  # a server holding another key
    try:
        with pytest.raises(qkdtls.QkdTlsError, match="handshake"):
            qkdtls.connect("127.0.0.1", port, Taken(key_id, key), timeout=5)
    finally:
        finish(proc)


def test_the_cli_serves_and_connects_without_a_lab(kme, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    def creds(sae: str) -> list[str]:
        cert, key = kme.certs[sae]
        return ["--kme", kme.url, "--cert", str(cert), "--key", str(key), "--ca", str(kme.ca)]

    serve = subprocess.Popen([sys.executable, "-m", "sdqkd", "tls", "serve", *creds("sae-b"), "--peer-sae", "sae-a",
                              "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + serve.stderr.read() if serve.poll() is not None else line
        port = line.split(":")[-1].split()[0]
        for text in ("one QKD-keyed session\n", "and another\n"):
            done = subprocess.run([sys.executable, "-m", "sdqkd", "tls", "connect", *creds("sae-a"), "--peer-sae", "sae-b",
                                   "--port", port], input=text, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert done.stdout == text
            assert "TLSv1.3" in done.stderr and "key_ID" in done.stderr
        bad = subprocess.run([sys.executable, "-m", "sdqkd", "tls", "connect", *creds("sae-a"), "--peer-sae", "sae-x",
                              "--port", port], input="x", capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "Error" in bad.stderr
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=10)
    assert err.count("session from") >= 2
