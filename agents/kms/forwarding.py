"""The forwarding module's wire: hop-by-hop key transport between adjacent nodes.

Each hop protects end keys with link key only: every end key is one-time-padded
with link keys of its own, and the whole message (version, header: virtual link,
hop link, SAE pair, expiry, stream; every entry: key ID, pad key IDs, ciphertext;
the MAC key's ID) is authenticated with one Poly1305 tag keyed with one more link
key, used for this message only (Wegman-Carter one-time MAC). A message of N keys
thus costs N pads and one MAC key per hop. That stays information-theoretically
sound: Poly1305 with a uniformly random one-time key is an epsilon-almost-delta-
universal hash plus a one-time pad on the tag, so a forgery of any other message
succeeds with probability at most 8 * ceil(L / 16) / 2^106 for an L-byte message
(under 2^-85 for the largest frame), whatever the number of entries. The tag covers
the message as the receiver reads it: the canonical JSON (sorted keys, no spaces)
of every field but the tag itself, so whatever the receiver acts on is
authenticated. The channel itself is mutual TLS between KMEs (certificates from the
lab CA), which authenticates who sent a message; the pads and the tag do not depend
on it.

Messages are length-prefixed JSON on a persistent TLS connection; one request,
one reply.
"""
from __future__ import annotations

import base64
import json
import logging
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from sdqkd.listen import binding

log = logging.getLogger(__name__)

LINK_KEY_BYTES = 32
MAX_FRAME = 4 * 1024 * 1024

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


class RelayError(Exception):
    """A hop refused or could not be reached; `code` is the HTTP status to report.

    What the sender may do with the link keys of its message depends on how far it got:
    `sent` is False when no byte of it was written (no connection could be made: the peer
    cannot have seen it); `kept` is True when the peer answered that it refused the
    message without using any link key it names (its copies are all still there)."""

    def __init__(self, message: str, code: int = 503, *, sent: bool = True, kept: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.sent = sent
        self.kept = kept


def parts_for(size_bits: int) -> int:
    """Link keys a one-time pad for a key of this size takes."""
    return -(-size_bits // (8 * LINK_KEY_BYTES))


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


RELAY_VERSION = 2  # one MAC per message (version 1 had one per key)


def pad(data: bytes, link_keys: bytes) -> bytes:
    """One-time pad (both ways): `data` XOR the first len(data) bytes of `link_keys`."""
    if len(link_keys) < len(data):
        raise RelayError("one-time pad shorter than the key", 400)
    return _xor(data, link_keys[: len(data)])


def _authenticated(msg: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in msg.items() if k != "tag"}, sort_keys=True, separators=(",", ":")).encode()


def sign(msg: dict[str, Any], mac_key: bytes) -> dict[str, Any]:
    """`msg` with its one-time Poly1305 tag over everything else in it."""
    return {**msg, "tag": b64(Poly1305.generate_tag(mac_key, _authenticated(msg)))}


def verify(msg: dict[str, Any], mac_key: bytes) -> None:
    """Raises RelayError (400) unless the tag is right for the message as received."""
    try:
        Poly1305.verify_tag(mac_key, _authenticated(msg), unb64(str(msg.get("tag", ""))))
    except (InvalidSignature, ValueError):
        raise RelayError("authentication of the relay message failed", 400) from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _send_frame(sock: ssl.SSLSocket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the relay connection")
        buf.extend(chunk)
    return bytes(buf)


def _recv_frame(sock: ssl.SSLSocket) -> dict[str, Any]:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ConnectionError("relay frame too large")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise ConnectionError("relay frame is not an object")
    return obj


def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
    """An idle pooled connection the peer has closed (it restarted, or was killed: the
    kernel sent FIN or RST) is readable. Reused, it failed the next relay with "peer closed
    the relay connection", a key request lost on the first use after a peer came back."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _peer_id(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v).lower()
    raise ConnectionError("relay peer certificate has no common name")


class Forwarder:
    """Server and client of the relay channel for one node (its KME ID is its qkdn_id)."""

    def __init__(self, kme_id: str, address: tuple[str, int], server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                 peers: dict[str, tuple[str, int]], timeout: float = 10.0) -> None:
        self.kme_id = kme_id.lower()
        self.server_ctx, self.client_ctx = server_ctx, client_ctx
        self.peers = {k.lower(): v for k, v in peers.items()}
        self.timeout = timeout
        self.handler: Handler | None = None
        with binding("key relay", *address):
            self._sock = socket.create_server(address)
        self._sock.settimeout(0.5)
        self.address = self._sock.getsockname()[:2]
        self._pool: dict[str, list[ssl.SSLSocket]] = {}
        self._served: set[ssl.SSLSocket] = set()  # connections peers opened to us, closed with us
        self._pool_lock = threading.Lock()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, handler: Handler) -> None:
        self.handler = handler
        t = threading.Thread(target=self._accept_loop, name=f"relay-accept-{self.address[1]}", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._closing.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() at once
        except OSError:
            pass
        self._sock.close()
        with self._pool_lock:
            for conns in self._pool.values():
                for c in conns:
                    c.close()
            self._pool.clear()
            served, self._served = list(self._served), set()
        for c in served:  # a closed forwarder answers nothing more, on no connection
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(2)

    # --- server side -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                raw, _ = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(raw,), name="relay-conn", daemon=True)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a reply waited for Nagle and the delayed ACK
            sock = self.server_ctx.wrap_socket(raw, server_side=True)
            peer = _peer_id(sock)
            sock.settimeout(None)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("relay handshake refused: %s", exc)
            raw.close()
            return
        with self._pool_lock:
            if self._closing.is_set():
                sock.close()
                return
            self._served.add(sock)
        try:
            self._serve_messages(sock, peer)
        finally:
            with self._pool_lock:
                self._served.discard(sock)
            sock.close()

    def _serve_messages(self, sock: ssl.SSLSocket, peer: str) -> None:
        """One request, one reply, until the peer closes or we do."""
        while not self._closing.is_set():
            try:
                msg = _recv_frame(sock)
            except (OSError, ConnectionError, ValueError):
                return
            try:
                assert self.handler is not None
                reply = self.handler(peer, msg)
            except RelayError as exc:
                reply = {"ok": False, "code": exc.code, "error": str(exc), **({"kept": True} if exc.kept else {})}
            except Exception:  # noqa: BLE001 - one bad message must not stop the channel
                log.exception("relay message from %s failed", peer)
                reply = {"ok": False, "code": 503, "error": "internal error at the relay node"}
            if self._closing.is_set():
                return
            try:
                _send_frame(sock, reply)
            except OSError:
                return

    # --- client side -------------------------------------------------------------------

    def request(self, peer: str, msg: dict[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
        """Send one message to an adjacent KME and return its reply (raises RelayError, whose
        `sent` and `kept` say what became of the message). A pooled connection that fails
        takes the peer's other pooled connections with it (the peer most likely restarted);
        an `idempotent` message (one that uses no key) is then sent once more on a fresh one."""
        peer = peer.lower()
        sock, pooled = self._checkout(peer)
        try:
            _send_frame(sock, msg)
            reply = _recv_frame(sock)
        except (OSError, ConnectionError, ValueError) as exc:
            sock.close()
            if pooled:
                self._drop_pool(peer)
                if idempotent:
                    return self.request(peer, msg)
            raise RelayError(f"relay to {peer} failed: {exc}") from None
        self._checkin(peer, sock)
        if not reply.get("ok"):
            raise RelayError(str(reply.get("error", "refused")), int(reply.get("code", 503)), kept=reply.get("kept") is True)
        return reply

    def _checkout(self, peer: str) -> tuple[ssl.SSLSocket, bool]:
        """A connection to `peer`, and whether it came from the pool (it may be stale).
        RelayError(sent=False) when none can be made: nothing was sent."""
        with self._pool_lock:
            conns = self._pool.get(peer, [])
            while conns:
                sock = conns.pop()
                if not _closed_by_peer(sock):
                    return sock, True
                sock.close()
        addr = self.peers.get(peer)
        if addr is None:
            raise RelayError(f"no relay address for node {peer}", sent=False)
        try:
            raw = socket.create_connection(addr, timeout=self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, one per request
            sock = self.client_ctx.wrap_socket(raw, server_hostname=addr[0])
        except (OSError, ssl.SSLError) as exc:
            raise RelayError(f"cannot reach the relay of node {peer}: {exc}", sent=False) from None
        if _peer_id(sock) != peer:
            sock.close()
            raise RelayError(f"relay at {addr} is not node {peer}", sent=False)
        return sock, False

    def _drop_pool(self, peer: str) -> None:
        with self._pool_lock:
            conns = self._pool.pop(peer, [])
        for c in conns:
            c.close()

    def _checkin(self, peer: str, sock: ssl.SSLSocket) -> None:
        with self._pool_lock:
            self._pool.setdefault(peer, []).append(sock)
