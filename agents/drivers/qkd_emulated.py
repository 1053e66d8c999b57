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

Key buffer: a block's keys are stored only when both ends' key stores have room
(`key_room`; the transmitter says whether it has with the block, the receiver
answers whether the block was kept). A full store stops storing, not distilling:
the link stays ACTIVE and its SKR is still what the physics gives.

Link status follows ETSI 015: PENDING while the service channel is not up,
ACTIVE while the channel yields key, PASSIVE while it does not (the reason says
why: loss, QBER, fibre cut, crosstalk, failed module...), OFF when disabled.

Threads: one accept thread per module, one per inbound service session, one per
transmitting link, and a failure clock when the profile has an mtbf. They call
`emit` and the key sink directly, so both must return quickly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import struct
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from sdqkd import qkdprofile as physics
from sdqkd.agents.drivers import service_channel as sc
from sdqkd.agents.drivers.base import DriverError
from sdqkd.agents.emulation.plant import Plant
from sdqkd.qkdprofile import QkdProfile, identity_name
from sdqkd.agents.drivers.qkd_link import BlockMeter, KeyRoom, KeySink, Link, LinkConfig, NodeOf, PeerAddress, QkdModule

__all__ = ["EmulatedQkdModule", "KeySink", "KeyStream", "NodeOf", "PeerAddress"]

log = logging.getLogger(__name__)

FAILURE_KINDS = ("module", "service-channel")
CROSSTALK_QBER = 25.0     # percent added when classical light sits on/next to the quantum channel
DARK_QBER = 50.0          # no light: detectors see only dark counts
_MAX_BACKOFF = 2.0
_WINDOW = 20              # blocks in the measured-SKR window


# --- key stream -------------------------------------------------------------------


class KeyStream:
    """Keys both ends derive from the link secret and the accepted blocks.

    Bits accumulate across blocks (a slow link needs many ticks per key). The keys
    block i completes come from one SHAKE256 output keyed by the secret (a PRF: the
    sponge has no length extension; KMAC256 is its standard form, not in hashlib):
    SHAKE256("sdqkd-keystream" | len(secret) | secret | i), read as 16 bytes of UUID
    (version 4 bits set) then the key, key after key. One XOF call per block instead
    of two HMACs per key: a 2.8 Mb/s link makes 11,000 keys a second, and what a real
    device does in hardware should not take the agent's CPU."""

    def __init__(self, secret: bytes, key_bits: int) -> None:
        if key_bits <= 0 or key_bits % 8:
            raise ValueError("key size must be a positive multiple of 8 bits")
        self._prefix = b"sdqkd-keystream" + struct.pack(">H", len(secret)) + secret
        self._key_bytes = key_bits // 8
        self.key_bits = key_bits
        self.pending_bits = 0

    def feed(self, block: int, bits: int) -> list[tuple[str, bytes]]:
        """Add a block's distilled bits; the keys it completes, in order."""
        self.pending_bits += max(0, bits)
        n, self.pending_bits = divmod(self.pending_bits, self.key_bits)
        if not n:
            return []
        step = 16 + self._key_bytes
        xof = hashlib.shake_256(self._prefix + struct.pack(">Q", block)).digest(n * step)
        return [_key_at(xof, i * step, self._key_bytes) for i in range(n)]


def _key_at(xof: bytes, at: int, key_bytes: int) -> tuple[str, bytes]:
    """(UUID string, key) from 16 + key_bytes bytes of the key stream at `at`."""
    h = xof[at:at + 16].hex()
    # RFC 4122 version 4 and variant bits over the random ones
    v, r = "4", "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-{v}{h[13:16]}-{r}{h[17:20]}-{h[20:32]}", xof[at + 16:at + 16 + key_bytes]


# --- link bookkeeping ------------------------------------------------------------------


@dataclass(eq=False)
class _Link(Link):
    """A link whose key comes in blocks, one per tick."""

    meter: BlockMeter
    qber: float = 0.0
    full: bool = False  # the last block with key was not kept (a key store full)
    blocks: int = 0


# --- the driver ----------------------------------------------------------------------------


class EmulatedQkdModule(QkdModule):
    """One emulated QKD module; serves at most one enabled PHYS link at a time."""

    kind: ClassVar[str] = "qkd-emulated"

    def __init__(self, node: str, qkdn_id: str, qkdi_id: int, profile: QkdProfile, role: str,
                 plant: Plant, *, peer_address: PeerAddress, node_of: NodeOf, key_sink: KeySink,
                 service_key: bytes, listen: tuple[str, int] = ("127.0.0.1", 0), key_size: int = 256,
                 tick: float = 0.1, time_scale: float = 1.0, perf_every: int = 10,
                 channel: int | None = None, mttr: float | None = 60.0, seed: int | None = None,
                 key_room: KeyRoom | None = None) -> None:
        """role: TRANSMITTER / RECEIVER (or TRANSCEIVER: then the link's phys_qkd_role decides);
        tick: wall seconds between blocks; time_scale: emulated seconds per wall second;
        channel: fixed DWDM channel of the module, if any; mttr: mean emulated seconds to
        self-repair after a random (mtbf) failure, None = until repair()."""
        role = identity_name(role)
        if not profile.supports_role(role):
            raise ValueError(f"profile '{profile.name}' does not support role {role}")
        self._check_key_size(key_size)
        self._init_module(node, qkdn_id, qkdi_id, role, key_sink=key_sink, peer_address=peer_address,
                          service_key=service_key, listen=listen, logger=log, key_room=key_room)
        self.profile, self.plant, self.channel = profile, plant, channel
        self._node_of = node_of
        self.key_size, self.tick, self.time_scale = key_size, float(tick), float(time_scale)
        self.perf_every, self.mttr = max(1, perf_every), mttr
        self._rng = random.Random(seed)
        self._fail_rng = random.Random(None if seed is None else seed + 1)
        self._repair_at: float | None = None

    # --- QkdModule hooks ------------------------------------------------------------------

    def _new_link(self, cfg: LinkConfig) -> Link:
        return _Link(cfg, BlockMeter(_WINDOW), role=self._role_for(cfg))

    def _check_device(self, cfg: LinkConfig) -> None:
        p = self.profile
        if cfg.wavelength is not None and self.channel is None and not p.supports_channel(cfg.wavelength):
            raise DriverError("invalid-value", f"phys_wavelength {cfg.wavelength} is outside "
                                               f"{p.model or p.name}'s range {p.wavelength_range}")
        if cfg.role is not None:
            if cfg.role not in ("TRANSMITTER", "RECEIVER") or not p.supports_role(cfg.role):
                raise DriverError("invalid-value", f"phys_qkd_role {cfg.role} is not supported "
                                                   f"(module supports {p.role_support})")
            self._check_direction(cfg.role)
        if cfg.attenuation is not None and cfg.attenuation > p.max_absorption:
            raise DriverError("invalid-value", f"phys_channel_att {cfg.attenuation} dB is over the "
                                               f"module's max absorption {p.max_absorption} dB")

    def _interface(self) -> dict[str, Any]:
        p = self.profile
        return {"model": p.model or p.name, "technology": p.technology,
                "role_support": f"{physics.IDENTITY_MODULE}:{self.role}",
                "wavelength_range": str(self.channel) if self.channel else p.wavelength_range,
                "max_absorption": p.max_absorption}

    def _on_open(self) -> None:
        if self.profile.mtbf:
            self._spawn(self._failure_clock, "mtbf")

    def _challenge_extra(self) -> dict[str, Any]:
        return {"max_absorption": self.profile.max_absorption, "interface": self._iface}

    def _session_timeout(self) -> float:
        return max(5.0, 10 * self.tick)

    def _retry(self) -> tuple[float, float]:
        return self.tick, _MAX_BACKOFF

    def _read_hello(self, wire: sc.Wire) -> dict[str, Any] | None:
        try:
            return sc.read_hello(wire, self.kind)
        except sc.Refused as exc:
            self._log.warning("service channel pairing refused: %s", exc)
            return None

    def _set_iface(self, status: str, reason: str) -> bool:
        """As QkdModule's, and tell the transmitters: a failed receiver detects nothing."""
        if not super()._set_iface(status, reason):
            return False
        with self._lock:
            wires = [ln.wire for ln in self._links.values() if ln.role == "RECEIVER" and ln.wire]
        for wire in wires:
            try:
                wire.send({"t": "status", "interface": status})
            except OSError:
                pass
        return True

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

    def _account(self, link: _Link, block: int, bits: int, dt: float, qber_pct: float,
                 stream: KeyStream, kept: bool) -> None:
        """Record an accepted block and, if both ends keep it, hand its keys to the sink
        (never logs key bytes)."""
        keys = stream.feed(block, bits if kept else 0)
        if bits and kept == link.full:
            link.full = not kept
            self._log.debug("link %s key store %s", link.cfg.qkdl_id, "full: keys not stored" if link.full else "has room again")
        with self._lock:
            if link.stop.is_set():
                return
            link.meter.add(bits, dt)
            link.qber = qber_pct / 100.0
            link.key_bits += len(keys) * self.key_size
            link.blocks += 1
            perf = link.blocks % self.perf_every == 0
        self._sink_keys(link, keys)
        if perf:
            self._safe_emit("link-perf", {"qkdl_id": link.cfg.qkdl_id, "skr": link.meter.rate(),
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
        spans = max(1, len(ch.fibres))  # a switched CV path: one span per fibre (profile.py)
        reason = physics.no_key_reason(p, ch.loss_db, qber, crosstalk, budget, classical, spans)
        if reason is not None:
            return 0, qber, reason
        return physics.distilled_bits(p, ch.loss_db, classical, qber, seconds, self._rng,
                                      budget_db=budget, spans=spans), qber, None

    # --- internals: transmitter -----------------------------------------------------------------

    def _run_session(self, link: _Link, session: sc.Session) -> None:  # type: ignore[override]
        """Every tick, evaluate the physics and send a block; account for each acked block."""
        wire, stream = session.wire, KeyStream(session.secret, self.key_size)
        challenge = session.peer
        budget = min(self.profile.max_absorption,
                     float(challenge.get("max_absorption", self.profile.max_absorption)))
        peer_failed = challenge.get("interface", "ENABLED") == "FAILED"
        pending: dict[int, tuple[int, float, float]] = {}
        block, last = 0, time.monotonic()
        next_tick = last + self.tick
        while not link.stop.is_set():
            if wire.readable(next_tick - time.monotonic()):
                msg = wire.recv()
                kind = msg.get("t")
                if kind == "ack":
                    bits, dt, qber = pending.pop(int(msg["i"]))  # a refused block counts as no key
                    self._account(link, int(msg["i"]), bits if msg.get("ok") else 0, dt, qber, stream,
                                  kept=bool(msg.get("kept", True)))  # a peer without key buffers keeps all
                elif kind == "status":
                    peer_failed = msg.get("interface") == "FAILED"
                elif kind == "bye":
                    raise ConnectionError(f"peer closed ({msg.get('reason', '')})")
                continue
            now = time.monotonic()
            seconds = min(now - last, 5 * self.tick) * self.time_scale
            last, next_tick = now, max(next_tick + self.tick, now + self.tick / 2)
            bits, qber, reason = self._evaluate(link, seconds, peer_failed, budget)
            keep = bits > 0 and self._room(link.cfg.qkdl_id)
            wire.send({"t": "block", "i": block, "bits": bits, "qber": round(qber, 4),
                       "dt": seconds, "reason": reason, "keep": keep})
            pending[block] = (bits, seconds, qber)
            block += 1
            if reason is None:
                self._set_status(link, "ACTIVE", "key flowing")
            else:
                with self._lock:
                    link.qber = qber / 100.0
                self._set_status(link, "PASSIVE", reason)

    # --- internals: receiver ---------------------------------------------------------------------

    def _run_receiver(self, link: _Link, session: sc.Session) -> None:  # type: ignore[override]
        """Take the transmitter's blocks in order, account for them and ack each."""
        wire, stream = session.wire, KeyStream(session.secret, self.key_size)
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
            kept = ok and bool(msg.get("keep", True)) and self._room(link.cfg.qkdl_id)
            self._account(link, block, int(msg["bits"]) if ok else 0, float(msg["dt"]),
                          float(msg["qber"]), stream, kept=kept)
            wire.send({"t": "ack", "i": block, "ok": ok, "kept": kept})
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
