"""Per-link bookkeeping shared by the QKD module drivers (qkd_emulated, qkd_etsi014).

Both drivers serve ETSI 015 PHYS qkd_link entries in the same way: they parse the
link's config from a Change, keep one `Link` per qkdl_id with its status (OFF,
PENDING, ACTIVE, PASSIVE) and reason, pair the two ends over the service channel
(service_channel.py: the TRANSMITTER initiates, the RECEIVER responds), measure SKR
and report state in one shape. Only how keys are made differs, so that lives in the
drivers, behind the hooks of `QkdModule`.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from sdqkd.agents.drivers import service_channel as sc
from sdqkd.agents.drivers.base import Change, Driver, DriverError, Emit, Event
from sdqkd.qkdprofile import identity_name

KeySink = Callable[[str, str, bytes], None]
KeyRoom = Callable[[str], bool]  # link -> may the sink take more keys (a full key store: no)
PeerAddress = Callable[[str, int], "tuple[str, int] | None"]
NodeOf = Callable[[str], "str | None"]

# errors a service session expects (the peer or the network went away): no traceback
_EXPECTED = (OSError, ConnectionError, ValueError, KeyError)


# --- link config --------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkConfig:
    """What a QKD module needs of its ETSI 015 PHYS qkd_link entry (shared by the QKD drivers)."""

    qkdl_id: str
    enabled: bool               # qkdl_enable, and qkdl_status not OFF (switched_on)
    remote_qkdn: str | None
    remote_qkdi: int | None
    wavelength: int | None
    role: str | None            # phys_qkd_role, bare identity
    attenuation: float | None   # phys_channel_att


def switched_on(entry: Mapping[str, Any]) -> bool:
    """Whether a qkd_link entry asks for key: qkdl_enable (default true) and a configured
    qkdl_status other than OFF. ETSI 015 makes qkdl_status configuration, and ONOS's QKD
    app switches links with it alone: it creates them with qkdl_status OFF, activates them
    with ACTIVE (and wavelength, attenuation) and deactivates them with OFF, never touching
    qkdl_enable."""
    status = identity_name(entry["qkdl_status"]) if entry.get("qkdl_status") else None
    return bool(entry.get("qkdl_enable", True)) and status != "OFF"


def link_config(entry: Mapping[str, Any], key: str) -> LinkConfig:
    """Parse a qkd_link entry (RFC 7951 JSON); a bad value is DriverError invalid-value."""
    remote = entry.get("qkdl_remote") or {}
    wl = entry.get("phys_wavelength")
    att = entry.get("phys_channel_att")
    try:
        return LinkConfig(
            qkdl_id=str(entry.get("qkdl_id", key)),
            enabled=switched_on(entry),
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


# --- SKR meters ---------------------------------------------------------------------------


class Meter(Protocol):
    """What state() needs of a link's SKR measurement."""

    def rate(self) -> int: ...


class BlockMeter:
    """SKR over the last `blocks` blocks, each with its own (emulated) duration: a slow
    link's window spans more time, so its rate does not jump with every block."""

    def __init__(self, blocks: int) -> None:
        self._window: collections.deque[tuple[int, float]] = collections.deque(maxlen=blocks)

    def add(self, bits: int, dt: float) -> None:
        self._window.append((bits, dt))

    def rate(self) -> int:
        dt = sum(d for _, d in self._window)
        return int(sum(b for b, _ in self._window) / dt) if dt > 0 else 0


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


# --- one link -----------------------------------------------------------------------------


@dataclass(eq=False)
class Link:
    """A served qkd_link: its config, status and counters, and its live service channel."""

    cfg: LinkConfig
    meter: Meter
    role: str = "RECEIVER"
    status: str = "OFF"
    reason: str = ""
    qber: float | None = None
    key_bits: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    wire: sc.Wire | None = None

    def view(self) -> dict[str, Any]:
        """The link as state() shows it (ETSI 015 status, measured SKR, QBER fraction)."""
        return {"status": self.status, "reason": self.reason, "skr": self.meter.rate(),
                "qber": None if self.qber is None else round(self.qber, 4), "key_bits": self.key_bits}


# --- the module ---------------------------------------------------------------------------


class QkdModule(Driver):
    """What a QKD module driver does with its links whatever makes its keys.

    A driver sets the fields in `_init_module`, builds its links in `_new_link`, checks
    its device's limits in `_check_device`, says what it is in `_interface`, and runs a
    paired link in `_run_session` (transmitter) and `_run_receiver` (receiver)."""

    kind: ClassVar[str]
    _tx_thread: ClassVar[str] = "tx"    # name of the transmitter thread

    def _init_module(self, node: str, qkdn_id: str, qkdi_id: int, role: str, *, key_sink: KeySink,
                     peer_address: PeerAddress, service_key: bytes, listen: tuple[str, int],
                     logger: logging.Logger, key_room: KeyRoom | None = None) -> None:
        """The fields every QKD module has (drivers add their own around this call)."""
        self.node, self.qkdn_id, self.qkdi_id, self.role = node, qkdn_id, int(qkdi_id), role
        self._sink, self._peer_address = key_sink, peer_address
        self._room: KeyRoom = key_room or (lambda link: True)
        self._service_key = bytes(service_key)
        self._listen = listen
        self._lock = threading.RLock()
        self._links: dict[str, Link] = {}
        self._iface, self._iface_reason = "DISABLED", ""
        self._emit: Emit = lambda event: None
        self._listener: sc.Listener | None = None
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wires: set[sc.Wire] = set()
        self.address: tuple[str, int] | None = None
        self._log = ModuleLog(logger, {"where": f"{node}:{qkdi_id}"})

    @staticmethod
    def _check_key_size(key_size: int) -> None:
        if key_size <= 0 or key_size % 8:
            raise ValueError("key size must be a positive multiple of 8 bits")

    def _check_direction(self, role: str) -> None:
        """A TRANSMITTER or RECEIVER module takes only links in its own direction."""
        if self.role != "TRANSCEIVER" and role != self.role:
            raise DriverError("invalid-value", f"this module is a {self.role}, not a {role}")

    # --- hooks ------------------------------------------------------------------------------

    def _new_link(self, cfg: LinkConfig) -> Link:
        """A fresh link for `cfg` (the driver's Link subclass and meter)."""
        raise NotImplementedError

    def _check_device(self, cfg: LinkConfig) -> None:
        """Raise DriverError when the device cannot serve `cfg` (wavelength, role, attenuation)."""

    def _interface(self) -> dict[str, Any]:
        """The ETSI 015 qkd_interface fields of state(), status aside."""
        raise NotImplementedError

    def _on_open(self) -> None:
        """Start what the driver runs besides the links (called once listening)."""

    def _on_close(self) -> None:
        """Abort what the driver has in progress besides the service channels."""

    def _hello_extra(self) -> dict[str, Any] | None:
        """Fields the transmitter's hello carries for the driver."""
        return None

    def _challenge_extra(self) -> dict[str, Any]:
        """Fields the receiver's challenge carries for the driver."""
        return {}

    def _vet_peer(self, session: sc.Session) -> None:
        """Raise sc.Refused (after closing the wire) when the paired receiver is not the one wanted."""

    def _session_timeout(self) -> float:
        """How long a paired transmitter waits on the receiver before the channel counts as lost."""
        raise NotImplementedError

    def _retry(self) -> tuple[float, float]:
        """(first, largest) delay before a transmitter tries pairing again."""
        raise NotImplementedError

    def _refuse_hello(self, link: Link, hello: Mapping[str, Any]) -> str | None:
        """A driver-specific reason to refuse a hello (called under the lock)."""
        return None

    def _read_hello(self, wire: sc.Wire) -> dict[str, Any] | None:
        """The transmitter's hello; None when it is refused here."""
        return sc.read_hello(wire, self.kind)

    def _on_paired(self, link: Link) -> None:
        """Called when the receiver end of `link` is paired."""

    def _run_session(self, link: Link, session: sc.Session) -> None:
        """Make keys over a paired link as its transmitter, until it stops or fails."""
        raise NotImplementedError

    def _run_receiver(self, link: Link, session: sc.Session) -> None:
        """Make keys over a paired link as its receiver, until it stops or fails."""
        raise NotImplementedError

    # --- Driver -----------------------------------------------------------------------------

    def open(self, emit: Emit) -> None:
        """Listen on the service address (see `address`), start enabled links."""
        self._emit = emit
        listener = sc.Listener(self._listen, role=f"QKD service channel of interface {self.qkdi_id}")
        self._listener, self.address = listener, listener.address
        with self._lock:
            self._iface = "ENABLED"
        self._spawn(listener.serve, "accept", lambda conn: self._spawn(self._serve, "rx", conn))
        self._on_open()
        for link in list(self._links.values()):
            self._start(link)

    def close(self) -> None:
        """Stop every link and session, then wait (briefly) for the threads."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            links, wires = list(self._links.values()), list(self._wires)
            self._iface = "DISABLED"
        for link in links:
            link.stop.set()
        for wire in wires:
            wire.close(bye="module closed")
        self._on_close()
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
        self._check_device(cfg)
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
        link = self._new_link(cfg)
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
            return {"interface": {"qkdi_id": self.qkdi_id, "status": self._iface, **self._interface()},
                    "links": {k: ln.view() for k, ln in self._links.items()}}

    # --- transmitter: pair, run, retry -------------------------------------------------------

    def _transmit(self, link: Link) -> None:
        """Pair, run the session; on loss of the channel go PENDING and retry with backoff."""
        first, largest = self._retry()
        backoff = first
        while not link.stop.is_set():
            try:
                session = self._pair_as_transmitter(link)
            except Exception as exc:
                if not isinstance(exc, (sc.Refused, *_EXPECTED)):
                    self._log.exception("pairing link %s failed", link.cfg.qkdl_id)
                self._set_status(link, "PENDING", str(exc) if isinstance(exc, sc.Refused) else f"cannot pair: {exc}")
                link.stop.wait(backoff)
                backoff = min(backoff * 2, largest)
                continue
            backoff = first
            try:
                self._run_session(link, session)
                reason = "stopped"
            except Exception as exc:
                if not isinstance(exc, _EXPECTED):
                    self._log.exception("link %s session failed", link.cfg.qkdl_id)
                reason = f"service channel lost: {exc}"
            finally:
                self._release(link, session.wire)
            self._set_status(link, "PENDING", reason)
            link.stop.wait(first)

    def _pair_as_transmitter(self, link: Link) -> sc.Session:
        """Connect to the peer module's service address and pair; the wire becomes the link's."""
        cfg = link.cfg
        addr = self._peer_address(cfg.remote_qkdn or "", cfg.remote_qkdi or 0)
        if addr is None:
            raise sc.Refused("peer service address unknown")
        wire = sc.Wire.connect(addr)
        self._track(wire, True)
        try:
            session = sc.initiate(wire, self._service_key, self.kind, cfg.qkdl_id,
                                  sc.Endpoint(self.qkdn_id, self.qkdi_id),
                                  sc.Endpoint(cfg.remote_qkdn or "", cfg.remote_qkdi or 0), self._hello_extra())
            self._vet_peer(session)
            wire.settimeout(self._session_timeout())
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

    # --- receiver: vet, pair, run ------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        """One inbound service session: pair as the receiver, then run the link."""
        wire = sc.Wire(conn)
        self._track(wire, True)
        link: Link | None = None
        try:
            paired = self._pair_as_receiver(wire)
            if paired is not None:
                link = paired[0]
                self._run_receiver(link, paired[1])
        except Exception as exc:
            if not isinstance(exc, (sc.Refused, *_EXPECTED)):
                self._log.exception("service session failed")
            if link is not None:
                self._set_status(link, "PENDING", f"service channel lost: {exc}")
        finally:
            if link is not None:
                self._release(link, wire)
            else:
                self._track(wire, False)
                wire.close()

    def _refusal(self, hello: Mapping[str, Any]) -> tuple[Link | None, str | None]:
        """The link a hello asks for, and why it is refused (None: accepted)."""
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
            return link, self._refuse_hello(link, hello)

    def _pair_as_receiver(self, wire: sc.Wire) -> tuple[Link, sc.Session] | None:
        """Vet the hello and pair; None when refused (the wire says why)."""
        hello = self._read_hello(wire)
        if hello is None:
            return None
        link, refusal = self._refusal(hello)
        if refusal is not None:
            wire.refuse(refusal)
            return None
        assert link is not None
        try:
            session = sc.respond(wire, self._service_key, self.kind, hello, self._challenge_extra())
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
        self._on_paired(link)
        return link, session

    # --- bookkeeping ------------------------------------------------------------------------

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
        """Keep the live wires, so close() and a service-channel failure can drop them."""
        with self._lock:
            (self._wires.add if live else self._wires.discard)(wire)

    def _release(self, link: Link, wire: sc.Wire) -> None:
        """A session ended: the wire is no longer the link's, and is closed."""
        with self._lock:
            if link.wire is wire:
                link.wire = None
        self._track(wire, False)
        wire.close()

    def _start(self, link: Link) -> None:
        if not link.cfg.enabled:
            return
        self._set_status(link, "PENDING", "waiting for the service channel")
        if link.role == "TRANSMITTER":
            self._spawn(self._transmit, self._tx_thread, link)

    def _stop(self, link: Link, reason: str, report: bool = True) -> None:
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

    def _set_status(self, link: Link, status: str, reason: str, force: bool = False) -> bool:
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
        """Record and report the interface status; False when unchanged or disabled."""
        with self._lock:
            if self._iface == status or self._iface == "DISABLED":
                return False
            self._iface, self._iface_reason = status, reason if status == "FAILED" else ""
        self._log.warning("interface %s (%s)", status, reason)
        self._safe_emit("interface-status", {"qkdi_id": self.qkdi_id, "status": status, "reason": reason})
        return True

    def _sink_keys(self, link: Link, keys: list[tuple[str, bytes]]) -> None:
        """Hand keys to the sink in order; a failing sink is logged by type only (never key bytes)."""
        for key_id, key in keys:
            try:
                self._sink(link.cfg.qkdl_id, key_id, key)
            except Exception as exc:  # type only: a careless sink's message might quote the key
                self._log.error("key sink failed for link %s key %s: %s", link.cfg.qkdl_id, key_id,
                                type(exc).__name__)
