"""A real QKD module (Toshiba, IDQ...) whose keys the agent takes from the device's own
ETSI GS QKD 014 API, kind "qkd-etsi014".

The agent is an SAE of its device (mutual TLS, client certificate from the vendor's
CA). The two agents of a PHYS link pair their modules over the service channel
(service_channel.py). The master end (the link's TRANSMITTER) polls its device's
`status` for the peer SAE, pulls what is stored with `enc_keys` (at most
max_key_per_request per call) and sends the key IDs, with an HMAC of the keys under
the session secret, never the keys, to the slave end; the slave takes the same IDs
from its own device with `dec_keys`, checks the HMAC, hands the keys to its key sink
and acknowledges; only then does the master hand its copies to its sink. Both sinks
therefore get identical (key_ID, key) in the same order, or neither gets a batch
(except a batch whose ack is lost with the channel: the slave then holds keys the
master dropped; the LKMS's split allocation turns that into one failed relay, never
into mismatched keys).

Key buffer: the master pulls only while its key store has room (`key_room`); the
keys wait in the device's own buffer meanwhile. The slave stores what the master
sends (both stores hold the same link keys, so they fill together).

Link status follows ETSI 015 as in qkd_emulated.py: PENDING while the service
channel is not up, ACTIVE while keys flow, PASSIVE while they do not (device holds no
key, device busy, a device down), OFF when disabled. A device that cannot be reached
or fails TLS makes the interface FAILED until it answers again; calls are retried
with backoff. SKR is measured from the bits delivered over a window; QBER is None
unless the device reports one in status_extension ({"qber": fraction or percent}).
"""
from __future__ import annotations

import hmac
import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sdqkd.agents.drivers import service_channel as sc
from sdqkd.agents.drivers.base import DriverError
from sdqkd.qkdprofile import IDENTITY_MODULE, ROLES, identity, identity_name, parse_wavelength_range
from sdqkd.agents.drivers.qkd_link import KeyRoom, KeySink, Link, LinkConfig, PeerAddress, QkdModule, RateMeter
from sdqkd.etsi014_client import DeviceApi, DeviceClient, DeviceError

__all__ = ["DeviceApi", "DeviceClient", "DeviceError", "Etsi014QkdModule", "RateMeter"]

log = logging.getLogger(__name__)

MAX_BATCH = 1024          # key IDs per service-channel frame (frames are at most 64 KiB)


# --- link bookkeeping ---------------------------------------------------------------------


@dataclass(eq=False)
class _Link(Link):
    """A link whose keys come in batches from the device."""

    meter: RateMeter
    batches: int = 0
    last_key: float = 0.0       # monotonic time of the last delivered batch


def _batch_tag(secret: bytes, batch: int, keys: list[tuple[str, bytes]]) -> str:
    """Both ends prove they hold the same keys without showing them (HMAC under the session secret)."""
    mac = hmac.new(secret, b"etsi014 batch" + struct.pack(">Q", batch), "sha256")
    for key_id, key in keys:
        mac.update(key_id.encode() + struct.pack(">I", len(key)) + key)
    return mac.hexdigest()[:32]


def _qber_of(status: Mapping[str, Any]) -> float | None:
    """QBER from a vendor status_extension, as a fraction; None when the device gives none."""
    ext = status.get("status_extension")
    value = ext.get("qber", ext.get("QBER")) if isinstance(ext, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return float(value) / 100.0 if value > 1 else float(value)


# --- the driver ---------------------------------------------------------------------------


class Etsi014QkdModule(QkdModule):
    """One real QKD module reached through its ETSI 014 API; serves one enabled PHYS link."""

    kind: ClassVar[str] = "qkd-etsi014"
    _tx_thread: ClassVar[str] = "master"

    def __init__(self, node: str, qkdn_id: str, qkdi_id: int, role: str, *, device: DeviceApi,
                 key_sink: KeySink, service_key: bytes, peer_address: PeerAddress,
                 listen: tuple[str, int] = ("127.0.0.1", 0), key_size: int = 256, poll: float = 0.5,
                 max_backoff: float = 5.0, skr_window: float = 10.0, idle_after: float = 10.0,
                 perf_every: int = 10,
                 model: str = "", technology: str = "DV-QKD", wavelength_range: str | None = None,
                 max_absorption: float | None = None, key_room: KeyRoom | None = None) -> None:
        """role: TRANSMITTER (master SAE) / RECEIVER (slave) / TRANSCEIVER (the link's
        phys_qkd_role decides); poll: seconds between status polls of an idle device;
        idle_after: how long an ACTIVE link may see an empty device before it is PASSIVE
        (a slow device empties at every poll; the link must not flap);
        model, technology, wavelength_range, max_absorption: what ETSI 015 shows of the
        device (from the agent config, as 014 does not tell)."""
        role = identity_name(role)
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        self._check_key_size(key_size)
        if not device.sae_id or not device.peer_sae_id:
            raise ValueError("the device's own and peer SAE IDs are needed")
        self._init_module(node, qkdn_id, qkdi_id, role, key_sink=key_sink, peer_address=peer_address,
                          service_key=service_key, listen=listen, logger=log, key_room=key_room)
        self.device = device
        self.key_size, self.poll, self.max_backoff = key_size, float(poll), max(float(max_backoff), float(poll))
        self.skr_window, self.idle_after, self.perf_every = float(skr_window), float(idle_after), max(1, perf_every)
        self.model, self.technology = model, identity(technology)
        self.wavelength_range, self.max_absorption = wavelength_range, max_absorption
        self._channels = parse_wavelength_range(wavelength_range) if wavelength_range else frozenset()
        self._clients: set[DeviceClient] = set()

    # --- QkdModule hooks ------------------------------------------------------------------

    def _new_link(self, cfg: LinkConfig) -> Link:
        return _Link(cfg, RateMeter(self.skr_window, self.poll), role=self._role_for(cfg))

    def _check_device(self, cfg: LinkConfig) -> None:
        if cfg.wavelength is not None and self._channels and cfg.wavelength not in self._channels:
            raise DriverError("invalid-value", f"phys_wavelength {cfg.wavelength} is outside the device's "
                                               f"range {self.wavelength_range}")
        if cfg.role is not None:
            if cfg.role not in ("TRANSMITTER", "RECEIVER"):
                raise DriverError("invalid-value", f"phys_qkd_role {cfg.role} is not TRANSMITTER or RECEIVER")
            self._check_direction(cfg.role)
        if cfg.attenuation is not None and self.max_absorption is not None and cfg.attenuation > self.max_absorption:
            raise DriverError("invalid-value", f"phys_channel_att {cfg.attenuation} dB is over the "
                                               f"device's max absorption {self.max_absorption} dB")

    def _interface(self) -> dict[str, Any]:
        return {"model": self.model, "technology": self.technology,
                "role_support": f"{IDENTITY_MODULE}:{self.role}",
                "wavelength_range": self.wavelength_range, "max_absorption": self.max_absorption}

    def _on_close(self) -> None:
        with self._lock:
            clients = list(self._clients)
        for client in clients:  # a call in progress fails at once
            client.close()

    def _hello_extra(self) -> dict[str, Any] | None:
        return {"sae": self.device.sae_id, "peer_sae": self.device.peer_sae_id}

    def _challenge_extra(self) -> dict[str, Any]:
        with self._lock:
            device = {"device": self._iface, "reason": self._iface_reason}
        return {"sae": self.device.sae_id, "peer_sae": self.device.peer_sae_id, **device}

    def _vet_peer(self, session: sc.Session) -> None:
        peer = session.peer
        if (peer.get("sae"), peer.get("peer_sae")) != (self.device.peer_sae_id, self.device.sae_id):
            session.wire.close(bye="SAE IDs do not match")
            raise sc.Refused(f"SAE IDs do not match: the peer is '{peer.get('sae')}' for '{peer.get('peer_sae')}'")

    def _session_timeout(self) -> float:
        return max(5.0, 2 * self.device.timeout + 10 * self.poll)

    def _retry(self) -> tuple[float, float]:
        return self.poll, self.max_backoff

    def _refuse_hello(self, link: Link, hello: Mapping[str, Any]) -> str | None:
        if (hello.get("sae"), hello.get("peer_sae")) != (self.device.peer_sae_id, self.device.sae_id):
            return (f"SAE IDs do not match: the receiver is '{self.device.sae_id}' "
                    f"for '{self.device.peer_sae_id}'")
        return None

    def _on_paired(self, link: Link) -> None:
        self._set_status(link, "PASSIVE", "paired, waiting for key")

    # --- master: pull from the device, tell the slave ---------------------------------------

    def _run_session(self, link: _Link, session: sc.Session) -> None:  # type: ignore[override]
        """Pull batches from the device while the slave confirms them; back off while it fails."""
        wire, peer = session.wire, session.peer
        peer_down = None if peer.get("device", "ENABLED") == "ENABLED" else str(peer.get("reason", "failed"))
        client: DeviceClient | None = None
        batch, wait, backoff = 0, 0.0, self.poll
        try:
            while not link.stop.is_set():
                if wire.readable(wait):
                    peer_down = self._peer_message(wire.recv(), peer_down)
                    continue
                wait = self.poll
                if peer_down is not None:
                    self._passive(link, wire, f"receiver {peer_down}")
                    continue
                if not self._room(link.cfg.qkdl_id):
                    continue  # the keys wait in the device until some are used here
                try:
                    client = client or self._client()
                    keys, more = self._take(client, link)
                except DeviceError as exc:
                    self._device_failed(link, wire, exc)
                    wait, backoff = backoff, min(backoff * 2, self.max_backoff)
                    continue
                backoff = self.poll
                self._device_ok()
                if not keys:
                    if link.status != "ACTIVE" or time.monotonic() - link.last_key >= self.idle_after:
                        self._passive(link, wire, f"device holds no key for SAE {self.device.peer_sae_id}")
                    continue
                ok, reason, peer_down = self._exchange(link, session, batch, keys, peer_down)
                batch += 1
                if ok:
                    self._deliver(link, keys)
                    self._set_status(link, "ACTIVE", "key flowing")
                    wait = 0.0 if more else self.poll
                else:
                    self._passive(link, wire, reason)
        finally:
            if client is not None:
                self._drop_client(client)

    def _take(self, client: DeviceClient, link: _Link) -> tuple[list[tuple[str, bytes]], bool]:
        """Up to what the device holds and serves per request; (keys, more left)."""
        st = client.status(self.device.peer_sae_id)
        try:
            stored, per_request = int(st["stored_key_count"]), int(st["max_key_per_request"])
            size, lo, hi = int(st["key_size"]), int(st.get("min_key_size", 0)), int(st.get("max_key_size", 1 << 30))
        except (KeyError, TypeError, ValueError):
            raise DeviceError("protocol", "status lacks stored_key_count, max_key_per_request or key_size") from None
        if not lo <= self.key_size <= hi:
            raise DeviceError("refused", f"the device serves {lo}..{hi}-bit keys, not {self.key_size}")
        qber = _qber_of(st)
        with self._lock:
            link.qber = qber
        available = stored * size // self.key_size
        number = min(available, per_request, MAX_BATCH)
        if number <= 0:
            return [], False
        keys = client.enc_keys(self.device.peer_sae_id, number, self.key_size)
        if not 0 < len(keys) <= number or any(len(k) * 8 != self.key_size for _, k in keys):
            raise DeviceError("protocol", f"asked for {number} {self.key_size}-bit keys, got another set")
        return keys, available > len(keys)

    def _exchange(self, link: _Link, session: sc.Session, batch: int, keys: list[tuple[str, bytes]],
                  peer_down: str | None) -> tuple[bool, str, str | None]:
        """Send the IDs, wait for the slave's ack; (ok, reason, peer device state)."""
        wire = session.wire
        wire.send({"t": "keys", "i": batch, "ids": [k for k, _ in keys], "qber": link.qber,
                   "tag": _batch_tag(session.secret, batch, keys)})
        while True:
            msg = wire.recv()
            if msg.get("t") == "ack" and msg.get("i") == batch:
                return bool(msg.get("ok")), str(msg.get("reason") or ""), peer_down
            peer_down = self._peer_message(msg, peer_down)

    def _peer_message(self, msg: Mapping[str, Any], peer_down: str | None) -> str | None:
        kind = msg.get("t")
        if kind == "bye":
            raise ConnectionError(f"peer closed ({msg.get('reason', '')})")
        if kind == "device":
            return None if msg.get("status") == "ENABLED" else str(msg.get("reason") or "failed")
        return peer_down

    def _passive(self, link: _Link, wire: sc.Wire, reason: str) -> None:
        """PASSIVE here and, so both ends say why, at the slave."""
        if self._set_status(link, "PASSIVE", reason):
            wire.send({"t": "idle", "reason": reason})

    # --- slave: take the same IDs from the own device ------------------------------------------

    def _run_receiver(self, link: _Link, session: sc.Session) -> None:  # type: ignore[override]
        """Serve the master's batches; probe the device while idle so its failure is seen."""
        wire = session.wire
        client: DeviceClient | None = None
        last_contact = 0.0
        try:
            while not link.stop.is_set():
                if wire.readable(self.poll):
                    msg = wire.recv()
                    kind = msg.get("t")
                    if kind == "bye":
                        self._set_status(link, "PENDING", f"peer stopped ({msg.get('reason', '')})")
                        return
                    if kind == "idle":
                        self._set_status(link, "PASSIVE", str(msg.get("reason", "")))
                    elif kind == "keys":
                        client = client or self._client_or_none(link, wire)
                        if client is None:
                            wire.send({"t": "ack", "i": msg.get("i"), "ok": False, "reason": self._iface_reason})
                            continue
                        self._fetch(link, session, client, msg)
                        last_contact = time.monotonic()
                if time.monotonic() - last_contact >= self.poll:  # idle: is the device still there?
                    client = client or self._client_or_none(link, wire)
                    if client is not None:
                        self._probe(link, wire, client)
                    last_contact = time.monotonic()
        finally:
            if client is not None:
                self._drop_client(client)

    def _fetch(self, link: _Link, session: sc.Session, client: DeviceClient, msg: Mapping[str, Any]) -> None:
        """dec_keys the master's IDs, check the batch tag, sink, ack (a refusal drops the batch at both ends)."""
        wire, batch = session.wire, int(msg["i"])
        ids = [str(k) for k in msg["ids"]]
        try:
            got = dict(client.dec_keys(self.device.peer_sae_id, ids))
        except DeviceError as exc:
            self._receiver_device_failed(link, wire, exc)
            wire.send({"t": "ack", "i": batch, "ok": False, "reason": f"receiver {exc.reason()}"})
            return
        self._receiver_device_ok(wire)
        keys = [(k, got[k]) for k in ids if k in got]
        tag = _batch_tag(session.secret, batch, keys)
        if len(keys) != len(ids) or not hmac.compare_digest(tag, str(msg.get("tag"))):
            self._log.error("link %s batch %d: the devices' keys differ; batch dropped", link.cfg.qkdl_id, batch)
            self._set_status(link, "PASSIVE", "keys differ between the devices")
            wire.send({"t": "ack", "i": batch, "ok": False, "reason": "keys differ between the devices"})
            return
        qber = msg.get("qber")
        with self._lock:
            link.qber = float(qber) if isinstance(qber, (int, float)) else None
        self._deliver(link, keys)
        wire.send({"t": "ack", "i": batch, "ok": True})
        self._set_status(link, "ACTIVE", "key flowing")

    def _probe(self, link: _Link, wire: sc.Wire, client: DeviceClient) -> None:
        """Any HTTP answer means the device is up (a reverse-direction status may be refused)."""
        try:
            client.status(self.device.peer_sae_id)
        except DeviceError as exc:
            if exc.down:
                self._receiver_device_failed(link, wire, exc)
                return
        self._receiver_device_ok(wire)

    def _client_or_none(self, link: _Link, wire: sc.Wire) -> DeviceClient | None:
        try:
            return self._client()
        except DeviceError as exc:
            self._receiver_device_failed(link, wire, exc)
            return None

    def _receiver_device_failed(self, link: _Link, wire: sc.Wire, exc: DeviceError) -> None:
        reason = exc.reason()
        if exc.down and self._set_iface("FAILED", reason):
            wire.send({"t": "device", "status": "FAILED", "reason": reason})
        self._set_status(link, "PASSIVE", f"receiver {reason}")

    def _receiver_device_ok(self, wire: sc.Wire) -> None:
        if self._set_iface("ENABLED", "device reachable"):
            wire.send({"t": "device", "status": "ENABLED", "reason": "device reachable"})

    def _device_failed(self, link: _Link, wire: sc.Wire, exc: DeviceError) -> None:
        if exc.down:
            self._set_iface("FAILED", exc.reason())
        self._passive(link, wire, exc.reason())

    def _device_ok(self) -> None:
        self._set_iface("ENABLED", "device reachable")

    def _deliver(self, link: _Link, keys: list[tuple[str, bytes]]) -> None:
        """Hand a confirmed batch to the sink, in order (never logs key bytes)."""
        bits = sum(8 * len(k) for _, k in keys)
        with self._lock:
            if link.stop.is_set():
                return
            link.meter.add(bits)
            link.last_key = time.monotonic()
            link.key_bits += bits
            link.batches += 1
            perf = {"qkdl_id": link.cfg.qkdl_id, "skr": link.meter.rate(),
                    "qber": None if link.qber is None else round(link.qber, 4)}
        self._sink_keys(link, keys)
        self._log.debug("link %s: %d key(s) delivered", link.cfg.qkdl_id, len(keys))
        if link.batches % self.perf_every == 0:
            self._safe_emit("link-perf", perf)

    def _client(self) -> DeviceClient:
        client = DeviceClient(self.device)
        with self._lock:
            self._clients.add(client)
        return client

    def _drop_client(self, client: DeviceClient) -> None:
        with self._lock:
            self._clients.discard(client)
        client.close()
