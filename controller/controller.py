"""The controller: agents, topology, services, and the operations orchestrators call.

Path computation is pure (pathcomp); this module turns its results into Plans of
per-agent edits and hands them to provisioning as one transaction. Notifications
update the view. The controller never sees key material: it configures links and
applications only.

The store holds the desired state (applications, channels) and what the controller owns
on each agent. Two loops keep the network in that state, both on the work thread:
- reconcile: on each (re)connect of an agent and every reconcile_interval, the agent's
  running configuration is compared with the store (provisioning/reconcile.py): missing
  entries are pushed (an agent restarted empty gets its links, cross-connects, VIRT links
  and applications back), owned orphans removed, other managers' entries left alone. A
  transaction that failed after some hops confirmed is reconciled on those hops at once.
- heal: when an agent is lost, a link goes down, and every heal_interval, each
  application's paths are checked against the view; a broken one is moved at once to the
  best path there is, or marked DEGRADED (its entries stay, so keys flow again when the
  path returns, and DEGRADED is then cleared); a working one is moved to a path better by
  better_margin once that path has stayed better for hold_down seconds. Moves are make
  before break: the new path's VIRT links, then the ends' applications, then removal of the
  old VIRT links, three transactions, so no hop drops a link a relay may still be using.
All provisioning (orchestrator calls, reconcile, heal) holds one lock from reading the store
to recording the result: a reconcile never sees a half-made service's entries as orphans.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from sdqkd.controller import qos
from sdqkd.controller import store as svc
from sdqkd.private import private_dir
from sdqkd.qkdprofile import secret_key_rate
from sdqkd.controller.alarms import CRITICAL, MAJOR, MINOR, Alarm, AlarmClock
from sdqkd.controller.config import ControllerConfig
from sdqkd.controller.metrics import ControllerMetrics
from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.pathcomp.optical import OpticalPath, OpticalRequest, busy_interfaces, optical_options, optical_path
from sdqkd.controller.pathcomp.relay import RelayPlan, RelayRequest, relay_paths
from sdqkd.controller.provisioning import reconcile as recon
from sdqkd.controller.provisioning import txn
from sdqkd.controller.southbound.agent import ETSI_NS, NSMAP, AgentAddress, AgentConnection, ident, qkd_node, text
from sdqkd.controller.southbound.interface import Southbound
from sdqkd.controller.southbound.restconf import RestconfConnection
from sdqkd.controller.southbound.ops import AppEdit, CrossConnectEdit, Edit, LinkEdit, Plan, present
from sdqkd.controller.topology import builder
from sdqkd.controller.topology.delivery import app_delivery
from sdqkd.controller.topology.model import Topology

log = logging.getLogger(__name__)

APP_NS = uuid.UUID("8d0c2b1e-5f4a-4e3b-9c2d-1a0b9e8f7c6d")


REFRESH_DEFER = 3.0  # s: how long a stale agent's re-read may wait for transactions to pause


# Events that describe a state (of a node, of a link) rather than something that happened:
# sent only when the state differs from the last one sent for the same subject, so an idle
# network streams nothing (agents are re-read on every performance update, ~6 a second).
_STATE_SUBJECT = {"node-synced": ("node", "qkdn_id"), "node-lost": ("node", "qkdn_id"),
                  "link-status": ("link", "node", "qkdl_id")}


class ControllerError(Exception):
    """An orchestrator request refused. kind: invalid | not-found | no-path | exhausted |
    conflict | failed | unavailable; tag: the NETCONF error-tag when an agent refused
    (failed). unavailable: an agent the request needs could not be reached or died mid-way;
    the message names it, nothing was left half-configured, a retry may take another path.
    exhausted:
    the network cannot carry the rate asked now; `offer` says what it can (requested_bps,
    best_bps, maxflow_bps, unreserved_maxflow_bps, best_paths) so the caller can renegotiate."""

    def __init__(self, kind: str, message: str, tag: str | None = None,
                 offer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.tag = tag
        self.offer = offer


@dataclass(frozen=True)
class Event:
    kind: str  # node-synced, node-lost, link-status, application-created, application-rerouted, ...
    data: dict[str, Any]
    at: float


class Controller:
    def __init__(self, cfg: ControllerConfig) -> None:
        self.cfg = cfg
        lab = cfg.inventory
        self.inventory = builder.Inventory(lab)
        private_dir(cfg.state_dir)  # its store: services, channels; one of an older version is tightened
        self.store = svc.ServiceStore(Path(cfg.state_dir) / "controller.sqlite")
        self.conns: dict[str, Southbound] = {}
        for a in cfg.agents:
            rc = a.restconf
            addr = AgentAddress(a.name, a.qkdn_id.lower(), a.host, a.port, a.username, a.password, a.key_filename, a.hostkey_b64, a.domain,
                                rc.url if rc else None, rc.ca if rc else None)
            kind = RestconfConnection if a.southbound == "restconf" else AgentConnection
            self.conns[addr.qkdn_id] = kind(addr, self._on_state, self._on_notification, on_lost=self._on_lost, on_up=self._on_up)
        self._topo: Topology | None = None
        self._topo_lock = threading.Lock()
        self._subscribers: list[queue.Queue[Event]] = []
        self._sub_lock = threading.Lock()
        self._work: queue.Queue[Any] = queue.Queue()
        self._worker = threading.Thread(target=self._work_loop, name="controller-work", daemon=True)
        self._stopped = threading.Event()
        # Agents whose view is stale (perf updates, status events): re-read in the
        # background at most once a second each, so bursts of notifications never
        # queue up in front of provisioning work.
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._refresher = threading.Thread(target=self._refresh_loop, name="controller-refresh", daemon=True)
        # Admission: the reservations of applications being provisioned, by app_id, so two
        # concurrent creates never both take the same link rate (held from path computation
        # until the application is stored or refused).
        self._admission = threading.RLock()
        self._pending: dict[str, list[dict[str, Any]]] = {}
        # StreamEvents sends state changes only: the last state event per subject.
        self._last_state: dict[tuple[str, ...], tuple[str, dict[str, Any]]] = {}
        self.alarms = AlarmClock()
        self._link_views: dict[str, dict[str, str]] = {}  # qkdl_id -> qkdn_id -> status that node reports
        self._started = time.time()
        self._intent = threading.RLock()  # see the module docstring
        self._heal_queued = threading.Event()
        self._better_since: dict[str, float] = {}  # app_id -> when a better path was first seen
        self._healed_shape: Any = None  # the relay graph's nodes and hops at the last heal pass
        # Runs before each transaction phase (txn.apply before_phase): tests kill hops there.
        self.txn_hook: Any = None
        self.metrics = ControllerMetrics(self)  # served by the daemon (config metrics.port)
        # A store from before ownership was recorded: what it desires is the controller's.
        self.store.own([(n, *e.key) for n, edits in self._desired().items() for e in edits])

    # --- life ----------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()
        self._refresher.start()
        for c in self.conns.values():
            c.start()

    def stop(self) -> None:
        self._stopped.set()
        self._work.put(None)
        if self._refresher.ident is not None:
            self._refresher.join(5)
        for c in self.conns.values():
            c.stop()
        self.metrics.stop()
        self.store.close()

    def wait_discovered(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        return all(c.wait_connected(max(0.0, end - time.monotonic())) for c in self.conns.values())

    # --- view ----------------------------------------------------------------------------

    def topology(self) -> Topology:
        with self._topo_lock:
            if self._topo is None:
                self._topo = self._build()
            return self._topo

    def _build(self) -> Topology:
        in_use: dict[str, set[int]] = {}
        for ch in self.store.channels():
            if ch.channel is not None:
                for f in ch.fibres:
                    in_use.setdefault(f, set()).add(ch.channel)
        agents = [(c.addr.name, c.qkdn_id, c.addr.domain, c.is_up(), c.data) for c in self.conns.values()]
        return builder.build(agents, self.inventory, in_use)

    def _invalidate(self) -> None:
        with self._topo_lock:
            self._topo = None

    @contextlib.contextmanager
    def view(self, topo: Topology) -> Iterator[None]:
        """See `topo` instead of what the agents report while the block runs (what-if path
        computation, tests); the view is rebuilt from the agents afterwards."""
        with self._topo_lock:
            self._topo = topo
        try:
            yield
        finally:
            self._invalidate()

    def subscriber_count(self) -> int:
        """How many event streams (gRPC StreamEvents calls) are listening now."""
        with self._sub_lock:
            return len(self._subscribers)

    # The view goes stale in these two places only: an agent re-read, or its session
    # lost (its node and links leave the view until it is back).

    def _on_state(self, conn: Southbound) -> None:
        self._invalidate()
        self.alarms.clear("node-disconnected", conn.qkdn_id)
        summary = _node_summary(conn.data)
        # a link's alarm starts when either end first reports it not ACTIVE, ends when both say ACTIVE
        with self._sub_lock:
            for lid, status in summary["links"].items():
                views = self._link_views.setdefault(lid, {})
                views[conn.qkdn_id] = status
                if all(v == "ACTIVE" for v in views.values()):
                    self.alarms.clear("link-down", lid)
                else:
                    self.alarms.mark("link-down", lid)
        self._emit("node-synced", {"node": conn.addr.name, "qkdn_id": conn.qkdn_id, **summary})

    def _on_lost(self, conn: Southbound) -> None:
        self._invalidate()
        self.alarms.mark("node-disconnected", conn.qkdn_id)
        self._emit("node-lost", {"node": conn.addr.name, "qkdn_id": conn.qkdn_id, "error": conn.last_error})
        self._want_heal()

    def _on_up(self, conn: Southbound) -> None:
        """A (re)connected agent may have restarted empty, or with entries of a transaction
        that never finished: reconcile it, then see whether applications can use it again."""
        self._work.put(("reconcile", conn.qkdn_id))
        self._want_heal()

    def _want_heal(self) -> None:
        """One heal pass queued at a time: losses and ticks that come while one waits share it."""
        if not self._heal_queued.is_set():
            self._heal_queued.set()
            self._work.put(("heal",))

    def _on_notification(self, conn: Southbound, content: etree._Element) -> None:
        """One small handler per notification type (Faucet style); failures are contained."""
        name = etree.QName(content).localname.replace("-", "_")  # sdqkd-qrng's source-failed: _n_source_failed
        handler = getattr(self, f"_n_{name}", None)
        if handler is not None:
            handler(conn, content)

    def _n_sdqkdn_link_down(self, conn: Southbound, content: etree._Element) -> None:
        lid = (content.findtext(f".//{{{ETSI_NS}}}qkdl_id") or "").lower()
        self._emit("link-down", {"node": conn.addr.name, "qkdl_id": lid, "reason": content.findtext(f".//{{{ETSI_NS}}}reason")})
        self._work.put(("refresh-and-reroute", conn.qkdn_id, lid))

    def _n_event(self, conn: Southbound, content: etree._Element) -> None:
        link = content.find(f"{{{ETSI_NS}}}link")
        if link is not None:
            status = ident(link.findtext(f"{{{ETSI_NS}}}qkdl_status"))
            self._emit("link-status", {"node": conn.addr.name, "qkdl_id": link.findtext(f"{{{ETSI_NS}}}qkdl_id"), "status": status})
            self._mark_dirty(conn.qkdn_id)

    def _n_sdqkdn_link_perf_update(self, conn: Southbound, content: etree._Element) -> None:
        # A re-read, not the figures patched into the last <get> in place: tried, the
        # create p99 got worse in bench/provision.py (160 vs 81 ms, same machine state)
        self._mark_dirty(conn.qkdn_id)

    def _n_source_failed(self, conn: Southbound, content: etree._Element) -> None:
        """sdqkd-qrng: the node's QRNG failed its health tests (no end keys from it until repaired)."""
        self._emit("qrng-failed", {"node": conn.addr.name, "message": content.findtext("qr:message", namespaces=NSMAP),
                                   "test": content.findtext("qr:health-test/qr:test", namespaces=NSMAP)})
        self._mark_dirty(conn.qkdn_id)

    def _n_source_recovered(self, conn: Southbound, content: etree._Element) -> None:
        self._emit("qrng-recovered", {"node": conn.addr.name})
        self._mark_dirty(conn.qkdn_id)

    def _n_sdqkdn_interface_down(self, conn: Southbound, content: etree._Element) -> None:
        self._emit("interface-down", {"node": conn.addr.name, "qkdi_id": content.findtext(f".//{{{ETSI_NS}}}qkdi_id")})
        self._mark_dirty(conn.qkdn_id)

    def _n_sdqkdn_application_new(self, conn: Southbound, content: etree._Element) -> None:
        """An SAE asked its node for keys with a peer no application covers. The QoS it
        asked with (ETSI 004 open_connect: min/max bps, TTL, priority) comes in the
        notification's app_qos / app_priority (ETSI 015), and the application made for it
        carries and reserves it."""
        master = content.findtext(f".//{{{ETSI_NS}}}server_app_id")
        slave = content.findtext(f".//{{{ETSI_NS}}}client_app_id")
        asked = _notified_qos(content)
        self._emit("application-requested", {"node": conn.addr.name, "master": master, "slave": slave, "qos": asked})
        if self.cfg.auto_applications and master and slave:
            self._work.put(("auto-app", master, slave, asked))

    def _mark_dirty(self, qkdn_id: str) -> None:
        with self._dirty_lock:
            self._dirty.add(qkdn_id)

    def _refresh_loop(self) -> None:
        # Once every agent is read, what the controller has built (sessions, parsers,
        # module-level tables) lives as long as it: keep it out of the collector's way.
        # Each full collection scanned it all again: gen-2 passes of 70-160 ms landed
        # inside creates (bench/provision.py, the slowest creates with their GCs).
        if self.wait_discovered(30) and not self._stopped.is_set():
            gc.collect()
            gc.freeze()
        # A <get> keeps its agent busy dumping state: one that lands in a transaction
        # on that agent slows its every phase. While a transaction runs, a re-read
        # waits for a later tick, for at most REFRESH_DEFER seconds.
        deferred: dict[str, float] = {}
        next_heal = time.monotonic() + self.cfg.heal_interval
        next_reconcile = time.monotonic() + self.cfg.reconcile_interval
        while not self._stopped.wait(min(1.0, self.cfg.heal_interval)):
            now = time.monotonic()
            if now >= next_heal:
                next_heal = now + self.cfg.heal_interval
                self._want_heal()
            if now >= next_reconcile:
                next_reconcile = now + self.cfg.reconcile_interval
                self._work.put(("reconcile-all",))
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
            now = time.monotonic()
            for qid in dirty:
                if txn.busy() and now - deferred.setdefault(qid, now) < REFRESH_DEFER:
                    self._mark_dirty(qid)
                    continue
                deferred.pop(qid, None)
                try:
                    self.conns[qid].refresh()  # on_state: the view is rebuilt on next use
                except Exception as exc:  # noqa: BLE001 - it reconnects and resyncs by itself
                    log.debug("refresh of %s failed: %s", qid, exc)

    def _work_loop(self) -> None:
        """Provisioning in reaction to events (reroutes, requested applications), one at a time."""
        while True:
            item = self._work.get()
            if item is None:
                return
            try:
                kind = item[0]
                if kind == "refresh-and-reroute":
                    try:
                        self.conns[item[1]].refresh()
                    except Exception as exc:  # noqa: BLE001 - lost meanwhile: the view has it down
                        log.debug("refresh of %s failed: %s", item[1], exc)
                    self.reroute(item[2])
                elif kind == "heal":
                    self._heal_queued.clear()
                    self.heal()
                elif kind == "reconcile":
                    self.reconcile(item[1])
                elif kind == "reconcile-all":
                    self.reconcile_all()
                elif kind == "auto-app":
                    if not any({a.master_sae, a.slave_sae} == {item[1], item[2]} for a in self.store.apps()):
                        self.create_application(item[1], item[2], **(item[3] if len(item) > 3 else {}))
            except ControllerError as exc:
                log.warning("background %s failed: %s", item[0], exc.message)
            except Exception:  # noqa: BLE001 - one failure must not stop the controller
                log.exception("background %s failed", item[0])

    # --- events for orchestrators -----------------------------------------------------------

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "application-degraded":
            self.alarms.mark("application-degraded", data.get("app_id", ""))
        elif kind in ("application-rerouted", "application-deleted"):
            self.alarms.clear("application-degraded", data.get("app_id", ""))
        ev = Event(kind, data, time.time())
        with self._sub_lock:
            subject = _STATE_SUBJECT.get(kind)
            if subject is not None:
                key = (subject[0], *(str(data.get(f)) for f in subject[1:]))
                if self._last_state.get(key) == (kind, data):
                    return  # nothing changed since the last one
                self._last_state[key] = (kind, data)
            subs = list(self._subscribers)
        for q in subs:
            try:
                q.put_nowait(ev)
            except queue.Full:
                pass

    def events(self, stop: threading.Event) -> Iterator[Event]:
        """Subscribed on return (not on first iteration), so no event is missed."""
        q: queue.Queue[Event] = queue.Queue(maxsize=1000)
        with self._sub_lock:
            self._subscribers.append(q)

        def stream() -> Iterator[Event]:
            try:
                while not stop.is_set() and not self._stopped.is_set():
                    try:
                        yield q.get(timeout=0.5)
                    except queue.Empty:
                        continue
            finally:
                with self._sub_lock:
                    self._subscribers.remove(q)

        return stream()

    def alarm_list(self) -> list[Alarm]:
        """What is wrong now (see alarms.py), most severe first: agents not connected, PHYS
        links between connected nodes that are not ACTIVE, applications DEGRADED or whose
        path uses a link that is not ACTIVE, links holding more than their rate."""
        topo = self.topology()
        found: list[Alarm] = []
        for c in self.conns.values():
            if not c.connected.is_set():
                self.alarms.mark("node-disconnected", c.qkdn_id, at=self._started)  # kept if lost later
                found.append(Alarm("node-disconnected", c.qkdn_id, CRITICAL,
                                   f"agent {c.addr.name} is not connected ({c.last_error or 'not connected yet'})"))

        def name(n: str) -> str:
            return topo.nodes[n].name if n in topo.nodes else n

        for lk in sorted(topo.links.values(), key=lambda lk: lk.qkdl_id):
            ends_up = all(n in topo.nodes and topo.nodes[n].up for n in (lk.a, lk.b))
            if ends_up and not lk.active:
                found.append(Alarm("link-down", lk.qkdl_id, MAJOR, f"QKD link {name(lk.a)}-{name(lk.b)} is {lk.status}"))
        for app in self.store.apps():
            if app.state == "DEGRADED":
                found.append(Alarm("application-degraded", app.app_id, MAJOR,
                                   f"application {app.master_sae} -> {app.slave_sae} has no working path"))
                continue
            broken = sorted({lid for p in app.paths for lid in p["links"]
                             if lid not in topo.links or not topo.links[lid].active})
            if broken:
                found.append(Alarm("application-path-down", app.app_id, MAJOR,
                                   f"application {app.master_sae} -> {app.slave_sae} uses links not ACTIVE: {', '.join(broken)}"))
        for r in self.reservations():
            if r["status"] == "ACTIVE" and r["reserved_bps"] > r["capacity_bps"] * (1 + 1e-9) + 1e-6:
                found.append(Alarm("link-oversubscribed", r["qkdl_id"], MINOR,
                                   f"QKD link {name(r['a'])}-{name(r['b'])} holds {r['reserved_bps']:.0f} bit/s of "
                                   f"reservations but makes {r['capacity_bps']:.0f} bit/s"))
        return self.alarms.current(found)

    # --- key-relay applications ------------------------------------------------------------

    def node_of_sae(self, sae: str) -> str:
        node = self.cfg.saes.get(sae)
        if node is None:
            raise ControllerError("not-found", f"unknown SAE '{sae}'")
        return node.lower()

    def compute_relay(self, src: str, dst: str, min_bps: float = 0.0, avoid_links: frozenset[str] = frozenset(),
                      bound: bool = True, *, avoid_nodes: frozenset[str] = frozenset(),
                      exclude_app: str | None = None) -> RelayPlan:
        """Paths from src to dst. bound=False: provisioning, which needs no max-flow bound
        when one path does. A min_bps is met on what the other applications' reservations
        leave free (exclude_app: an application whose own reservation is given back, as when
        it moves); best effort (min_bps 0) reserves nothing and sees every link's full rate.
        A rate the network cannot carry now is refused as `exhausted` with the best offer."""
        topo = self.topology()
        req = RelayRequest(src, dst, min_bps=min_bps, avoid_links=avoid_links, avoid_nodes=avoid_nodes, bound=bound)
        if min_bps <= 0:
            try:
                return relay_paths(topo, req)
            except NoPath as exc:
                raise ControllerError("no-path", str(exc)) from None
        free = qos.residual(topo, self._holds(topo, exclude_app))
        try:
            return relay_paths(free, req)
        except NoPath as exc:
            refused = exc
        try:  # is there a path at all, whatever the rate and the reservations?
            unreserved = relay_paths(topo, dataclasses.replace(req, min_bps=0.0, bound=True))
        except NoPath as exc:
            raise ControllerError("no-path", str(exc)) from None
        best = None
        try:
            best = relay_paths(free, dataclasses.replace(req, min_bps=0.0, bound=True))
            if best.paths and refused.achievable_bps and refused.achievable_bps > best.total_bps:
                best = relay_paths(free, dataclasses.replace(req, min_bps=refused.achievable_bps * (1 - 1e-9)))
        except NoPath:
            best = None
        best_bps = max(refused.achievable_bps or 0.0, best.total_bps if best else 0.0)
        offer = {"requested_bps": min_bps, "best_bps": best_bps,
                 "maxflow_bps": refused.maxflow_bps if refused.maxflow_bps is not None else (best.maxflow_bps or 0.0) if best else 0.0,
                 "unreserved_maxflow_bps": unreserved.maxflow_bps or 0.0,
                 "best_paths": [dataclasses.asdict(p) for p in best.paths] if best else []}
        names = [topo.nodes[n].name if n in topo.nodes else n for n in (src, dst)]
        raise ControllerError(
            "exhausted", f"{min_bps:.0f} bit/s does not fit from {names[0]} to {names[1]}: the best now is "
                         f"{best_bps:.0f} bit/s (max-flow bound {offer['maxflow_bps']:.0f} bit/s with the other "
                         f"applications' reservations kept, {offer['unreserved_maxflow_bps']:.0f} bit/s without)",
            offer=offer)

    def _holds(self, topo: Topology, exclude_app: str | None = None) -> list[qos.Hold]:
        """Every reservation: stored applications' and those being provisioned."""
        out: list[qos.Hold] = []
        with self._admission:
            pending = dict(self._pending)
        for app in self.store.apps():
            if app.app_id != exclude_app and app.app_id not in pending:
                out += qos.holds(topo, app.app_id, app.paths)
        for app_id, paths in pending.items():
            if app_id != exclude_app:
                out += qos.holds(topo, app_id, paths)
        return out

    def reservations(self, links: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Per link: its rate now, what applications hold on it and what is left, for the
        links asked (default: every link in the view or with a reservation)."""
        topo = self.topology()
        held = qos.by_link(self._holds(topo))
        ids = sorted(links or (set(topo.links) | set(held)))
        out = []
        for lid in ids:
            lk = topo.links.get(lid)
            cap = lk.skr if lk is not None and lk.active else 0.0
            hs = held.get(lid, [])
            total = sum(h.bps for h in hs)
            out.append({"qkdl_id": lid, "a": lk.a if lk else "", "b": lk.b if lk else "",
                        "status": lk.status if lk else "UNKNOWN", "capacity_bps": cap, "reserved_bps": total,
                        "available_bps": max(0.0, cap - total), "reservations": [(h.app_id, h.bps) for h in hs]})
        return out

    def app_delivery(self, app: svc.Application) -> list[tuple[str, dict[str, Any]]]:
        """(qkdn_id, counts) of an application's key delivery at its end nodes, from each
        agent's last read; an end whose agent is down or silent is left out."""
        out = []
        for qid in dict.fromkeys((app.src, app.dst)):
            conn = self.conns.get(qid)
            got = app_delivery(conn.data, app.app_id) if conn is not None and conn.is_up() else None
            if got is not None:
                out.append((qid, got))
        return out

    def known_links(self) -> set[str]:
        """Every qkdl_id the controller knows: in the view, made as channels, used by applications."""
        known = set(self.topology().links)
        known |= {c.chan_id for c in self.store.channels()}
        for app in self.store.apps():
            for p in app.paths:
                known.update(p["links"])
                if p.get("vlink"):
                    known.add(p["vlink"])
        return known

    def create_application(self, master_sae: str, slave_sae: str, *, min_bps: float = 0.0, max_bps: float = 0.0,
                           ttl: int = 0, priority: int = 0, app_id: str | None = None,
                           avoid_links: frozenset[str] = frozenset(),
                           disjoint_from: tuple[tuple[str, str], ...] = ()) -> svc.Application:
        """Key relay between two SAEs. min_bps is admitted only if it fits in what other
        applications' reservations leave (several paths when one is not enough), and is then
        held on the links used until the application is deleted. disjoint_from: (app_id,
        "link" | "node") pairs whose paths the new one must not share."""
        for name, v in (("min_bps", min_bps), ("max_bps", max_bps)):
            if not math.isfinite(v) or v < 0:
                raise ControllerError("invalid", f"{name} must be a finite number >= 0, not {v}")
        if max_bps and min_bps > max_bps:
            raise ControllerError("invalid", f"min_bps ({min_bps:g}) exceeds max_bps ({max_bps:g})")
        if app_id is not None:
            try:
                app_id = str(uuid.UUID(app_id))
            except ValueError:
                raise ControllerError("invalid", f"app_id must be a UUID, not {app_id!r}") from None
        avoid_links = frozenset(x.lower() for x in avoid_links)
        if avoid_links:
            unknown = sorted(avoid_links - self.known_links())
            if unknown:
                raise ControllerError("invalid", f"avoid_links names unknown links: {', '.join(unknown)}")
        src, dst = self.node_of_sae(master_sae), self.node_of_sae(slave_sae)
        if src == dst:
            raise ControllerError("invalid", "both SAEs are on the same node: its LKMS serves them without a path")
        avoid_nodes: set[str] = set()
        for other_id, mode in disjoint_from:
            other = self.store.app(other_id.lower())
            if other is None:
                raise ControllerError("not-found", f"no application {other_id} (disjoint_from)")
            if mode not in ("link", "node"):
                raise ControllerError("invalid", f"disjointness must be link or node, not {mode!r}")
            avoid_links |= {lid for p in other.paths for lid in p["links"]}
            if mode == "node":
                avoid_nodes |= {n for p in other.paths for n in p["nodes"]} - {src, dst}
        app_id = (app_id or str(uuid.uuid5(APP_NS, f"{master_sae}|{slave_sae}"))).lower()
        app = svc.Application(app_id, master_sae, slave_sae, src, dst, min_bps, max_bps, ttl, priority)
        # Paths computed and their rate held in one step (path computation takes milliseconds;
        # provisioning, much longer): concurrent creates see each other's holds. The intent lock
        # (module docstring) keeps reconciliation from taking a half-made service for an orphan.
        with self._intent:
            with self._admission:
                if self.store.app(app_id) is not None or app_id in self._pending:
                    raise ControllerError("conflict", f"application {app_id} exists")
                plan_result = self.compute_relay(src, dst, min_bps, avoid_links, bound=False,
                                                 avoid_nodes=frozenset(avoid_nodes))
                plan = self._app_plan(app, plan_result)
                self._pending[app_id] = app.paths
            try:
                self._apply(plan)
                self.store.put_app(app)
            finally:
                with self._admission:
                    self._pending.pop(app_id, None)
        log.info("application %s (%s -> %s) over %s", app_id, master_sae, slave_sae,
                 " + ".join("-".join(self.conns[n].addr.name if n in self.conns else n for n in p["nodes"]) for p in app.paths))
        self._emit("application-created", {"app_id": app_id, "paths": app.paths})
        return app

    def _app_plan(self, app: svc.Application, result: RelayPlan) -> Plan:
        """Set `app`'s paths to `result`'s and return every edit the application needs."""
        app.paths, app.backing = [], []
        # what each path holds of min_bps (qos.py); a VIRT link's virt_bandwidth is what it
        # holds, or for best effort its planned rate
        held = qos.shares([p.bps for p in result.paths], app.min_bps)
        for n, path in enumerate(result.paths):
            nodes = list(path.nodes)
            vlink = None if len(nodes) == 2 else str(uuid.uuid5(APP_NS, f"{app.app_id}/{n}/{'-'.join(path.links)}"))
            # adjacent ends: the PHYS link backs the application directly
            app.backing.append(vlink or path.links[0])
            app.paths.append({"vlink": vlink, "nodes": nodes, "links": list(path.links), "bps": path.bps,
                              "reserved": held[n]})
        plan = Plan()
        self._vlink_edits(app, plan)
        self._end_edits(app, plan)
        return plan

    @staticmethod
    def _vlink_edits(app: svc.Application, plan: Plan, skip: frozenset[str] = frozenset()) -> None:
        """The VIRT link of each relayed path on every node of it (but those in `skip`); its
        virt_bandwidth is what the path holds of min_bps, or for best effort its planned rate."""
        for p in app.paths:
            nodes, vlink = p["nodes"], p["vlink"]
            if vlink is None or vlink in skip:
                continue
            held = float(p.get("reserved") or 0.0)
            bandwidth = math.ceil(held) if held > 0 else int(p["bps"])
            for i, node in enumerate(nodes):
                remote = nodes[-1] if i < len(nodes) - 1 else nodes[0]
                plan.add(node, LinkEdit(vlink, "VIRT", node, remote, prev_hop=nodes[i - 1] if i else None,
                                        next_hops=(nodes[i + 1],) if i < len(nodes) - 1 else (), bandwidth=bandwidth))

    @staticmethod
    def _end_edits(app: svc.Application, plan: Plan) -> None:
        """The qkd_app entry at both ends."""
        for end, far in ((app.src, app.dst), (app.dst, app.src)):
            plan.add(end, AppEdit(app.app_id, app.master_sae, (app.slave_sae,), tuple(app.backing), end, far, app.priority or None,
                                  int(app.min_bps) or None, int(app.max_bps) or None, app.ttl or None))

    def _up_only(self, plan: Plan) -> Plan:
        """A removal plan without the agents that are down: their entries are owned, no longer
        desired, and removed by reconciliation when they are back (a delete must not wait for
        a dead node, nor fail because of it)."""
        out = Plan()
        left: list[svc.Owned] = []
        for node, edits in plan.edits.items():
            for e in edits:
                if node in self.conns and self.conns[node].is_up():
                    out.add(node, e)
                else:
                    left.append((node, *e.key))
        self.store.own(left)  # so that reconciliation knows them for the controller's
        return out

    def delete_application(self, app_id: str) -> None:
        with self._intent:
            app = self.store.app(app_id.lower())
            if app is None:
                raise ControllerError("not-found", f"no application {app_id}")
            plan = Plan()
            for end in (app.src, app.dst):
                plan.add(end, AppEdit(app.app_id, delete=True))
            for p in app.paths:
                if p["vlink"]:
                    for node in p["nodes"]:
                        plan.add(node, LinkEdit(p["vlink"], "VIRT", node, node, delete=True))
            plan = self._up_only(plan)
            if plan.edits:
                self._apply(plan)
            self.store.delete_app(app.app_id)
        self._better_since.pop(app.app_id, None)
        self._emit("application-deleted", {"app_id": app.app_id})

    def reroute(self, down_link: str) -> list[str]:
        """Move every application that used `down_link` to a path without it (or mark it
        DEGRADED): a heal pass that also treats `down_link` as gone before the view says so."""
        return self.heal(avoid_links=frozenset({down_link}))

    # --- self-healing ----------------------------------------------------------------------

    def heal(self, avoid_links: frozenset[str] = frozenset()) -> list[str]:
        """One pass over every application (see the module docstring); one application's
        failure is logged and the pass goes on with the next. Returns the moved app_ids."""
        g = self.topology().relay_graph()
        shape = (frozenset(g.nodes), frozenset(frozenset(e) for e in g.edges))
        apps = self.store.apps()
        # Nothing to do while the graph keeps its shape (rates alone move nobody: a better path
        # comes with a hop or node that returns), no move back is pending and none is DEGRADED:
        # the pass then costs one look at the graph, not a path computation per application.
        if (not avoid_links and shape == self._healed_shape and not self._better_since
                and all(a.state != "DEGRADED" for a in apps)):
            return []
        self._healed_shape = shape
        moved = []
        for app in apps:
            try:
                if self._heal_app(app.app_id, avoid_links):
                    moved.append(app.app_id)
            except ControllerError as exc:
                log.warning("application %s: %s", app.app_id, exc.message)
            except Exception:  # noqa: BLE001 - the next application is still healed
                log.exception("healing application %s failed", app.app_id)
        return moved

    def _heal_app(self, app_id: str, avoid_links: frozenset[str]) -> bool:
        with self._intent:
            app = self.store.app(app_id)
            if app is None:
                return False
            topo = self.topology()
            g = topo.relay_graph()
            broken = not all(_path_usable(g, p, avoid_links) for p in app.paths)
            try:  # on what other applications' holds leave free, this one's own given back
                best: RelayPlan | None = self.compute_relay(app.src, app.dst, app.min_bps, avoid_links=avoid_links,
                                                            bound=False, exclude_app=app.app_id)
            except ControllerError as exc:  # no path, or not at the rate it holds
                best, why = None, exc.message
            if broken:
                self._better_since.pop(app_id, None)
                if best is None:
                    if app.state != "DEGRADED":
                        app.state = "DEGRADED"
                        self.store.put_app(app)
                        log.warning("application %s DEGRADED: %s", app_id, why)
                        self._emit("application-degraded", {"app_id": app_id, "reason": why})
                    return False
                try:
                    self._move(app, best, "path broken")
                except ControllerError as exc:  # keys fail meanwhile: say so; the next pass tries again
                    if app.state != "DEGRADED":
                        app.state = "DEGRADED"
                        self.store.put_app(app)
                        self._emit("application-degraded", {"app_id": app_id, "reason": exc.message})
                    raise
                return True
            if app.state == "DEGRADED":
                app.state = "ACTIVE"
                self.store.put_app(app)
                log.info("application %s: its path is back", app_id)
                self._emit("application-restored", {"app_id": app_id, "paths": app.paths})
            if best is None or not self._better(app, g, best):
                self._better_since.pop(app_id, None)
                return False
            since = self._better_since.setdefault(app_id, time.monotonic())
            if time.monotonic() - since < self.cfg.hold_down:
                return False
            self._move(app, best, "better path")
            self._better_since.pop(app_id, None)  # after the move: a failed one is tried again next pass
            return True

    def _better(self, app: svc.Application, g: Any, best: RelayPlan) -> bool:
        """Whether `best` beats the application's current paths by better_margin: by cost
        (seconds of link key per relayed bit, what path computation minimises) for one path
        each, else by total rate."""
        margin = self.cfg.better_margin
        if len(app.paths) == 1 and len(best.paths) == 1:
            return _cost(g, best.paths[0].nodes) < _cost(g, app.paths[0]["nodes"]) * (1 - margin)
        now = sum(min((g[a][b]["capacity"] for a, b in zip(p["nodes"], p["nodes"][1:])), default=0.0) for p in app.paths)
        return best.total_bps > now * (1 + margin)

    def _move(self, app: svc.Application, result: RelayPlan, why: str) -> None:
        """Make before break: (1) the new paths' VIRT links on their nodes, (2) the ends'
        applications onto them (recorded in the store once done), (3) the old VIRT links off
        the nodes that are up. A failure in (1) or (2) leaves the application as it was
        (reconciliation removes what (1) left); in (3), the leftovers are orphans, removed by
        reconciliation."""
        old = svc.Application(**asdict(app))
        new = svc.Application(**asdict(app))
        self._app_plan(new, result)
        if [p["vlink"] or tuple(p["nodes"]) for p in new.paths] == [p["vlink"] or tuple(p["nodes"]) for p in old.paths]:
            return
        make = Plan()
        self._vlink_edits(new, make, skip=frozenset(p["vlink"] for p in old.paths if p["vlink"]))
        if make.edits:
            self._apply(make)
        switch = Plan()
        self._end_edits(new, switch)
        self._apply(switch)
        new.state = "ACTIVE"
        self.store.put_app(new)
        brk = Plan()
        for p in old.paths:
            if p["vlink"] and p["vlink"] not in new.backing:
                for node in p["nodes"]:
                    brk.add(node, LinkEdit(p["vlink"], "VIRT", node, node, delete=True))
        brk = self._up_only(brk)
        if brk.edits:
            try:
                self._apply(brk)
            except ControllerError as exc:
                log.warning("old paths of %s stay until reconciled: %s", app.app_id, exc.message)
        log.info("application %s moved (%s) to %s", app.app_id, why,
                 " + ".join("-".join(self.conns[n].addr.name if n in self.conns else n for n in p["nodes"]) for p in new.paths))
        self._emit("application-rerouted", {"app_id": app.app_id, "paths": new.paths, "reason": why,
                                            "avoided": sorted({lk for p in old.paths for lk in p["links"]} - {lk for p in new.paths for lk in p["links"]})})

    # --- reconciliation --------------------------------------------------------------------

    def _desired(self) -> dict[str, list[Edit]]:
        """Every edit the store's services put on each agent."""
        plan = Plan()
        for app in self.store.apps():
            self._vlink_edits(app, plan)
            self._end_edits(app, plan)
        for ch in self.store.channels():
            for node, edits in self._channel_plan(ch).edits.items():
                for e in edits:
                    plan.add(node, e)
        return plan.edits

    def reconcile_all(self) -> dict[str, int]:
        """reconcile() on every agent that is up; {node name: edits made}."""
        out = {}
        for qid, c in self.conns.items():
            if c.is_up():
                try:
                    out[c.addr.name] = self.reconcile(qid)
                except ControllerError as exc:
                    log.warning("reconciling %s failed: %s", c.addr.name, exc.message)
        return out

    def reconcile(self, qkdn_id: str) -> int:
        """Bring one agent to what the store says (provisioning/reconcile.py): returns how many
        entries were pushed or removed. When the agent refuses the whole edit (an application
        whose backing link another manager removed), each entry is tried alone, so one bad
        entry does not keep the others away."""
        conn = self.conns[qkdn_id]
        with self._intent:
            try:
                data = conn.get_config()
            except Exception as exc:  # noqa: BLE001 - down again: its next (re)connect reconciles it
                self.metrics.reconciled(conn.addr.name, "unavailable")
                raise ControllerError("unavailable", f"agent {conn.addr.name} is unreachable ({exc})") from None
            d = recon.diff(self._desired().get(qkdn_id, []), present(data), self.store.owned(qkdn_id))
            self.store.disown([(qkdn_id, *k) for k in d.forget])
            if not d:
                self.metrics.reconciled(conn.addr.name, "in-sync")
                return 0
            edits = d.edits
            plan = Plan()
            for e in edits:
                plan.add(qkdn_id, e)
            try:
                self._apply(plan)
                done = len(edits)
            except ControllerError as exc:
                if exc.kind == "unavailable":
                    self.metrics.reconciled(conn.addr.name, "unavailable")
                    raise
                log.warning("reconciling %s in one edit failed (%s): entry by entry", conn.addr.name, exc.message)
                done = 0
                for e in edits:
                    one = Plan()
                    one.add(qkdn_id, e)
                    try:
                        self._apply(one)
                        done += 1
                    except ControllerError as exc1:
                        log.warning("reconciling %s: %s %s refused: %s", conn.addr.name, *e.key, exc1.message)
        self.metrics.reconciled(conn.addr.name, "repaired" if done == len(edits) else "partly", len(d.push), len(d.remove))
        log.info("agent %s reconciled: %d pushed, %d orphans removed", conn.addr.name, len(d.push), len(d.remove))
        self._emit("node-reconciled", {"node": conn.addr.name, "qkdn_id": qkdn_id, "pushed": [list(e.key) for e in d.push],
                                       "removed": [list(k) for k in d.remove]})
        return done

    def _apply(self, plan: Plan) -> txn.TxnReport:
        """One transaction. Every entry it creates is recorded as the controller's first; the
        ones it deletes are forgotten once it succeeds. When it fails after some hops confirmed
        (a hop died in the confirm phase), those hops are reconciled against the store at once,
        so none keeps half a path."""
        self.store.own([(n, *e.key) for n, edits in plan.edits.items() for e in edits if not e.delete])
        t0 = time.perf_counter()
        try:
            report = txn.apply(plan, self.conns, confirm_timeout=self.cfg.confirm_timeout, before_phase=self.txn_hook)
            self.metrics.transaction(time.perf_counter() - t0, report, "ok")
        except txn.TxnError as exc:
            self.metrics.transaction(time.perf_counter() - t0, None, "unavailable" if exc.unavailable else "failed")
            if exc.unavailable:
                self._invalidate()  # the dead hop leaves the view now, not when its pump notices
            for n in exc.committed:
                try:
                    self.reconcile(n)
                except ControllerError as rexc:
                    log.warning("repairing %s after a failed transaction: %s", n, rexc.message)
            kind = "unavailable" if exc.unavailable else "failed"
            raise ControllerError(kind, f"provisioning failed at {exc.node}: {exc.message} ({exc.tag})", exc.tag) from None
        self.store.disown([(n, *e.key) for n, edits in plan.edits.items() for e in edits if e.delete])
        for n in set(plan.stale_views()) & set(report.nodes):
            self._mark_dirty(n)
        return report

    # --- direct quantum channels -------------------------------------------------------------

    def _busy(self, topo: Topology) -> dict[tuple[str, int], str]:
        """Modules serving a link: the agents' links and the channels set up, reported yet or not."""
        busy = dict(topo.memo("optical_busy", busy_interfaces))
        for ch in self.store.channels():
            for end in (ch.tx, ch.rx):
                busy.setdefault((end[0], int(end[1])), ch.chan_id)
        return busy

    def compute_optical(self, req: OpticalRequest) -> OpticalPath:
        try:
            topo = self.topology()
            return optical_path(topo, req, self._busy(topo))
        except NoPath as exc:
            raise ControllerError("no-path", str(exc)) from None

    def compute_channel(self, req: OpticalRequest, limit: int | None = None) -> list[tuple[OpticalPath, float, bool]]:
        """Dry run of create_channel: every feasible (Tx, Rx, channel) with its lowest-loss route
        (the best `limit` of them when given), the key rate the Tx's profile gives at that
        loss, and whether a module of it is busy."""
        topo = self.topology()
        busy = self._busy(topo)
        try:
            options = optical_options(topo, req, busy)
        except NoPath as exc:
            raise ControllerError("no-path", str(exc)) from None
        return [(p, self.expected_rate(topo, p), p.tx in busy or p.rx in busy) for p in options[:limit]]

    def expected_rate(self, topo: Topology, path: OpticalPath) -> float:
        """Mean key rate (bit/s) the Tx's profile gives for the path: its loss, the most same-band
        classical channels on one of its fibres, one span per fibre; 0 without a profile."""
        node = topo.nodes.get(path.tx[0])
        profile = self.inventory.profile(node.name, path.tx[1]) if node else None
        if profile is None:
            return 0.0
        classical = max((sum(1 for c in topo.fibres[f].classical if c.band == profile.band)
                         for f in path.fibres if f in topo.fibres), default=0)
        return secret_key_rate(profile, path.loss_db, classical, spans=max(1, len(path.fibres)))

    def create_channel(self, req: OpticalRequest, chan_id: str | None = None) -> svc.Channel:
        with self._intent:
            path = self.compute_optical(req)
            topo = self.topology()
            chan_id = (chan_id or str(uuid.uuid4())).lower()
            switch_nodes = {hop[0]: topo.switches[hop[0]].node for hop in path.hops}
            ch = svc.Channel(chan_id, path.tx, path.rx, path.channel, list(path.fibres), [list(h) for h in path.hops], path.loss_db, switch_nodes)
            plan = self._channel_plan(ch)
            self._apply(plan)
            self.store.put_channel(ch)
        self._reread(plan)
        log.info("direct channel %s %s:%s -> %s:%s, %.2f dB", chan_id, *path.tx, *path.rx, path.loss_db)
        self._emit("channel-created", {"chan_id": chan_id, "tx": list(path.tx), "rx": list(path.rx), "channel": path.channel, "loss_db": path.loss_db})
        return ch

    def _reread(self, plan: Plan) -> None:
        """Re-read the switches and ends a channel change touched before returning: the next
        channel request is computed on their cross-connects and links as they now are (with
        the refresh loop's deferred re-read, a channel created right after a delete was
        refused a port the delete had freed). Channel changes are rare; applications keep the
        deferred re-read (ops.Plan.stale_views)."""
        for n in plan.stale_views():
            conn = self.conns.get(n)
            if conn is None:
                continue
            with self._dirty_lock:  # read now: the refresh loop need not read it again
                self._dirty.discard(n)
            try:
                conn.refresh()
            except Exception as exc:  # noqa: BLE001 - the refresh loop reads it again later
                log.debug("re-read of %s after a channel change failed: %s", n, exc)
                self._mark_dirty(n)
        self._invalidate()

    def _channel_plan(self, ch: svc.Channel, delete: bool = False) -> Plan:
        plan = Plan()
        for sw, pin, pout in ch.hops:
            plan.add(ch.switch_nodes[sw], CrossConnectEdit(sw, min(pin, pout), max(pin, pout), delete=delete))
        (txn_, txi), (rxn, rxi) = ch.tx, ch.rx
        for node, qkdi, peer, peer_i, role in ((txn_, txi, rxn, rxi, "TRANSMITTER"), (rxn, rxi, txn_, txi, "RECEIVER")):
            plan.add(node, LinkEdit(ch.chan_id, "PHYS", node, peer, qkdi, peer_i, role=role, channel=ch.channel,
                                    attenuation=ch.loss_db, delete=delete))
        return plan

    def delete_channel(self, chan_id: str) -> None:
        with self._intent:
            ch = next((c for c in self.store.channels() if c.chan_id == chan_id.lower()), None)
            if ch is None:
                raise ControllerError("not-found", f"no channel {chan_id}")
            plan = self._up_only(self._channel_plan(ch, delete=True))
            if plan.edits:
                self._apply(plan)
            self.store.delete_channel(ch.chan_id)
        self._reread(plan)
        self._emit("channel-deleted", {"chan_id": ch.chan_id})


# --- helpers -----------------------------------------------------------------------------


def _node_summary(data: etree._Element | None) -> dict[str, Any]:
    """What a node-synced event says about a node: its links' and interfaces' statuses (not
    their key rates, which change with every measurement and would make every re-read news)."""
    node = qkd_node(data) if data is not None else None
    if node is None:
        return {"links": {}, "interfaces": {}}
    links = {(text(lk, "q:qkdl_id") or "").lower(): ident(text(lk, "q:qkdl_status")) or "OFF"
             for lk in node.findall("q:qkd_links/q:qkd_link", NSMAP)}
    ifaces = {text(i, "q:qkdi_id") or "": ident(text(i, "q:qkdi_status")) or "ENABLED"
              for i in node.findall("q:qkd_interfaces/q:qkd_interface", NSMAP)}
    return {"links": dict(sorted(links.items())), "interfaces": dict(sorted(ifaces.items()))}


def _notified_qos(content: etree._Element) -> dict[str, Any]:
    """create_application's QoS arguments from an sdqkdn_application_new (ETSI 015 app_qos:
    min_bandwidth, max_bandwidth, ttl; app_priority); absent leaves are not passed."""
    out: dict[str, Any] = {}
    for leaf, arg in (("min_bandwidth", "min_bps"), ("max_bandwidth", "max_bps"), ("ttl", "ttl")):
        v = content.findtext(f".//{{{ETSI_NS}}}app_qos/{{{ETSI_NS}}}{leaf}")
        if v is not None and v.strip().isdigit():
            out[arg] = float(v) if arg.endswith("bps") else int(v)
    prio = content.findtext(f".//{{{ETSI_NS}}}app_priority")
    if prio is not None and prio.strip().isdigit():
        out["priority"] = int(prio)
    return out


def _path_usable(g: Any, path: dict[str, Any], avoid_links: frozenset[str]) -> bool:
    """Every node of a stored path up and every hop with an ACTIVE link in the relay graph."""
    nodes = path["nodes"]
    if avoid_links & set(path["links"]):
        return False
    return all(n in g for n in nodes) and all(g.has_edge(a, b) for a, b in zip(nodes, nodes[1:]))


def _cost(g: Any, nodes: Any) -> float:
    """A path's cost as path computation weighs it (sum of 1/SKR over its hops)."""
    return sum(g[a][b]["weight"] for a, b in zip(nodes, nodes[1:]))

