"""QKD-keyed TLS: TLS 1.3 sessions between two SAEs authenticated by an external PSK
that both ends take from the QKD network, a new key for every session.

How a session is keyed (RFC 8446 section 2.2 and 4.2.11, external PSK):
- the client is the master SAE: before connecting it calls ETSI GS QKD 014 enc_keys at
  its own KME for the server's SAE, and offers the key as the PSK with the key_ID as the
  PSK identity;
- the server is the slave SAE: on seeing the identity in the ClientHello it calls
  dec_keys at its own KME with that key_ID and uses the key as the PSK. A key_ID is
  delivered at most once (ETSI 014), so a key never keys two sessions;
- psk_dhe_ke only (OpenSSL's default; resumption tickets off): the session keys mix an
  (EC)DHE share into the QKD key, so recording the session and learning the key later
  is not enough (forward secrecy on top of the QKD key). No certificate is needed in
  the session: the PSK binder proves both ends hold the key (RFC 8773 would add
  certificates on top; not needed here). The ETSI 014 calls themselves use the SAE
  certificates (mutual TLS) as usual.
- Each key is used by one client and one server, once, as RFC 9257 (external PSK
  guidance) asks. The key is used as the PSK directly, without the RFC 9258 importer,
  because that is what OpenSSL and third-party clients (`openssl s_client -psk`) do.

The key_ID travels in clear in the ClientHello (as any PSK identity does, RFC 9257
section 6): whoever sees it can make the server consume that key first, which denies
that one session and never reveals a key.

Library: the stdlib `ssl` module (OpenSSL) with sslpsk3's PSK callbacks, because Python
3.11's ssl has none. OpenSSL serves TLS 1.2-style PSK callbacks to TLS 1.3 as a PSK for
TLS_AES_128_GCM_SHA256, so a session negotiates a SHA-256 suite (AES-128-GCM or
ChaCha20-Poly1305). tlslite-ng was not chosen: its server takes the external PSKs as a
list (HandshakeSettings.pskConfigs) fixed before the handshake, while this server learns
which key to fetch only from the ClientHello.

It lives in sdqkd/ rather than agents/qaas/ because it runs in the applications (the
SAEs), not on the node: agents/qaas holds the node's own HTTPS services.

Python API (what `sdqkd tls serve|connect` use):
    keys = Etsi014Keys(DeviceClient(api), peer_saes=["sae-b"])   # or sdqkd.lab.keys.sae_keys(lab, "CAIT", ["Rectorado"])
    with QkdTlsServer(keys, port=0) as srv:                       # the slave
        srv.serve_forever(echo)                                   # handler(sock) per session, in a thread
    with connect("127.0.0.1", port, keys) as s:                   # the master: an ssl.SSLSocket
        s.sendall(b"..."); s.key_id; s.version() == "TLSv1.3"
    reader, writer, key_id = await open_connection(host, port, keys)   # the master, for asyncio
`accept()` serves sessions one by one instead of serve_forever. Any object with
`new_key()` (master) or `key(key_id)` (slave) is a key source: `Etsi014Keys`, or
`NodeApiKeys`, the same over the node's one-call key API (`sdqkd tls ... --via api`). The server answers each ClientHello inside OpenSSL's callback
with a blocking key fetch, so it runs in threads, not on an event loop.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from sslpsk3 import SSLPSKContext
from sslpsk3 import sslpsk3 as _psk

from sdqkd.keysource import (
    KEY_BITS,
    Etsi014Keys,
    KeySourceError,
    KeyUnavailable,
    MasterKeys,
    NodeApiKeys,
    SlaveKeys,
    etsi014_keys,
)

# The key sources are part of this module's API (sdqkd/keysource.py holds them).
__all__ = ["KEY_BITS", "Etsi014Keys", "KeySourceError", "KeyUnavailable", "MasterKeys", "NodeApiKeys", "QkdTlsError",
           "QkdTlsServer", "QkdTlsSocket", "SlaveKeys", "connect", "echo", "etsi014_keys", "exchange",
           "open_connection"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 15.0
# A server waits this long for a ClientHello: the client may be waiting for its KME (503
# while the controller sets up a key path is retried for up to a minute).
SERVER_HANDSHAKE_TIMEOUT = 75.0


class QkdTlsError(KeySourceError):
    """A session could not be opened; the message says at which step and why (never a key).
    A key source's own failure (KeyUnavailable) is a KeySourceError too: catch that for both."""


class QkdTlsSocket(_psk.SSLPSKSocket):
    """An ssl.SSLSocket keyed by a QKD key; key_id names the key (and so the session)."""

    key_id: str = ""


# The SSL* pointer sslpsk3 hands out, and OpenSSL's SSL_set_session_id_context from the
# libssl its extension (and so Python's ssl) is linked with.
_set_sid_ctx = ctypes.CDLL(_psk._sslpsk3.__file__).SSL_set_session_id_context
_set_sid_ctx.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
_set_sid_ctx.restype = ctypes.c_int


class _Context(SSLPSKContext):
    """TLS 1.3 only, no certificates, no resumption: the PSK is the only authentication."""

    sslsocket_class = QkdTlsSocket

    def setup_psk_callbacks(self, sock: Any) -> None:
        super().setup_psk_callbacks(sock)
        if self.psk_client_callback and not sock.server_side:
            # Python gives every SSL the session-ID context "Python"; the session OpenSSL makes
            # from the client callback has none, so a server accepting the PSK would trip
            # "attempt to reuse session in different context". A client needs no context.
            ptr = _psk._sslpsk3.sslpsk3_set_psk_client_callback(_psk.get_ssl_socket(sock))
            if _set_sid_ctx(ptr, b"", 0) != 1:
                raise ssl.SSLError("cannot clear the session ID context")


def _context(server: bool) -> _Context:
    ctx = _Context(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if server:
        ctx.num_tickets = 0  # no resumption: a resumed session would not take a new QKD key
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the PSK binder authenticates the server
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _forget(sock: ssl.SSLSocket | ssl.SSLObject) -> None:
    """Drop sslpsk3's per-connection context reference once the handshake is over."""
    # Setting this connection's own callback again is a no-op that returns its SSL pointer.
    setter = _psk._sslpsk3.sslpsk3_set_psk_server_callback if sock.server_side else _psk._sslpsk3.sslpsk3_set_psk_client_callback
    _psk.psk_contexts.pop(setter(_psk.get_ssl_socket(sock)), None)


def connect(host: str, port: int, keys: MasterKeys, *, timeout: float = HANDSHAKE_TIMEOUT) -> QkdTlsSocket:
    """Open a TLS 1.3 session keyed by a new key from `keys` (the master's side). The key is
    taken once the server answers, so an unreachable server wastes no key."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
        _nodelay(raw)
    except OSError as exc:
        raise QkdTlsError(f"cannot reach {host}:{port}: {exc}") from None
    try:
        key_id, key = keys.new_key()
    except BaseException:
        raw.close()
        raise
    ctx = _context(server=False)
    ctx.set_psk_client_callback(lambda _hint: (key_id, key))
    try:
        sock: QkdTlsSocket = ctx.wrap_socket(raw)  # type: ignore[assignment]
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise QkdTlsError(f"TLS handshake with {host}:{port} failed for key_ID {key_id} "
                          f"(the server does not hold the same key?): {_ssl_reason(exc)}") from None
    _forget(sock)
    sock.key_id = key_id
    sock.settimeout(None)
    log.info("QKD-keyed TLS session to %s:%d: key_ID %s, %s %s", host, port, key_id, sock.version(), sock.cipher()[0])
    return sock


async def open_connection(host: str, port: int, keys: MasterKeys, *,
                          timeout: float = HANDSHAKE_TIMEOUT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """connect() for asyncio: (reader, writer, key_ID) of a QKD-keyed TLS 1.3 session. The key
    source is called in a worker thread, so a blocking one (ETSI 014 over httpx) is fine."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise QkdTlsError(f"cannot reach {host}:{port}: {exc}") from None
    try:
        key_id, key = await asyncio.to_thread(keys.new_key)
        ctx = _context(server=False)
        ctx.set_psk_client_callback(lambda _hint: (key_id, key))
        try:
            await writer.start_tls(ctx, ssl_handshake_timeout=timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            raise QkdTlsError(f"TLS handshake with {host}:{port} failed for key_ID {key_id} "
                              f"(the server does not hold the same key?): {_ssl_reason(exc)}") from None
    except BaseException:
        writer.close()
        raise
    tls = writer.get_extra_info("ssl_object")
    _forget(tls)
    log.info("QKD-keyed TLS session to %s:%d: key_ID %s, %s %s", host, port, key_id, tls.version(), tls.cipher()[0])
    return reader, writer, key_id


class QkdTlsServer:
    """Listens on host:port and opens a TLS 1.3 session per client, keyed by the key the
    client names (the slave's side). A failed session never stops the server."""

    def __init__(self, keys: SlaveKeys, host: str = "127.0.0.1", port: int = 0, *,
                 handshake_timeout: float = SERVER_HANDSHAKE_TIMEOUT, ecdh_curve: str | None = None) -> None:
        """ecdh_curve: allow only this (EC)DHE group (e.g. prime256v1 where policy asks for
        NIST curves); a client offering another first gets a HelloRetryRequest."""
        self.keys = keys
        self.ecdh_curve = ecdh_curve
        self.handshake_timeout = handshake_timeout
        self._listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.host, self.port = self._listener.getsockname()[:2]
        self._closed = threading.Event()

    def accept(self) -> QkdTlsSocket:
        """The next client's session; raises QkdTlsError when its handshake fails."""
        raw, peer = self._listener.accept()
        return self._handshake(raw, peer)

    def serve_forever(self, handler: Callable[[QkdTlsSocket], None]) -> None:
        """Run handler(session) in a thread per client until close(); the server closes
        each session after its handler returns."""
        while not self._closed.is_set():
            try:
                raw, peer = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                raise
            threading.Thread(target=self._session, args=(raw, peer, handler), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def __enter__(self) -> "QkdTlsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, raw: socket.socket, peer: Any, handler: Callable[[QkdTlsSocket], None]) -> None:
        try:
            sock = self._handshake(raw, peer)
        except QkdTlsError:
            return  # already logged
        try:
            with sock:
                handler(sock)
        except (OSError, ssl.SSLError) as exc:
            log.info("session %s from %s:%s ended: %s", sock.key_id, peer[0], peer[1], exc)
        except Exception:  # noqa: BLE001 - a handler bug ends its session, not the server
            log.exception("session %s handler failed", sock.key_id)

    def _handshake(self, raw: socket.socket, peer: Any) -> QkdTlsSocket:
        # One context per session: the callback remembers this session's identity and key,
        # because after a HelloRetryRequest OpenSSL asks again for the same identity and a
        # key can be fetched only once.
        taken: dict[str, bytes] = {}
        why: list[str] = []

        def psk(identity: str | None) -> bytes:
            # Runs inside OpenSSL: it must not raise (b"" refuses the identity).
            if identity in taken:
                return taken[identity]
            try:
                taken.clear()
                taken[identity or ""] = self.keys.key(identity or "")
                return taken[identity or ""]
            except KeyUnavailable as exc:
                why.append(str(exc))
            except Exception as exc:  # noqa: BLE001
                why.append(f"key source failed: {type(exc).__name__}: {exc}")
            return b""

        ctx = _context(server=True)
        if self.ecdh_curve:
            ctx.set_ecdh_curve(self.ecdh_curve)
        ctx.set_psk_server_callback(psk)
        _nodelay(raw)
        raw.settimeout(self.handshake_timeout)
        try:
            sock: QkdTlsSocket = ctx.wrap_socket(raw, server_side=True)  # type: ignore[assignment]
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            if why:
                reason = why[0]
            elif taken:
                reason = f"key_ID {next(iter(taken))}: the client does not hold the key we do ({_ssl_reason(exc)})"
            else:
                reason = _ssl_reason(exc)
            taken.clear()
            log.warning("QKD-keyed TLS session from %s:%s refused: %s", peer[0], peer[1], reason)
            raise QkdTlsError(f"session from {peer[0]}:{peer[1]} refused: {reason}") from None
        _forget(sock)
        sock.key_id = next(iter(taken), "")
        taken.clear()
        if not sock.key_id:  # cannot happen without certificates or tickets; never serve it
            sock.close()
            raise QkdTlsError(f"session from {peer[0]}:{peer[1]} was not keyed by a QKD key")
        sock.settimeout(None)
        log.info("QKD-keyed TLS session from %s:%s: key_ID %s, %s %s", peer[0], peer[1], sock.key_id, sock.version(),
                 sock.cipher()[0])
        return sock


def echo(sock: ssl.SSLSocket) -> None:
    """The demo service: send back whatever arrives until the client closes."""
    while data := sock.recv(65536):
        sock.sendall(data)


def exchange(sock: ssl.SSLSocket, data: bytes, *, idle: float = 5.0) -> bytes:
    """The demo client: send `data`, then collect the answer until as much came back as
    was sent (an echo), the server closes, or nothing arrives for `idle` seconds."""
    sock.sendall(data)
    sock.settimeout(idle)
    got = b""
    try:
        while len(got) < len(data) or not data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        pass
    return got


def _nodelay(sock: socket.socket) -> None:
    """No Nagle: the handshake's last flight and the first data are small writes in a row,
    which Nagle with delayed ACKs holds back for 40 ms."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _ssl_reason(exc: BaseException) -> str:
    """OpenSSL's reason (e.g. DECRYPT_ERROR: the binder did not verify) without the file/line noise."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return str(exc) or type(exc).__name__
