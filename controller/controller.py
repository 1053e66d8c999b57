"""The controller: agents, topology, services, and the operations orchestrators call.

Path computation is pure (pathcomp); this module turns its results into Plans of
per-agent edits and hands them to provisioning as one transaction. Notifications
update the view; a link going down reroutes the applications that used it. The
controller never sees key material: it configures links and applications only.
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
from sdqkd.controller.alarms import CRITICAL, MAJOR, MINOR, Alarm, AlarmClock
from sdqkd.controller.config import ControllerConfig
from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.pathcomp.optical import OpticalPath, OpticalRequest, optical_path
from sdqkd.controller.pathcomp.relay import RelayPlan, RelayRequest, relay_paths
from sdqkd.controller.provisioning import txn
from sdqkd.controller.southbound.agent import ETSI_NS, NSMAP, AgentAddress, AgentConnection, ident, qkd_node, text
from sdqkd.controller.southbound.ops import AppEdit, CrossConnectEdit, LinkEdit, Plan
from sdqkd.controller.topology import builder
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
    conflict | failed; tag: the NETCONF error-tag when an agent refused (failed). exhausted:
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
        self.store = svc.ServiceStore(Path(cfg.state_dir) / "controller.sqlite")
        self.conns: dict[str, AgentConnection] = {}
        for a in cfg.agents:
            addr = AgentAddress(a.name, a.qkdn_id.lower(), a.host, a.port, a.username, a.password, a.key_filename, a.hostkey_b64, a.domain)
            self.conns[addr.qkdn_id] = AgentConnection(addr, self._on_state, self._on_notification, on_lost=self._on_lost)
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
        agents = [(c.addr.name, c.qkdn_id, c.addr.domain, c.connected.is_set(), c.data) for c in self.conns.values()]
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

    def _on_state(self, conn: AgentConnection) -> None:
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

    def _on_lost(self, conn: AgentConnection) -> None:
        self._invalidate()
        self.alarms.mark("node-disconnected", conn.qkdn_id)
        self._emit("node-lost", {"node": conn.addr.name, "qkdn_id": conn.qkdn_id, "error": conn.last_error})

    def _on_notification(self, conn: AgentConnection, content: etree._Element) -> None:
        """One small handler per notification type (Faucet style); failures are contained."""
        name = etree.QName(content).localname
        handler = getattr(self, f"_n_{name}", None)
        if handler is not None:
            handler(conn, content)

    def _n_sdqkdn_link_down(self, conn: AgentConnection, content: etree._Element) -> None:
        lid = (content.findtext(f".//{{{ETSI_NS}}}qkdl_id") or "").lower()
        self._emit("link-down", {"node": conn.addr.name, "qkdl_id": lid, "reason": content.findtext(f".//{{{ETSI_NS}}}reason")})
        self._work.put(("refresh-and-reroute", conn.qkdn_id, lid))

    def _n_event(self, conn: AgentConnection, content: etree._Element) -> None:
        link = content.find(f"{{{ETSI_NS}}}link")
        if link is not None:
            status = ident(link.findtext(f"{{{ETSI_NS}}}qkdl_status"))
            self._emit("link-status", {"node": conn.addr.name, "qkdl_id": link.findtext(f"{{{ETSI_NS}}}qkdl_id"), "status": status})
            self._mark_dirty(conn.qkdn_id)

    def _n_sdqkdn_link_perf_update(self, conn: AgentConnection, content: etree._Element) -> None:
        # A re-read, not the figures patched into the last <get> in place: tried, the
        # create p99 got worse in bench/provision.py (160 vs 81 ms, same machine state)
        self._mark_dirty(conn.qkdn_id)

    def _n_sdqkdn_interface_down(self, conn: AgentConnection, content: etree._Element) -> None:
        self._emit("interface-down", {"node": conn.addr.name, "qkdi_id": content.findtext(f".//{{{ETSI_NS}}}qkdi_id")})
        self._mark_dirty(conn.qkdn_id)

    def _n_sdqkdn_application_new(self, conn: AgentConnection, content: etree._Element) -> None:
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
        while not self._stopped.wait(1.0):
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
                    self.conns[item[1]].refresh()
                    self.reroute(item[2])
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
        # provisioning, outside the lock, much longer): concurrent creates see each other's holds.
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

    def _app_plan(self, app: svc.Application, result: RelayPlan, old: svc.Application | None = None) -> Plan:
        """Edits for `app` over `result`'s paths (and removal of `old`'s VIRT links)."""
        plan = Plan()
        app.paths, app.backing = [], []
        # what each path holds of min_bps (qos.py); a VIRT link's virt_bandwidth is what it
        # holds, or for best effort its planned rate
        held = qos.shares([p.bps for p in result.paths], app.min_bps)
        for n, path in enumerate(result.paths):
            nodes = list(path.nodes)
            if len(nodes) == 2:  # adjacent: the PHYS link backs the application directly
                app.backing.append(path.links[0])
                app.paths.append({"vlink": None, "nodes": nodes, "links": list(path.links), "bps": path.bps,
                                  "reserved": held[n]})
                continue
            vlink = str(uuid.uuid5(APP_NS, f"{app.app_id}/{n}/{'-'.join(path.links)}"))
            bandwidth = math.ceil(held[n]) if held[n] > 0 else int(path.bps)
            for i, node in enumerate(nodes):
                remote = nodes[-1] if i < len(nodes) - 1 else nodes[0]
                plan.add(node, LinkEdit(vlink, "VIRT", node, remote, prev_hop=nodes[i - 1] if i else None,
                                        next_hops=(nodes[i + 1],) if i < len(nodes) - 1 else (), bandwidth=bandwidth))
            app.backing.append(vlink)
            app.paths.append({"vlink": vlink, "nodes": nodes, "links": list(path.links), "bps": path.bps,
                              "reserved": held[n]})
        for end, far in ((app.src, app.dst), (app.dst, app.src)):
            plan.add(end, AppEdit(app.app_id, app.master_sae, (app.slave_sae,), tuple(app.backing), end, far, app.priority or None,
                                  int(app.min_bps) or None, int(app.max_bps) or None, app.ttl or None))
        if old is not None:
            for p in old.paths:
                if p["vlink"] and p["vlink"] not in app.backing:
                    for node in p["nodes"]:
                        plan.add(node, LinkEdit(p["vlink"], "VIRT", node, node, delete=True))
        return plan

    def delete_application(self, app_id: str) -> None:
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
        self._apply(plan)
        self.store.delete_app(app.app_id)
        self._emit("application-deleted", {"app_id": app.app_id})

    def reroute(self, down_link: str) -> list[str]:
        """Move every application that used `down_link` to a path without it."""
        moved = []
        for app in self.store.apps():
            if not any(down_link in p["links"] for p in app.paths):
                continue
            old = svc.Application(**asdict(app))
            try:
                result = self.compute_relay(app.src, app.dst, app.min_bps, avoid_links=frozenset({down_link}), bound=False,
                                            exclude_app=app.app_id)
            except ControllerError as exc:
                app.state = "DEGRADED"
                self.store.put_app(app)
                self._emit("application-degraded", {"app_id": app.app_id, "reason": exc.message})
                continue
            plan = self._app_plan(app, result, old)
            self._apply(plan)
            app.state = "ACTIVE"
            self.store.put_app(app)
            moved.append(app.app_id)
            log.info("application %s rerouted around link %s", app.app_id, down_link)
            self._emit("application-rerouted", {"app_id": app.app_id, "paths": app.paths, "avoided": down_link})
        return moved

    def _apply(self, plan: Plan) -> txn.TxnReport:
        try:
            report = txn.apply(plan, self.conns, confirm_timeout=self.cfg.confirm_timeout)
        except txn.TxnError as exc:
            raise ControllerError("failed", f"provisioning failed at {exc.node}: {exc.message} ({exc.tag})", exc.tag) from None
        for n in set(plan.stale_views()) & set(report.nodes):
            self._mark_dirty(n)
        return report

    # --- direct quantum channels -------------------------------------------------------------

    def compute_optical(self, req: OpticalRequest) -> OpticalPath:
        try:
            return optical_path(self.topology(), req)
        except NoPath as exc:
            raise ControllerError("no-path", str(exc)) from None

    def create_channel(self, req: OpticalRequest, chan_id: str | None = None) -> svc.Channel:
        path = self.compute_optical(req)
        topo = self.topology()
        chan_id = (chan_id or str(uuid.uuid4())).lower()
        switch_nodes = {hop[0]: topo.switches[hop[0]].node for hop in path.hops}
        ch = svc.Channel(chan_id, path.tx, path.rx, path.channel, list(path.fibres), [list(h) for h in path.hops], path.loss_db, switch_nodes)
        self._apply(self._channel_plan(ch))
        self.store.put_channel(ch)
        self._invalidate()
        log.info("direct channel %s %s:%s -> %s:%s, %.2f dB", chan_id, *path.tx, *path.rx, path.loss_db)
        self._emit("channel-created", {"chan_id": chan_id, "tx": list(path.tx), "rx": list(path.rx), "channel": path.channel, "loss_db": path.loss_db})
        return ch

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
        ch = next((c for c in self.store.channels() if c.chan_id == chan_id.lower()), None)
        if ch is None:
            raise ControllerError("not-found", f"no channel {chan_id}")
        self._apply(self._channel_plan(ch, delete=True))
        self.store.delete_channel(ch.chan_id)
        self._invalidate()
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
