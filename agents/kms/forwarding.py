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
lab's KME CA, each peer's key pinned in the config), which authenticates who sent a
message; the pads and the tag do not depend on it.

Messages are length-prefixed JSON on a persistent TLS connection; one request,
one reply. The server side holds no thread per connection: one selector thread
accepts, runs the TLS handshakes (non-blocking, with a deadline) and waits on idle
connections (closed after an idle timeout); a bounded pool of workers answers the
requests (`RelayLimits`).
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from sdqkd import pki
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


@dataclass(frozen=True)
class RelayLimits:
    """Bounds on the relay port's inbound connections (config kms.relay_*). Connections wait
    in one selector thread, handshaking or idle; a complete request goes to one of
    `workers` threads, which answers it and hands the connection back."""

    idle_timeout: float = 120.0  # s an authorized connection may wait for its next request
    handshake_timeout: float = 10.0  # s from TCP accept to an authorized peer
    max_connections: int = 64  # inbound connections at once, handshaking ones included
    max_handshakes: int = 16  # of which not yet authorized (a new one drops the oldest)
    max_per_peer: int = 8  # authorized connections from one peer
    workers: int = 8  # threads answering requests

    @property
    def pool_idle(self) -> float:
        """How long our own pooled client connections are reused: well under the peer's idle
        timeout (the same in a lab), so that we never send on one it is closing."""
        return self.idle_timeout / 2


class _Conn:
    """One inbound relay connection: its TLS socket, the peer once authorized, what was read
    of its next frame, and the deadline of its state (handshake, idle; none while busy)."""

    __slots__ = ("sock", "peer", "state", "deadline", "buf", "events")

    def __init__(self, sock: ssl.SSLSocket, deadline: float) -> None:
        self.sock = sock
        self.peer: str | None = None
        self.state = "handshake"  # -> "idle" <-> "busy", or "refused" (closed soon)
        self.deadline = deadline
        self.buf = bytearray()
        self.events = 0  # what it is registered for in the selector (0: not registered)


class Forwarder:
    """Server and client of the relay channel for one node (its KME ID is its qkdn_id).

    `peers` are the adjacent KMEs (qkdn_id -> relay address): only they may connect, and
    only they are connected to. With `pins` (qkdn_id -> pki.spki_pin of its KME key, what a
    node's config gives), a peer must also present a KME certificate (pki.KME_EKU) with that
    public key, both ways; without (unit tests) its certificate's CN is enough. Which CA
    the certificates come from is the TLS contexts' business (node.py: the KME CA only)."""

    def __init__(self, kme_id: str, address: tuple[str, int], server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                 peers: dict[str, tuple[str, int]], timeout: float = 10.0, *, pins: dict[str, str] | None = None,
                 limits: RelayLimits | None = None) -> None:
        self.kme_id = kme_id.lower()
        self.server_ctx, self.client_ctx = server_ctx, client_ctx
        self.peers = {k.lower(): v for k, v in peers.items()}
        self.pins = {k.lower(): v for k, v in pins.items()} if pins is not None else None
        self.limits = limits or RelayLimits()
        self.timeout = timeout
        self.handler: Handler | None = None
        # Told of every request sent (peer, op, seconds until its reply or failure, whether it
        # succeeded): the agent's relay latency metrics (agents/metrics.py).
        self.observe: Callable[[str, str, float, bool], None] | None = None
        with binding("key relay", *address):
            self._sock = socket.create_server(address)
        self._sock.setblocking(False)
        self.address = self._sock.getsockname()[:2]
        self._pool: dict[str, list[tuple[ssl.SSLSocket, float]]] = {}
        self._pool_lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}  # requests in flight per peer
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        # server side: the selector thread owns every connection that is not busy
        self._sel = selectors.DefaultSelector()
        self._conns: set[_Conn] = set()
        self._per_peer: dict[str, int] = {}
        self._handshaking = 0
        self._returned: list[tuple[_Conn, bool]] = []  # busy connections the workers handed back
        self._stopped = False  # the selector thread has ended: workers close what they hold
        self._ret_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._workers = ThreadPoolExecutor(self.limits.workers, thread_name_prefix=f"relay-{self.address[1]}")

    def start(self, handler: Handler) -> None:
        self.handler = handler
        t = threading.Thread(target=self._loop, name=f"relay-{self.address[1]}", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._closing.set()
        self._wake()
        for t in self._threads:
            t.join(2)
        if not self._threads:
            self._stop_serving()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._pool_lock:
            for conns in self._pool.values():
                for c, _ in conns:
                    c.close()
            self._pool.clear()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def connections(self) -> dict[str, int]:
        """Inbound connections now: handshaking, and authorized ones per peer (tests, status)."""
        with self._ret_lock:
            return {"handshaking": self._handshaking, **self._per_peer}

    # --- server side -------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _loop(self) -> None:
        sel = self._sel
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._closing.is_set():
                now = time.monotonic()
                waits = [c.deadline - now for c in self._conns if c.state != "busy"]
                for key, _ in sel.select(min([1.0, *waits]) if waits else 1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        self._resume()
                    elif key.data.state == "handshake":
                        self._handshake(key.data)
                    elif key.data.state == "refused":
                        self._drain(key.data)
                    else:
                        self._read(key.data)
                self._expire()
        except Exception:  # noqa: BLE001 - logged; the relay port is closed below
            log.exception("relay server loop failed")
        finally:
            self._stop_serving()

    def _stop_serving(self) -> None:
        with self._ret_lock:
            self._stopped = True
            returned, self._returned = self._returned, []
        for c, _ in returned:
            c.sock.close()
        for c in list(self._conns):
            if c.state == "busy":  # its worker closes it when it is done
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_RDWR)  # and a peer waiting for its reply gets none
            else:
                self._close(c)
        self._sel.close()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self) -> None:
        lim = self.limits
        while True:
            try:
                raw, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: let the backlog wait a little
                log.warning("relay accept failed: %s", exc)
                time.sleep(0.05)
                return
            if self._handshaking >= lim.max_handshakes:
                # The oldest handshake makes way: a real peer's takes milliseconds, so what is
                # still handshaking is mostly stalled, and a flood of silent connections cannot
                # hold every place for the whole handshake timeout (as SSH's MaxStartups drops).
                oldest = min((c for c in self._conns if c.state == "handshake"), key=lambda c: c.deadline)
                log.info("relay connection dropped: %d handshaking (limit %d), the oldest makes way",
                         self._handshaking, lim.max_handshakes)
                self._close(oldest)
            if len(self._conns) >= lim.max_connections:
                log.info("relay connection from %s refused: %d connections (limit %d)",
                         addr[0], len(self._conns), lim.max_connections)
                raw.close()
                continue
            try:
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a reply waited for Nagle and the delayed ACK
                sock = self.server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            c = _Conn(sock, time.monotonic() + lim.handshake_timeout)
            with self._ret_lock:
                self._handshaking += 1
            self._conns.add(c)
            self._handshake(c)

    def _want(self, c: _Conn, events: int) -> None:
        if c.events == events:
            return
        if c.events:
            self._sel.modify(c.sock, events, c)
        else:
            self._sel.register(c.sock, events, c)
        c.events = events

    def _unregister(self, c: _Conn) -> None:
        if c.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(c.sock)
            c.events = 0

    def _close(self, c: _Conn) -> None:
        self._unregister(c)
        with contextlib.suppress(OSError):
            c.sock.close()
        if c in self._conns:
            self._conns.discard(c)
            with self._ret_lock:
                if c.state == "handshake":
                    self._handshaking -= 1
                elif c.peer is not None:
                    self._per_peer[c.peer] -= 1
                    if not self._per_peer[c.peer]:
                        del self._per_peer[c.peer]

    def _expire(self) -> None:
        now = time.monotonic()
        for c in [c for c in self._conns if c.state != "busy" and c.deadline <= now]:
            if c.state == "handshake":
                log.info("relay connection closed: no authorized peer after %.1f s", self.limits.handshake_timeout)
            elif c.state == "idle":
                log.debug("idle relay connection from %s closed", c.peer)
            self._close(c)

    def _handshake(self, c: _Conn) -> None:
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(c, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(c, selectors.EVENT_WRITE)
            return
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("relay handshake refused: %s", exc)
            self._close(c)
            return
        try:
            peer = self._authorize(c.sock)
        except ConnectionError as exc:
            log.warning("relay connection refused: %s", exc)
            self._close(c)
            return
        with self._ret_lock:
            if self._per_peer.get(peer, 0) >= self.limits.max_per_peer:
                full = True
            else:
                full = False
                self._handshaking -= 1
                self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
                c.peer, c.state = peer, "idle"
        if full:
            log.warning("relay connection from %s refused: it has %d already", peer, self.limits.max_per_peer)
            # Said in a reply, so that the request the peer may send on it at once is known
            # refused unread (its link keys kept), rather than lost with the connection.
            refusal = json.dumps({"ok": False, "code": 503, "kept": True, "error": f"node {self.kme_id} takes "
                                  f"{self.limits.max_per_peer} relay connections from {peer} at most"}).encode()
            with self._ret_lock:
                self._handshaking -= 1
            c.state, c.deadline = "refused", time.monotonic() + 1.0  # read and dropped until then: a close
            with contextlib.suppress(OSError, ssl.SSLError):  # with unread input would reset the reply away
                c.sock.send(struct.pack(">I", len(refusal)) + refusal)
            self._want(c, selectors.EVENT_READ)
            return
        c.deadline = time.monotonic() + self.limits.idle_timeout
        self._want(c, selectors.EVENT_READ)
        self._read(c)  # a request may have come with the end of the handshake

    def _authorize(self, sock: ssl.SSLSocket) -> str:
        """The peer's KME ID, if it is one of ours (and has its pinned key); else ConnectionError."""
        der = sock.getpeercert(binary_form=True)
        if not der:
            raise ConnectionError("no peer certificate")
        role, cn = pki.role_of(der)
        peer = cn.lower()
        if not peer:
            raise ConnectionError("relay peer certificate has no common name")
        if self.pins is not None and role != "kme":
            raise ConnectionError(f"the certificate of {peer} is not a KME certificate")
        if peer not in self.peers:
            raise ConnectionError(f"{peer} is not a neighbour of this node")
        if self.pins is not None and self.pins.get(peer) != pki.spki_pin(der):
            raise ConnectionError(f"the key of {peer} is not the one pinned for it")
        return peer

    def _drain(self, c: _Conn) -> None:
        """Input on a refused connection: dropped; closed at its end or its deadline."""
        try:
            while c.sock.recv(65536):
                pass
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ssl.SSLError):
            pass
        self._close(c)

    def _read(self, c: _Conn) -> None:
        """Read what the peer sent; a complete frame goes to a worker."""
        try:
            while len(c.buf) < 4 + MAX_FRAME:
                chunk = c.sock.recv(65536)
                if not chunk:
                    self._close(c)
                    return
                c.buf += chunk
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (OSError, ssl.SSLError):
            self._close(c)
            return
        if len(c.buf) < 4:
            return
        (n,) = struct.unpack(">I", c.buf[:4])
        if n > MAX_FRAME:
            log.warning("relay frame too large from %s", c.peer)
            self._close(c)
            return
        if len(c.buf) < 4 + n:
            return
        body = bytes(c.buf[4 : 4 + n])
        del c.buf[: 4 + n]
        self._unregister(c)
        c.state = "busy"
        try:
            self._workers.submit(self._answer, c, body)
        except RuntimeError:  # shut down
            self._close(c)

    def _answer(self, c: _Conn, body: bytes) -> None:
        ok = False
        try:
            ok = self._answer_one(c, body)
        finally:
            with self._ret_lock:
                stopped = self._stopped
                if not stopped:
                    self._returned.append((c, ok))
            if stopped:
                with contextlib.suppress(OSError):
                    c.sock.close()
            else:
                self._wake()

    def _answer_one(self, c: _Conn, body: bytes) -> bool:
        try:
            msg = json.loads(body)
        except ValueError:
            return False
        if not isinstance(msg, dict):
            return False
        peer = c.peer
        assert peer is not None
        try:
            assert self.handler is not None
            reply = self.handler(peer, msg)
        except RelayError as exc:
            reply = {"ok": False, "code": exc.code, "error": str(exc), **({"kept": True} if exc.kept else {})}
        except Exception:  # noqa: BLE001 - one bad message must not stop the channel
            log.exception("relay message from %s failed", peer)
            reply = {"ok": False, "code": 503, "error": "internal error at the relay node"}
        if self._closing.is_set():  # a closed forwarder answers nothing more
            return False
        try:
            c.sock.settimeout(self.timeout)
            _send_frame(c.sock, reply)
            c.sock.setblocking(False)
        except OSError:
            return False
        return True

    def _resume(self) -> None:
        """Connections back from the workers wait for their next request (or are closed)."""
        with self._ret_lock:
            returned, self._returned = self._returned, []
        for c, ok in returned:
            if not ok or self._closing.is_set():
                c.state = "idle"
                self._close(c)
                continue
            c.state, c.deadline = "idle", time.monotonic() + self.limits.idle_timeout
            self._want(c, selectors.EVENT_READ)
            self._read(c)  # the next request may be there already (or in the TLS buffer)

    # --- client side -------------------------------------------------------------------

    def request(self, peer: str, msg: dict[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
        """Send one message to an adjacent KME and return its reply (raises RelayError, whose
        `sent` and `kept` say what became of the message). A pooled connection that fails
        takes the peer's other pooled connections with it (the peer most likely restarted);
        an `idempotent` message (one that uses no key) is then sent once more on a fresh one.
        At most limits.max_per_peer requests to one peer are in flight (so at most as many
        connections, what the peer accepts from us when its limits are ours); more wait."""
        peer = peer.lower()
        slot = self._slot(peer)
        if not slot.acquire(timeout=self.timeout):
            raise RelayError(f"relay to {peer}: {self.limits.max_per_peer} requests in flight already", sent=False)
        t0, ok = time.monotonic(), False
        try:
            reply = self._request(peer, msg, idempotent)
            ok = True
            return reply
        finally:
            slot.release()
            if self.observe is not None:
                self.observe(peer, str(msg.get("op", "")), time.monotonic() - t0, ok)

    def _slot(self, peer: str) -> threading.BoundedSemaphore:
        with self._pool_lock:
            slot = self._slots.get(peer)
            if slot is None:
                slot = self._slots[peer] = threading.BoundedSemaphore(self.limits.max_per_peer)
            return slot

    def _request(self, peer: str, msg: dict[str, Any], idempotent: bool) -> dict[str, Any]:
        sock, pooled = self._checkout(peer)
        try:
            _send_frame(sock, msg)
            reply = _recv_frame(sock)
        except (OSError, ConnectionError, ValueError) as exc:
            sock.close()
            if pooled:
                self._drop_pool(peer)
                if idempotent:
                    return self._request(peer, msg, False)
            raise RelayError(f"relay to {peer} failed: {exc}") from None
        self._checkin(peer, sock)
        if not reply.get("ok"):
            raise RelayError(str(reply.get("error", "refused")), int(reply.get("code", 503)), kept=reply.get("kept") is True)
        return reply

    def _checkout(self, peer: str) -> tuple[ssl.SSLSocket, bool]:
        """A connection to `peer`, and whether it came from the pool (it may be stale).
        RelayError(sent=False) when none can be made: nothing was sent."""
        stale = time.monotonic() - self.limits.pool_idle
        with self._pool_lock:
            conns = self._pool.get(peer, [])
            while conns:
                sock, used = conns.pop()
                if used > stale and not _closed_by_peer(sock):
                    return sock, True
                sock.close()  # closed by the peer, or about to be (its idle timeout)
        addr = self.peers.get(peer)
        if addr is None:
            raise RelayError(f"no relay address for node {peer}", sent=False)
        try:
            raw = socket.create_connection(addr, timeout=self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, one per request
            sock = self.client_ctx.wrap_socket(raw, server_hostname=addr[0])
        except (OSError, ssl.SSLError) as exc:
            raise RelayError(f"cannot reach the relay of node {peer}: {exc}", sent=False) from None
        try:
            if self._authorize(sock) != peer:
                raise ConnectionError(f"relay at {addr} is not node {peer}")
        except ConnectionError as exc:
            sock.close()
            raise RelayError(str(exc), sent=False) from None
        return sock, False

    def _drop_pool(self, peer: str) -> None:
        with self._pool_lock:
            conns = self._pool.pop(peer, [])
        for c, _ in conns:
            c.close()

    def _checkin(self, peer: str, sock: ssl.SSLSocket) -> None:
        with self._pool_lock:
            self._pool.setdefault(peer, []).append((sock, time.monotonic()))
