"""The authenticated service channel between the two QKD modules of a PHYS link.

QKD needs an authenticated classical channel; ours is TCP on loopback. The
initiator (the link's transmitter / master) sends a hello naming the link and both
interfaces, the responder answers with a challenge; each proves it holds the lab's
service key with an HMAC over the transcript (both hellos, nonces and ephemeral
X25519 keys), and both derive fresh session keys from the X25519 exchange. From
then on every frame carries a truncated HMAC over a sequence number, so frames
cannot be forged, replayed or reordered.

Frames are length-prefixed JSON objects; "t" names the message. The handshake:
  hello     {t, v, p, qkdl_id, from, to, nonce, pub, ...}    initiator -> responder
  challenge {t, nonce, pub, mac, ...}  or  refuse {t, reason}
  auth      {t, mac}                   or  refuse
  ready     {t}                        or  refuse
`p` names the driver protocol ("qkd-emulated", "qkd-etsi014") and is bound into the
session keys, so modules of different kinds never pair. What the drivers exchange
after `ready` is their own business.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sdqkd.listen import binding

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 3.0
MAX_FRAME = 1 << 16
TAG_BYTES = 16
VERSION = 1


class Refused(Exception):
    """The other end turned the pairing down, or cannot be reached (reason in the message)."""


class AuthenticationFailed(Refused):
    """The initiator does not hold the service key. Raised by `respond` before anything
    is sent, so the caller can record it first; then it calls `wire.refuse(...)`."""


@dataclass(frozen=True)
class Endpoint:
    """One end of a link: a node and one of its QKD interfaces."""

    qkdn_id: str
    qkdi_id: int

    def as_dict(self) -> dict[str, Any]:
        return {"qkdn_id": self.qkdn_id, "qkdi_id": self.qkdi_id}


@dataclass(frozen=True)
class Session:
    """A paired, secured channel: `secret` is the link's fresh shared secret; `peer` the
    other end's handshake message (hello or challenge) with its driver-specific fields."""

    wire: "Wire"
    secret: bytes
    peer: dict[str, Any]


class Wire:
    """Length-prefixed JSON frames; once secured, each frame carries an HMAC tag over a
    sequence number, so the classical channel is authenticated as QKD requires."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._keys: tuple[bytes, bytes] | None = None
        self._seq = [0, 0]
        self.closed = False

    @classmethod
    def connect(cls, address: tuple[str, int], timeout: float = HANDSHAKE_TIMEOUT) -> "Wire":
        return cls(socket.create_connection(address, timeout=timeout))

    def secure(self, send_key: bytes, recv_key: bytes) -> None:
        self._keys = (send_key, recv_key)

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def send(self, msg: Mapping[str, Any]) -> None:
        with self._send_lock:
            self._send(msg)

    def refuse(self, reason: str) -> None:
        self.send({"t": "refuse", "reason": reason})

    def _send(self, msg: Mapping[str, Any]) -> None:
        data = _canon(msg)
        if self._keys:
            data += hmac.digest(self._keys[0], struct.pack(">Q", self._seq[0]) + data, "sha256")[:TAG_BYTES]
            self._seq[0] += 1
        self.sock.sendall(struct.pack(">I", len(data)) + data)

    def recv(self) -> dict[str, Any]:
        (size,) = struct.unpack(">I", self._exact(4))
        if size > MAX_FRAME:
            raise ConnectionError("oversized frame")
        data = self._exact(size)
        if self._keys:
            data, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
            want = hmac.digest(self._keys[1], struct.pack(">Q", self._seq[1]) + data, "sha256")[:TAG_BYTES]
            if not hmac.compare_digest(tag, want):
                raise ConnectionError("bad frame authentication tag")
            self._seq[1] += 1
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise ConnectionError("malformed frame")
        return msg

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.sock], [], [], max(0.0, timeout))[0])

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("service channel closed")
            buf += chunk
        return bytes(buf)

    def close(self, bye: str | None = None) -> None:
        """Close now; with `bye`, first tell the peer why (skipped if a send is stuck)."""
        if self.closed:
            return
        self.closed = True
        if bye is not None and self._send_lock.acquire(timeout=0.2):
            try:
                self.sock.settimeout(0.2)
                self._send({"t": "bye", "reason": bye})
            except OSError:
                pass
            finally:
                self._send_lock.release()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# --- handshake ------------------------------------------------------------------------------


def initiate(wire: Wire, service_key: bytes, protocol: str, qkdl_id: str, local: Endpoint,
             remote: Endpoint, extra: Mapping[str, Any] | None = None) -> Session:
    """Pair as the initiator; `extra` rides in the hello. Raises Refused (with the peer's
    reason, or when the peer cannot prove it holds the key), ConnectionError, OSError."""
    eph = X25519PrivateKey.generate()
    hello = {**(extra or {}), "t": "hello", "v": VERSION, "p": protocol, "qkdl_id": qkdl_id,
             "from": local.as_dict(), "to": remote.as_dict(), "nonce": os.urandom(16).hex(),
             "pub": _pub_hex(eph)}
    wire.send(hello)
    challenge = wire.recv()
    if challenge.get("t") != "challenge":
        raise Refused(f"peer refused: {challenge.get('reason', 'no reason')}")
    th = _transcript(hello, challenge)
    if not hmac.compare_digest(str(challenge.get("mac", "")), _mac(service_key, b"rx", th)):
        wire.refuse("authentication failed")
        raise Refused("service channel authentication failed (peer)")
    wire.send({"t": "auth", "mac": _mac(service_key, b"tx", th)})
    ready = wire.recv()
    if ready.get("t") != "ready":
        raise Refused(f"peer refused: {ready.get('reason', 'no reason')}")
    secret, k_tx, k_rx = _session_keys(eph, str(challenge["pub"]), th, protocol)
    wire.secure(k_tx, k_rx)
    return Session(wire, secret, challenge)


def read_hello(wire: Wire, protocol: str) -> dict[str, Any]:
    """The initiator's hello; a hello of another driver protocol is refused here."""
    hello = wire.recv()
    if hello.get("t") != "hello":
        raise ConnectionError("expected hello")
    theirs = hello.get("p", protocol)
    if theirs != protocol:
        wire.refuse(f"peer module speaks {theirs}, not {protocol}")
        raise Refused(f"a {theirs} module tried to pair")
    return hello


def endpoint_mismatch(hello: Mapping[str, Any], local: Endpoint, remote: Endpoint) -> str | None:
    """Why a hello does not fit the link as configured here, or None."""
    peer = hello.get("from") or {}
    if (peer.get("qkdn_id"), peer.get("qkdi_id")) != (remote.qkdn_id, remote.qkdi_id):
        return "link endpoints do not match"
    if (hello.get("to") or {}) != local.as_dict():
        return "wrong interface"
    return None


def respond(wire: Wire, service_key: bytes, protocol: str, hello: Mapping[str, Any],
            extra: Mapping[str, Any] | None = None) -> Session:
    """Pair as the responder to a vetted hello; `extra` rides in the challenge. Raises
    AuthenticationFailed (nothing sent yet) when the initiator lacks the service key."""
    eph = X25519PrivateKey.generate()
    challenge = {**(extra or {}), "t": "challenge", "nonce": os.urandom(16).hex(), "pub": _pub_hex(eph)}
    th = _transcript(hello, challenge)
    challenge["mac"] = _mac(service_key, b"rx", th)
    wire.send(challenge)
    auth = wire.recv()
    if auth.get("t") != "auth" or not hmac.compare_digest(str(auth.get("mac", "")), _mac(service_key, b"tx", th)):
        raise AuthenticationFailed("service channel authentication failed")
    secret, k_tx, k_rx = _session_keys(eph, str(hello["pub"]), th, protocol)
    wire.send({"t": "ready"})
    wire.secure(k_rx, k_tx)
    return Session(wire, secret, dict(hello))


def _canon(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()


def _transcript(hello: Mapping[str, Any], challenge: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in challenge.items() if k != "mac"}
    return hashlib.sha256(_canon(hello) + _canon(body)).digest()


def _mac(service_key: bytes, direction: bytes, transcript: bytes) -> str:
    return hmac.digest(service_key, direction + transcript, "sha256").hex()


def _session_keys(own: X25519PrivateKey, peer_pub_hex: str, transcript: bytes,
                  protocol: str) -> tuple[bytes, bytes, bytes]:
    """(link secret, initiator->responder MAC key, responder->initiator MAC key)."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_pub_hex)))
    info = f"sdqkd {protocol} service channel".encode()
    okm = HKDF(SHA256(), 96, salt=transcript, info=info).derive(shared)
    return okm[:32], okm[32:64], okm[64:]


def _pub_hex(key: X25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


# --- accepting ------------------------------------------------------------------------------


class Listener:
    """The module's service address: accepts peers and hands each connection (with the
    handshake timeout set) to `on_connection`, from the thread that runs `serve()`."""

    def __init__(self, address: tuple[str, int], role: str = "QKD service channel") -> None:
        with binding(role, *address):
            self._server = socket.create_server(address, reuse_port=False)
        self._server.settimeout(0.5)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._closed = threading.Event()

    def serve(self, on_connection: Callable[[socket.socket], None]) -> None:
        """Accept until close(); run this in a thread of its own."""
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                on_connection(conn)
            except Exception:  # one bad connection must not stop the module listening
                log.exception("service connection handler failed")
                conn.close()

    def close(self) -> None:
        self._closed.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
