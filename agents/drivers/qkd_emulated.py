"""An emulated QKD module (one ETSI 015 qkd_interface), kind "qkd-emulated".

Two modules of a PHYS link behave like a vendor pair: the transmitter opens the
service channel (service_channel.py: TCP on loopback, both prove they hold the
lab's service key, fresh X25519 session keys) to the receiver's module and both
get a fresh per-link secret. Then, every tick, the transmitter looks at the plant (is
there light to the peer, how much loss, which classical channels share the
fibres) and at its profile's physics, decides how many secret bits the tick
distilled, and sends "block i: n bits, QBER q". Both ends turn accepted blocks
into keys derived from (secret, block, index) — see `KeyStream` — so they hand
identical key streams, in the same order, to their key sinks (the LKMS).

Link status follows ETSI 015: PENDING while the service channel is not up,
ACTIVE while the channel yields key, PASSIVE while it does not (the reason says
why: loss, QBER, fibre cut, crosstalk, failed module...), OFF when disabled.

Threads: one accept thread per module, one per inbound service session, one per
transmitting link, and a failure clock when the profile has an mtbf. They call
`emit` and the key sink directly, so both must return quickly.
"""
from __future__ import annotations

import collections
import hmac
import logging
import math
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sdqkd.agents.drivers import profile as physics
from sdqkd.agents.drivers import service_channel as sc
from sdqkd.agents.drivers.base import Change, Driver, DriverError, Emit, Event
from sdqkd.agents.drivers.plant import Plant
from sdqkd.agents.drivers.profile import QkdProfile, identity_name

log = logging.getLogger(__name__)

KeySink = Callable[[str, str, bytes], None]
PeerAddress = Callable[[str, int], "tuple[str, int] | None"]
NodeOf = Callable[[str], "str | None"]

FAILURE_KINDS = ("module", "service-channel")
CROSSTALK_QBER = 25.0     # percent added when classical light sits on/next to the quantum channel
DARK_QBER = 50.0          # no light: detectors see only dark counts
_MAX_BACKOFF = 2.0
_WINDOW = 20              # blocks in the measured-SKR window


# --- key stream -------------------------------------------------------------------


class KeyStream:
    """Keys both ends derive from the link secret and the accepted blocks.

    Bits accumulate across blocks (a slow link needs many ticks per key); the j-th
    key completed in block i is HMAC-SHA256(secret, "key"|i|j|counter) truncated
    to the key size, and its ID a UUID made from HMAC(secret, "id"|i|j)."""

    def __init__(self, secret: bytes, key_bits: int) -> None:
        if key_bits <= 0 or key_bits % 8:
            raise ValueError("key size must be a positive multiple of 8 bits")
        self._secret = secret
        self._key_bytes = key_bits // 8
        self.key_bits = key_bits
        self.pending_bits = 0

    def feed(self, block: int, bits: int) -> list[tuple[str, bytes]]:
        """Add a block's distilled bits; the keys it completes, in order."""
        self.pending_bits += max(0, bits)
        out = []
        j = 0
        while self.pending_bits >= self.key_bits:
            self.pending_bits -= self.key_bits
            out.append(self._key(block, j))
            j += 1
        return out

    def _key(self, block: int, j: int) -> tuple[str, bytes]:
        label = struct.pack(">QI", block, j)
        material = b"".join(
            hmac.digest(self._secret, b"key" + label + struct.pack(">I", c), "sha256")
            for c in range(math.ceil(self._key_bytes / 32)))[: self._key_bytes]
        raw = bytearray(hmac.digest(self._secret, b"id" + label, "sha256")[:16])
        raw[6] = (raw[6] & 0x0F) | 0x40  # RFC 4122 version 4 / variant bits
        raw[8] = (raw[8] & 0x3F) | 0x80
        return str(uuid.UUID(bytes=bytes(raw))), material


# --- link bookkeeping ------------------------------------------------------------------


@dataclass(frozen=True)
class LinkConfig:
    """What a QKD module needs of its ETSI 015 PHYS qkd_link entry (shared by the QKD drivers)."""

    qkdl_id: str
    enabled: bool
    remote_qkdn: str | None
    remote_qkdi: int | None
    wavelength: int | None
    role: str | None            # phys_qkd_role, bare identity
    attenuation: float | None   # phys_channel_att


@dataclass(eq=False)
class _Link:
    cfg: LinkConfig
    role: str = "RECEIVER"
    status: str = "OFF"
    reason: str = ""
    qber: float = 0.0
    key_bits: int = 0
    window: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))
    stop: threading.Event = field(default_factory=threading.Event)
    wire: sc.Wire | None = None
    blocks: int = 0

    def skr(self) -> int:
        dt = sum(d for _, d in self.window)
        return int(sum(b for b, _ in self.window) / dt) if dt > 0 else 0


def link_config(entry: Mapping[str, Any], key: str) -> LinkConfig:
    """Parse a qkd_link entry (RFC 7951 JSON); a bad value is DriverError invalid-value."""
    remote = entry.get("qkdl_remote") or {}
    wl = entry.get("phys_wavelength")
    att = entry.get("phys_channel_att")
    try:
        return LinkConfig(
            qkdl_id=str(entry.get("qkdl_id", key)),
            enabled=bool(entry.get("qkdl_enable", True)),
            remote_qkdn=remote.get("qkdn_id"),
            remote_qkdi=None if remote.get("qkdi_id") is None else int(remote["qkdi_id"]),
            wavelength=None if wl is None else int(wl),
            role=identity_name(entry["phys_qkd_role"]) if entry.get("phys_qkd_role") else None,
            attenuation=None if att is None else float(att),
        )
    except (TypeError, ValueError) as exc:
        raise DriverError("invalid-value", f"qkd_link {key}: {exc}") from None


def owns_link(entry: Mapping[str, Any], qkdn_id: str, qkdi_id: int) -> bool:
    """True when `entry` is a PHYS link whose local end is this QKD interface."""
    local = entry.get("qkdl_local") or {}
    if identity_name(entry.get("qkdl_type", "PHYS")) != "PHYS":
        return False
    try:
        if local.get("qkdi_id") is None or int(local["qkdi_id"]) != qkdi_id:
            return False
    except (TypeError, ValueError):
        return False
    return local.get("qkdn_id") in (None, qkdn_id)


def link_role(cfg: LinkConfig, module_role: str, qkdn_id: str, qkdi_id: int) -> str:
    """The link's role, else the module's, else the lower (qkdn_id, qkdi_id) transmits,
    so two transceivers agree without talking."""
    if cfg.role in ("TRANSMITTER", "RECEIVER"):
        return cfg.role
    if module_role in ("TRANSMITTER", "RECEIVER"):
        return module_role
    mine, theirs = (qkdn_id, qkdi_id), (cfg.remote_qkdn or "", cfg.remote_qkdi or 0)
    return "TRANSMITTER" if mine < theirs else "RECEIVER"


class ModuleLog(logging.LoggerAdapter):
    """Prefixes a module's records with node:qkdi_id, as the lab has many modules per log."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['where']}] {msg}", kwargs


# --- the driver ----------------------------------------------------------------------------


class EmulatedQkdModule(Driver):
    """One emulated QKD module; serves at most one enabled PHYS link at a time."""

    kind: ClassVar[str] = "qkd-emulated"

    def __init__(self, node: str, qkdn_id: str, qkdi_id: int, profile: QkdProfile, role: str,
                 plant: Plant, *, peer_address: PeerAddress, node_of: NodeOf, key_sink: KeySink,
                 service_key: bytes, listen: tuple[str, int] = ("127.0.0.1", 0), key_size: int = 256,
                 tick: float = 0.1, time_scale: float = 1.0, perf_every: int = 10,
                 channel: int | None = None, mttr: float | None = 60.0, seed: int | None = None) -> None:
        """role: TRANSMITTER / RECEIVER (or TRANSCEIVER: then the link's phys_qkd_role decides);
        tick: wall seconds between blocks; time_scale: emulated seconds per wall second;
        channel: fixed DWDM channel of the module, if any; mttr: mean emulated seconds to
        self-repair after a random (mtbf) failure, None = until repair()."""
        role = identity_name(role)
        if not profile.supports_role(role):
            raise ValueError(f"profile '{profile.name}' does not support role {role}")
        if key_size <= 0 or key_size % 8:
            raise ValueError("key size must be a positive multiple of 8 bits")
        self.node, self.qkdn_id, self.qkdi_id = node, qkdn_id, int(qkdi_id)
        self.profile, self.role, self.plant = profile, role, plant
        self.channel = channel
        self._peer_address, self._node_of, self._sink = peer_address, node_of, key_sink
        self._service_key = bytes(service_key)
        self._listen = listen
        self.key_size, self.tick, self.time_scale = key_size, float(tick), float(time_scale)
        self.perf_every, self.mttr = max(1, perf_every), mttr
        self._rng = random.Random(seed)
        self._fail_rng = random.Random(None if seed is None else seed + 1)
        self._lock = threading.RLock()
        self._links: dict[str, _Link] = {}
        self._iface = "DISABLED"
        self._repair_at: float | None = None
        self._emit: Emit = lambda event: None
        self._listener: sc.Listener | None = None
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wires: set[sc.Wire] = set()
        self.address: tuple[str, int] | None = None
        self._log = ModuleLog(log, {"where": f"{node}:{qkdi_id}"})

    # --- Driver ---------------------------------------------------------------------

    def open(self, emit: Emit) -> None:
        """Listen on the service address (see `address`), start enabled links."""
        self._emit = emit
        listener = sc.Listener(self._listen)
        self._listener, self.address = listener, listener.address
        with self._lock:
            self._iface = "ENABLED"
        self._spawn(listener.serve, "accept", lambda conn: self._spawn(self._serve, "rx", conn))
        if self.profile.mtbf:
            self._spawn(self._failure_clock, "mtbf")
        for link in list(self._links.values()):
            self._start(link)

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            links = list(self._links.values())
            self._iface = "DISABLED"
            wires = list(self._wires)
        for link in links:
            link.stop.set()
        for wire in wires:
            wire.close(bye="module closed")
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)

    def handles(self, change: Change) -> bool:
        if change.kind != "qkd-link":
            return False
        return any(self._ours(e) for e in (change.new, change.old) if e is not None)

    def check(self, change: Change) -> None:
        entry = change.new
        if entry is None or not self._ours(entry):
            return
        cfg = link_config(entry, change.key)
        p = self.profile
        if cfg.wavelength is not None and self.channel is None and not p.supports_channel(cfg.wavelength):
            raise DriverError("invalid-value", f"phys_wavelength {cfg.wavelength} is outside "
                                               f"{p.model or p.name}'s range {p.wavelength_range}")
        if cfg.role is not None:
            if cfg.role not in ("TRANSMITTER", "RECEIVER") or not p.supports_role(cfg.role):
                raise DriverError("invalid-value", f"phys_qkd_role {cfg.role} is not supported "
                                                   f"(module supports {p.role_support})")
            if self.role != "TRANSCEIVER" and cfg.role != self.role:
                raise DriverError("invalid-value", f"this module is a {self.role}, not a {cfg.role}")
        if cfg.attenuation is not None and cfg.attenuation > p.max_absorption:
            raise DriverError("invalid-value", f"phys_channel_att {cfg.attenuation} dB is over the "
                                               f"module's max absorption {p.max_absorption} dB")
        if cfg.enabled:
            if cfg.remote_qkdn is None or cfg.remote_qkdi is None:
                raise DriverError("invalid-value", "qkdl_remote qkdn_id and qkdi_id are needed")
            with self._lock:
                busy = [k for k, ln in self._links.items() if ln.cfg.enabled and k != cfg.qkdl_id]
            if busy:
                raise DriverError("resource-denied", f"QKD interface {self.qkdi_id} already serves link {busy[0]}")

    def apply(self, change: Change) -> None:
        entry = change.new if change.new is not None and self._ours(change.new) else None
        key = str((change.new or change.old or {}).get("qkdl_id", change.key))
        with self._lock:
            old = self._links.pop(key, None)
        if entry is None:
            if old is not None:
                self._stop(old, "link deleted")
            return
        cfg = link_config(entry, change.key)
        if old is not None and old.cfg == cfg:
            with self._lock:
                self._links[key] = old
            return
        link = _Link(cfg, role=self._role_for(cfg))
        if old is not None:  # the new entry takes over counters and status, so events show changes only
            link.key_bits, link.status, link.reason = old.key_bits, old.status, old.reason
            self._stop(old, "link reconfigured" if cfg.enabled else "disabled", report=False)
        with self._lock:
            self._links[key] = link
        if not cfg.enabled:
            self._set_status(link, "OFF", "disabled", force=True)
        elif self._listener is not None and not self._closing.is_set():
            self._start(link)

    def state(self) -> dict[str, Any]:
        p = self.profile
        with self._lock:
            return {
                "interface": {
                    "qkdi_id": self.qkdi_id,
                    "status": self._iface,
                    "model": p.model or p.name,
                    "technology": p.technology,
                    "role_support": f"{physics.IDENTITY_MODULE}:{self.role}",
                    "wavelength_range": str(self.channel) if self.channel else p.wavelength_range,
                    "max_absorption": p.max_absorption,
                },
                "links": {k: {"status": ln.status, "reason": ln.reason, "skr": ln.skr(),
                              "qber": round(ln.qber, 4), "key_bits": ln.key_bits}
                          for k, ln in self._links.items()},
            }

    # --- failures ---------------------------------------------------------------------

    def inject_failure(self, kind: str = "module") -> None:
        """'module': the interface is FAILED until repair(); 'service-channel': drop the
        service sessions now (the transmitter reconnects)."""
        if kind == "module":
            with self._lock:
                self._repair_at = None
            self._set_iface("FAILED", "injected module failure")
        elif kind == "service-channel":
            with self._lock:
                wires = list(self._wires)
            for wire in wires:
                wire.close()
        else:
            raise ValueError(f"unknown failure kind '{kind}'; known: {', '.join(FAILURE_KINDS)}")

    def repair(self) -> None:
        with self._lock:
            self._repair_at = None
        self._set_iface("ENABLED", "repaired")

    # --- internals: bookkeeping ------------------------------------------------------------

    def _ours(self, entry: Mapping[str, Any]) -> bool:
        return owns_link(entry, self.qkdn_id, self.qkdi_id)

    def _role_for(self, cfg: LinkConfig) -> str:
        return link_role(cfg, self.role, self.qkdn_id, self.qkdi_id)

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"qkd-{self.node}:{self.qkdi_id}-{name}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _track(self, wire: sc.Wire, live: bool) -> None:
        with self._lock:
            (self._wires.add if live else self._wires.discard)(wire)

    def _start(self, link: _Link) -> None:
        if not link.cfg.enabled:
            return
        self._set_status(link, "PENDING", "waiting for the service channel")
        if link.role == "TRANSMITTER":
            self._spawn(self._transmit, "tx", link)

    def _stop(self, link: _Link, reason: str, report: bool = True) -> None:
        """Stop a link without waiting for its threads (they may be inside emit)."""
        link.stop.set()
        wire = link.wire
        if wire is not None:
            wire.close(bye=reason)
        if report:
            self._set_status(link, "OFF", reason, force=True)

    def _safe_emit(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._emit(Event(kind, data))
        except Exception:  # a bad handler must not stop the module
            self._log.exception("%s handler failed", kind)

    def _set_status(self, link: _Link, status: str, reason: str, force: bool = False) -> None:
        with self._lock:
            if (link.stop.is_set() and not force) or (link.status, link.reason) == (status, reason):
                return
            changed = link.status != status
            link.status, link.reason = status, reason
        if changed:
            self._log.info("link %s %s (%s)", link.cfg.qkdl_id, status, reason)
        self._safe_emit("link-status", {"qkdl_id": link.cfg.qkdl_id, "status": status, "reason": reason})

    def _set_iface(self, status: str, reason: str) -> None:
        with self._lock:
            if self._iface == status or self._iface == "DISABLED":
                return
            self._iface = status
            wires = [ln.wire for ln in self._links.values() if ln.role == "RECEIVER" and ln.wire]
        self._log.warning("interface %s (%s)", status, reason)
        self._safe_emit("interface-status", {"qkdi_id": self.qkdi_id, "status": status, "reason": reason})
        for wire in wires:  # tell transmitters: a failed receiver detects nothing
            try:
                wire.send({"t": "status", "interface": status})
            except OSError:
                pass

    def _account(self, link: _Link, block: int, bits: int, dt: float, qber_pct: float,
                 stream: KeyStream) -> None:
        """Record an accepted block and hand its keys to the sink (never logs key bytes)."""
        keys = stream.feed(block, bits)
        with self._lock:
            if link.stop.is_set():
                return
            link.window.append((bits, dt))
            link.qber = qber_pct / 100.0
            link.key_bits += len(keys) * self.key_size
            link.blocks += 1
            perf = link.blocks % self.perf_every == 0
        for key_id, key in keys:
            try:
                self._sink(link.cfg.qkdl_id, key_id, key)
            except Exception as exc:  # type only: a careless sink's message might quote the key
                self._log.error("key sink failed for link %s key %s: %s", link.cfg.qkdl_id, key_id,
                                type(exc).__name__)
        if perf:
            self._safe_emit("link-perf", {"qkdl_id": link.cfg.qkdl_id, "skr": link.skr(),
                                          "qber": round(link.qber, 4)})

    # --- internals: physics ---------------------------------------------------------------------

    def _evaluate(self, link: _Link, seconds: float, peer_failed: bool,
                  budget: float) -> tuple[int, float, str | None]:
        """(bits distilled over `seconds`, QBER percent, reason for no key)."""
        p = self.profile
        last = link.qber * 100.0
        if self._iface == "FAILED":
            return 0, last, "transmitter interface failed"
        if peer_failed:
            return 0, last, "receiver interface failed"
        peer_node = self._node_of(link.cfg.remote_qkdn or "")
        if peer_node is None:
            return 0, last, "peer node unknown"
        wavelength = self.channel or (link.cfg.wavelength if p.band == "C-band" else None)
        try:
            ch = self.plant.trace(self.node, self.qkdi_id, wavelength)
        except KeyError:
            ch = None
        if ch is None:
            return 0, DARK_QBER, "no light path"
        if (ch.peer_node, ch.peer_qkdi_id) != (peer_node, link.cfg.remote_qkdi):
            return 0, DARK_QBER, f"light reaches {ch.peer_node}:{ch.peer_qkdi_id}, not the peer"
        if ch.cut:
            return 0, DARK_QBER, "fibre cut"
        if ch.blocked:
            return 0, DARK_QBER, f"channel {wavelength} blocked by the mux on {ch.blocked[0]}"
        classical = ch.classical_in_band(p.band)
        crosstalk = p.band == "C-band" and ch.crosstalk
        qber = physics.sample_qber(p, ch.loss_db, classical, self._rng)
        if crosstalk:
            qber = min(DARK_QBER, qber + CROSSTALK_QBER)
        reason = physics.no_key_reason(p, ch.loss_db, qber, crosstalk, budget)
        if reason is not None:
            return 0, qber, reason
        return physics.distilled_bits(p, ch.loss_db, classical, qber, seconds, self._rng,
                                      budget_db=budget), qber, None

    # --- internals: transmitter -----------------------------------------------------------------

    def _transmit(self, link: _Link) -> None:
        """Connect, pair, run blocks; on loss of the channel go PENDING and retry with backoff."""
        backoff = self.tick
        while not link.stop.is_set():
            try:
                wire, secret, ready = self._pair_as_transmitter(link)
            except Exception as exc:
                if not isinstance(exc, (sc.Refused, OSError, ConnectionError, ValueError, KeyError)):
                    self._log.exception("pairing link %s failed", link.cfg.qkdl_id)
                reason = str(exc) if isinstance(exc, sc.Refused) else f"cannot pair: {exc}"
                self._set_status(link, "PENDING", reason)
                link.stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = self.tick
            try:
                self._run_blocks(link, wire, secret, ready)
                reason = "stopped"
            except Exception as exc:
                if not isinstance(exc, (OSError, ConnectionError, ValueError, KeyError)):
                    self._log.exception("link %s session failed", link.cfg.qkdl_id)
                reason = f"service channel lost: {exc}"
            finally:
                with self._lock:
                    if link.wire is wire:
                        link.wire = None
                self._track(wire, False)
                wire.close()
            self._set_status(link, "PENDING", reason)
            link.stop.wait(self.tick)

    def _pair_as_transmitter(self, link: _Link) -> tuple[sc.Wire, bytes, dict[str, Any]]:
        cfg = link.cfg
        addr = self._peer_address(cfg.remote_qkdn or "", cfg.remote_qkdi or 0)
        if addr is None:
            raise sc.Refused("peer service address unknown")
        wire = sc.Wire.connect(addr)
        self._track(wire, True)
        try:
            session = sc.initiate(wire, self._service_key, self.kind, cfg.qkdl_id,
                                  sc.Endpoint(self.qkdn_id, self.qkdi_id),
                                  sc.Endpoint(cfg.remote_qkdn or "", cfg.remote_qkdi or 0))
            wire.settimeout(max(5.0, 10 * self.tick))
        except BaseException:
            self._track(wire, False)
            wire.close()
            raise
        with self._lock:
            if link.stop.is_set():
                self._track(wire, False)
                wire.close(bye="stopped")
                raise sc.Refused("link stopped")
            link.wire = wire
        challenge = session.peer
        peer = {"max_absorption": float(challenge.get("max_absorption", self.profile.max_absorption)),
                "interface": challenge.get("interface", "ENABLED")}
        return wire, session.secret, peer

    def _run_blocks(self, link: _Link, wire: sc.Wire, secret: bytes, peer: dict[str, Any]) -> None:
        stream = KeyStream(secret, self.key_size)
        budget = min(self.profile.max_absorption, peer["max_absorption"])
        peer_failed = peer["interface"] == "FAILED"
        pending: dict[int, tuple[int, float, float]] = {}
        block, last = 0, time.monotonic()
        next_tick = last + self.tick
        while not link.stop.is_set():
            if wire.readable(next_tick - time.monotonic()):
                msg = wire.recv()
                kind = msg.get("t")
                if kind == "ack":
                    bits, dt, qber = pending.pop(int(msg["i"]))  # a refused block counts as no key
                    self._account(link, int(msg["i"]), bits if msg.get("ok") else 0, dt, qber, stream)
                elif kind == "status":
                    peer_failed = msg.get("interface") == "FAILED"
                elif kind == "bye":
                    raise ConnectionError(f"peer closed ({msg.get('reason', '')})")
                continue
            now = time.monotonic()
            seconds = min(now - last, 5 * self.tick) * self.time_scale
            last, next_tick = now, max(next_tick + self.tick, now + self.tick / 2)
            bits, qber, reason = self._evaluate(link, seconds, peer_failed, budget)
            wire.send({"t": "block", "i": block, "bits": bits, "qber": round(qber, 4),
                       "dt": seconds, "reason": reason})
            pending[block] = (bits, seconds, qber)
            block += 1
            if reason is None:
                self._set_status(link, "ACTIVE", "key flowing")
            else:
                with self._lock:
                    link.qber = qber / 100.0
                self._set_status(link, "PASSIVE", reason)

    # --- internals: receiver ---------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        wire = sc.Wire(conn)
        self._track(wire, True)
        link: _Link | None = None
        try:
            paired = self._pair_as_receiver(wire)
            if paired is None:
                return
            link = paired[0]
            self._receive_blocks(link, wire, paired[1])
        except Exception as exc:
            if not isinstance(exc, (OSError, ConnectionError, ValueError, KeyError)):
                self._log.exception("service session failed")
            if link is not None:
                self._set_status(link, "PENDING", f"service channel lost: {exc}")
        finally:
            self._track(wire, False)
            wire.close()
            if link is not None:
                with self._lock:
                    if link.wire is wire:
                        link.wire = None

    def _refusal(self, hello: Mapping[str, Any]) -> tuple[_Link | None, str | None]:
        with self._lock:
            link = self._links.get(str(hello.get("qkdl_id")))
            if link is None:
                return None, "unknown link"
            if not link.cfg.enabled or link.stop.is_set():
                return link, "link not enabled at the receiver"
            mismatch = sc.endpoint_mismatch(hello, sc.Endpoint(self.qkdn_id, self.qkdi_id),
                                            sc.Endpoint(link.cfg.remote_qkdn or "", link.cfg.remote_qkdi or 0))
            if mismatch is not None:
                return link, mismatch
            if link.role != "RECEIVER":
                return link, "both ends are transmitters"
        return link, None

    def _pair_as_receiver(self, wire: sc.Wire) -> tuple[_Link, KeyStream] | None:
        try:
            hello = sc.read_hello(wire, self.kind)
        except sc.Refused as exc:
            self._log.warning("service channel pairing refused: %s", exc)
            return None
        link, refusal = self._refusal(hello)
        if refusal is not None:
            wire.refuse(refusal)
            return None
        assert link is not None
        try:
            session = sc.respond(wire, self._service_key, self.kind, hello,
                                 {"max_absorption": self.profile.max_absorption, "interface": self._iface})
        except sc.AuthenticationFailed:
            self._log.warning("service channel pairing for link %s refused: authentication failed",
                              link.cfg.qkdl_id)
            self._set_status(link, "PENDING", "service channel authentication failed")
            wire.refuse("authentication failed")
            return None
        wire.settimeout(None)  # close() and stop() shut the socket down
        with self._lock:
            if link.stop.is_set():
                return None
            old, link.wire = link.wire, wire
        if old is not None:  # the transmitter reconnected before we noticed the drop
            old.close()
        return link, KeyStream(session.secret, self.key_size)

    def _receive_blocks(self, link: _Link, wire: sc.Wire, stream: KeyStream) -> None:
        expect = 0
        while not link.stop.is_set():
            msg = wire.recv()
            kind = msg.get("t")
            if kind == "bye":
                self._set_status(link, "PENDING", f"peer stopped ({msg.get('reason', '')})")
                return
            if kind != "block":
                continue
            block = int(msg["i"])
            if block != expect:
                raise ConnectionError(f"block {block} out of order (expected {expect})")
            expect += 1
            ok = self._iface != "FAILED"
            self._account(link, block, int(msg["bits"]) if ok else 0, float(msg["dt"]),
                          float(msg["qber"]), stream)
            wire.send({"t": "ack", "i": block, "ok": ok})
            reason = msg.get("reason")
            if not ok:
                self._set_status(link, "PASSIVE", "receiver interface failed")
            elif reason:
                with self._lock:
                    link.qber = float(msg["qber"]) / 100.0
                self._set_status(link, "PASSIVE", str(reason))
            else:
                self._set_status(link, "ACTIVE", "key flowing")

    # --- internals: spontaneous failures -----------------------------------------------------------

    def _failure_clock(self) -> None:
        """Random failures at the profile's mtbf (emulated time), self-repair after ~mttr."""
        mtbf = float(self.profile.mtbf or 0)
        while not self._closing.wait(self.tick):
            dt = self.tick * self.time_scale
            with self._lock:
                iface, repair_at = self._iface, self._repair_at
            if iface == "ENABLED" and self._fail_rng.random() < 1 - math.exp(-dt / mtbf):
                with self._lock:
                    self._repair_at = (time.monotonic() + self._fail_rng.expovariate(1 / self.mttr)
                                       / self.time_scale) if self.mttr else None
                self._set_iface("FAILED", "random failure (mtbf)")
            elif iface == "FAILED" and repair_at is not None and time.monotonic() >= repair_at:
                self.repair()
