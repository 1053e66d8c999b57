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

Link status follows ETSI 015 as in qkd_emulated.py: PENDING while the service
channel is not up, ACTIVE while keys flow, PASSIVE while they do not (device holds no
key, device busy, a device down), OFF when disabled. A device that cannot be reached
or fails TLS makes the interface FAILED until it answers again; calls are retried
with backoff. SKR is measured from the bits delivered over a window; QBER is None
unless the device reports one in status_extension ({"qber": fraction or percent}).
"""
from __future__ import annotations

import base64
import binascii
import collections
import hmac
import logging
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from sdqkd.agents.drivers import service_channel as sc
from sdqkd.agents.drivers.base import Change, Driver, DriverError, Emit, Event
from sdqkd.agents.drivers.profile import IDENTITY_MODULE, ROLES, identity_name, parse_wavelength_range
from sdqkd.agents.drivers.qkd_emulated import (KeySink, LinkConfig, ModuleLog, PeerAddress, link_config,
                                               link_role, owns_link)
from sdqkd.agents.kms import pki

log = logging.getLogger(__name__)

API = "/api/v1/keys"
MAX_BATCH = 1024          # key IDs per service-channel frame (frames are at most 64 KiB)
_DOWN = ("unreachable", "tls")


# --- the device's ETSI 014 API ------------------------------------------------------------


@dataclass(frozen=True)
class DeviceApi:
    """Where and as whom the agent reaches its device's ETSI GS QKD 014 API."""

    url: str             # https://host:port of the device's KME
    sae_id: str          # this agent's SAE ID at the device (its client certificate's CN)
    peer_sae_id: str     # the peer agent's SAE ID at the peer device
    ca: str              # the device vendor's CA (PEM)
    cert: str            # this SAE's client certificate (PEM)
    key: str             # and its private key (PEM)
    timeout: float = 5.0


class DeviceError(Exception):
    """A failed device call. kind: 'unreachable', 'tls' (the device is down for us:
    interface FAILED), 'busy' (HTTP 503), 'refused' (other HTTP errors), 'protocol'."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def down(self) -> bool:
        return self.kind in _DOWN

    def reason(self) -> str:
        label = {"unreachable": "device unreachable", "tls": "device TLS failure", "busy": "device busy (503)",
                 "refused": "device refused", "protocol": "device answered nonsense"}[self.kind]
        return f"{label}: {self.message}"


class DeviceClient:
    """The three ETSI 014 calls the driver makes, with every failure as a DeviceError."""

    def __init__(self, api: DeviceApi) -> None:
        try:
            ctx = pki.client_ssl_context(api.cert, api.key, api.ca)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise DeviceError("tls", f"credentials unusable: {exc}") from None
        self._http = httpx.Client(base_url=api.url, verify=ctx, timeout=api.timeout)

    def status(self, slave_sae: str) -> dict[str, Any]:
        return self._call("GET", f"{API}/{_q(slave_sae)}/status")

    def enc_keys(self, slave_sae: str, number: int, size: int) -> list[tuple[str, bytes]]:
        body = self._call("POST", f"{API}/{_q(slave_sae)}/enc_keys", {"number": number, "size": size})
        return _keys(body)

    def dec_keys(self, master_sae: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        body = self._call("POST", f"{API}/{_q(master_sae)}/dec_keys", {"key_IDs": [{"key_ID": k} for k in key_ids]})
        return _keys(body)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise DeviceError("unreachable", f"timed out ({type(exc).__name__})") from None
        except (httpx.TransportError, ssl.SSLError, OSError) as exc:
            kind = "tls" if _tls_failure(exc) else "unreachable"
            raise DeviceError(kind, _short(str(exc) or type(exc).__name__)) from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code != 200:
            msg = data.get("message") if isinstance(data, dict) else None
            text = f"HTTP {r.status_code}" + (f" {_short(str(msg))}" if msg else "")
            raise DeviceError("busy" if r.status_code == 503 else "refused", text)
        if not isinstance(data, dict):
            raise DeviceError("protocol", "the response is not a JSON object")
        return data


def _q(sae: str) -> str:
    return urllib.parse.quote(sae, safe="")


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen) or "certificate" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _keys(body: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """A key container's (key_ID, key) pairs; never quotes a key in an error."""
    items = body.get("keys")
    if not isinstance(items, list):
        raise DeviceError("protocol", "no keys array in the key container")
    out = []
    for item in items:
        try:
            out.append((str(uuid.UUID(str(item["key_ID"]))), base64.b64decode(item["key"], validate=True)))
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise DeviceError("protocol", "malformed key in the key container") from None
    return out


# --- link bookkeeping ---------------------------------------------------------------------


class RateMeter:
    """Bits delivered over the last `window` seconds, per second: a measurement, as
    ETSI 015 SKR is, not the device's nominal rate."""

    def __init__(self, window: float, floor: float) -> None:
        self.window, self.floor = window, floor
        self.since = time.monotonic()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, bits: int, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, bits))

    def rate(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()
        span = min(self.window, max(now - self.since, self.floor))
        return int(sum(b for _, b in self._samples) / span)


@dataclass(eq=False)
class _Link:
    cfg: LinkConfig
    meter: RateMeter
    role: str = "RECEIVER"
    status: str = "OFF"
    reason: str = ""
    qber: float | None = None
    key_bits: int = 0
    batches: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    wire: sc.Wire | None = None
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


class Etsi014QkdModule(Driver):
    """One real QKD module reached through its ETSI 014 API; serves one enabled PHYS link."""

    kind: ClassVar[str] = "qkd-etsi014"

    def __init__(self, node: str, qkdn_id: str, qkdi_id: int, role: str, *, device: DeviceApi,
                 key_sink: KeySink, service_key: bytes, peer_address: PeerAddress,
                 listen: tuple[str, int] = ("127.0.0.1", 0), key_size: int = 256, poll: float = 0.5,
                 max_backoff: float = 5.0, skr_window: float = 10.0, idle_after: float = 10.0,
                 perf_every: int = 10,
                 model: str = "", technology: str = "DV-QKD", wavelength_range: str | None = None,
                 max_absorption: float | None = None) -> None:
        """role: TRANSMITTER (master SAE) / RECEIVER (slave) / TRANSCEIVER (the link's
        phys_qkd_role decides); poll: seconds between status polls of an idle device;
        idle_after: how long an ACTIVE link may see an empty device before it is PASSIVE
        (a slow device empties at every poll; the link must not flap);
        model, technology, wavelength_range, max_absorption: what ETSI 015 shows of the
        device (from the agent config, as 014 does not tell)."""
        role = identity_name(role)
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if key_size <= 0 or key_size % 8:
            raise ValueError("key size must be a positive multiple of 8 bits")
        if not device.sae_id or not device.peer_sae_id:
            raise ValueError("the device's own and peer SAE IDs are needed")
        self.node, self.qkdn_id, self.qkdi_id, self.role = node, qkdn_id, int(qkdi_id), role
        self.device = device
        self.key_size, self.poll, self.max_backoff = key_size, float(poll), max(float(max_backoff), float(poll))
        self.skr_window, self.idle_after, self.perf_every = float(skr_window), float(idle_after), max(1, perf_every)
        self.model, self.technology = model, f"{IDENTITY_MODULE}:{identity_name(technology)}"
        self.wavelength_range, self.max_absorption = wavelength_range, max_absorption
        self._channels = parse_wavelength_range(wavelength_range) if wavelength_range else frozenset()
        self._sink, self._peer_address = key_sink, peer_address
        self._service_key = bytes(service_key)
        self._listen = listen
        self._lock = threading.RLock()
        self._links: dict[str, _Link] = {}
        self._iface, self._iface_reason = "DISABLED", ""
        self._emit: Emit = lambda event: None
        self._listener: sc.Listener | None = None
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wires: set[sc.Wire] = set()
        self._clients: set[DeviceClient] = set()
        self.address: tuple[str, int] | None = None
        self._log = ModuleLog(log, {"where": f"{node}:{qkdi_id}"})

    # --- Driver -------------------------------------------------------------------------

    def open(self, emit: Emit) -> None:
        """Listen on the service address (see `address`), start enabled links."""
        self._emit = emit
        listener = sc.Listener(self._listen)
        self._listener, self.address = listener, listener.address
        with self._lock:
            self._iface = "ENABLED"
        self._spawn(listener.serve, "accept", lambda conn: self._spawn(self._serve, "rx", conn))
        for link in list(self._links.values()):
            self._start(link)

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            links, wires, clients = list(self._links.values()), list(self._wires), list(self._clients)
            self._iface = "DISABLED"
        for link in links:
            link.stop.set()
        for wire in wires:
            wire.close(bye="module closed")
        for client in clients:  # a call in progress fails at once
            client.close()
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
        if cfg.wavelength is not None and self._channels and cfg.wavelength not in self._channels:
            raise DriverError("invalid-value", f"phys_wavelength {cfg.wavelength} is outside the device's "
                                               f"range {self.wavelength_range}")
        if cfg.role is not None:
            if cfg.role not in ("TRANSMITTER", "RECEIVER"):
                raise DriverError("invalid-value", f"phys_qkd_role {cfg.role} is not TRANSMITTER or RECEIVER")
            if self.role != "TRANSCEIVER" and cfg.role != self.role:
                raise DriverError("invalid-value", f"this module is a {self.role}, not a {cfg.role}")
        if cfg.attenuation is not None and self.max_absorption is not None and cfg.attenuation > self.max_absorption:
            raise DriverError("invalid-value", f"phys_channel_att {cfg.attenuation} dB is over the "
                                               f"device's max absorption {self.max_absorption} dB")
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
        link = _Link(cfg, RateMeter(self.skr_window, self.poll),
                     role=link_role(cfg, self.role, self.qkdn_id, self.qkdi_id))
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
        with self._lock:
            return {
                "interface": {
                    "qkdi_id": self.qkdi_id,
                    "status": self._iface,
                    "model": self.model,
                    "technology": self.technology,
                    "role_support": f"{IDENTITY_MODULE}:{self.role}",
                    "wavelength_range": self.wavelength_range,
                    "max_absorption": self.max_absorption,
                },
                "links": {k: {"status": ln.status, "reason": ln.reason, "skr": ln.meter.rate(),
                              "qber": None if ln.qber is None else round(ln.qber, 4), "key_bits": ln.key_bits}
                          for k, ln in self._links.items()},
            }

    # --- master: pull from the device, tell the slave ---------------------------------------

    def _master(self, link: _Link) -> None:
        """Pair, pull batches; on loss of the channel go PENDING and retry with backoff."""
        backoff = self.poll
        while not link.stop.is_set():
            try:
                session = self._pair(link)
            except Exception as exc:
                if not isinstance(exc, (sc.Refused, OSError, ConnectionError, ValueError, KeyError)):
                    self._log.exception("pairing link %s failed", link.cfg.qkdl_id)
                self._set_status(link, "PENDING", str(exc) if isinstance(exc, sc.Refused) else f"cannot pair: {exc}")
                link.stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.poll
            try:
                self._pull(link, session)
                reason = "stopped"
            except Exception as exc:
                if not isinstance(exc, (OSError, ConnectionError, ValueError, KeyError)):
                    self._log.exception("link %s session failed", link.cfg.qkdl_id)
                reason = f"service channel lost: {exc}"
            finally:
                self._release(link, session.wire)
            self._set_status(link, "PENDING", reason)
            link.stop.wait(self.poll)

    def _pair(self, link: _Link) -> sc.Session:
        cfg = link.cfg
        addr = self._peer_address(cfg.remote_qkdn or "", cfg.remote_qkdi or 0)
        if addr is None:
            raise sc.Refused("peer service address unknown")
        wire = sc.Wire.connect(addr)
        self._track(wire, True)
        try:
            session = sc.initiate(wire, self._service_key, self.kind, cfg.qkdl_id,
                                  sc.Endpoint(self.qkdn_id, self.qkdi_id),
                                  sc.Endpoint(cfg.remote_qkdn or "", cfg.remote_qkdi or 0),
                                  {"sae": self.device.sae_id, "peer_sae": self.device.peer_sae_id})
            peer = session.peer
            if (peer.get("sae"), peer.get("peer_sae")) != (self.device.peer_sae_id, self.device.sae_id):
                wire.close(bye="SAE IDs do not match")
                raise sc.Refused(f"SAE IDs do not match: the peer is '{peer.get('sae')}' for '{peer.get('peer_sae')}'")
            wire.settimeout(max(5.0, 2 * self.device.timeout + 10 * self.poll))
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
        return session

    def _pull(self, link: _Link, session: sc.Session) -> None:
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

    def _serve(self, conn: socket.socket) -> None:
        wire = sc.Wire(conn)
        self._track(wire, True)
        link: _Link | None = None
        try:
            paired = self._respond(wire)
            if paired is not None:
                link = paired[0]
                self._receive(link, paired[1])
        except Exception as exc:
            if not isinstance(exc, (OSError, ConnectionError, ValueError, KeyError, sc.Refused)):
                self._log.exception("service session failed")
            if link is not None:
                self._set_status(link, "PENDING", f"service channel lost: {exc}")
        finally:
            if link is not None:
                self._release(link, wire)
            else:
                self._track(wire, False)
                wire.close()

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
            if (hello.get("sae"), hello.get("peer_sae")) != (self.device.peer_sae_id, self.device.sae_id):
                return link, (f"SAE IDs do not match: the receiver is '{self.device.sae_id}' "
                              f"for '{self.device.peer_sae_id}'")
        return link, None

    def _respond(self, wire: sc.Wire) -> tuple[_Link, sc.Session] | None:
        hello = sc.read_hello(wire, self.kind)
        link, refusal = self._refusal(hello)
        if refusal is not None:
            wire.refuse(refusal)
            return None
        assert link is not None
        with self._lock:
            device = {"device": self._iface, "reason": self._iface_reason}
        try:
            session = sc.respond(wire, self._service_key, self.kind, hello,
                                 {"sae": self.device.sae_id, "peer_sae": self.device.peer_sae_id, **device})
        except sc.AuthenticationFailed:
            self._log.warning("service channel pairing for link %s refused: authentication failed", link.cfg.qkdl_id)
            self._set_status(link, "PENDING", "service channel authentication failed")
            wire.refuse("authentication failed")
            return None
        wire.settimeout(None)  # close() and stop() shut the socket down
        with self._lock:
            if link.stop.is_set():
                return None
            old, link.wire = link.wire, wire
        if old is not None:  # the master reconnected before we noticed the drop
            old.close()
        self._set_status(link, "PASSIVE", "paired, waiting for key")
        return link, session

    def _receive(self, link: _Link, session: sc.Session) -> None:
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

    # --- both ends ---------------------------------------------------------------------------

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
        for key_id, key in keys:
            try:
                self._sink(link.cfg.qkdl_id, key_id, key)
            except Exception as exc:  # type only: a careless sink's message might quote the key
                self._log.error("key sink failed for link %s key %s: %s", link.cfg.qkdl_id, key_id,
                                type(exc).__name__)
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

    def _ours(self, entry: Mapping[str, Any]) -> bool:
        return owns_link(entry, self.qkdn_id, self.qkdi_id)

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"qkd-{self.node}:{self.qkdi_id}-{name}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _track(self, wire: sc.Wire, live: bool) -> None:
        with self._lock:
            (self._wires.add if live else self._wires.discard)(wire)

    def _release(self, link: _Link, wire: sc.Wire) -> None:
        with self._lock:
            if link.wire is wire:
                link.wire = None
        self._track(wire, False)
        wire.close()

    def _start(self, link: _Link) -> None:
        if not link.cfg.enabled:
            return
        self._set_status(link, "PENDING", "waiting for the service channel")
        if link.role == "TRANSMITTER":
            self._spawn(self._master, "master", link)

    def _stop(self, link: _Link, reason: str, report: bool = True) -> None:
        """Stop a link without waiting for its threads (they may be inside emit or a device call)."""
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

    def _set_status(self, link: _Link, status: str, reason: str, force: bool = False) -> bool:
        """Record and report a link status; False when nothing changed."""
        with self._lock:
            if (link.stop.is_set() and not force) or (link.status, link.reason) == (status, reason):
                return False
            changed = link.status != status
            link.status, link.reason = status, reason
        if changed:
            self._log.info("link %s %s (%s)", link.cfg.qkdl_id, status, reason)
        self._safe_emit("link-status", {"qkdl_id": link.cfg.qkdl_id, "status": status, "reason": reason})
        return True

    def _set_iface(self, status: str, reason: str) -> bool:
        with self._lock:
            if self._iface == status or self._iface == "DISABLED":
                return False
            self._iface, self._iface_reason = status, reason if status == "FAILED" else ""
        self._log.warning("interface %s (%s)", status, reason)
        self._safe_emit("interface-status", {"qkdi_id": self.qkdi_id, "status": status, "reason": reason})
        return True

