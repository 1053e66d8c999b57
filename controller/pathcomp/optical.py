"""Direct quantum channels through optical switches: routing and wavelength assignment.

Light goes Tx -> the switch port it is patched to -> a cross-connect to another free
port -> the fibre patched there -> the far end's switch port -> ... -> the port of the Rx.
A port is free when no existing cross-connect uses it. A fibre end with a fixed mux lands on
several switch ports, one per passband (MadQCI: DWDM 34, 37 and 38), so one fibre carries
several quantum channels at once; light entering at a mux port of passband P leaves the far
end only at the port whose passband holds its channel. The search runs on a directed
graph with one `in`/`out` node per free patched port and a hub per switch (in -> hub
costs the insertion loss, hub -> out nothing). A lowest-loss path never enters a switch
twice, so the hub loses nothing, and each switch crossed gives one cross-connect.
Interfaces not patched to a switch reach their peer only over a fibre between the two
nodes with no switch at either end (the fibre of their link, when they have one).
Switches at down nodes cannot be configured, so they are left out.

Wavelength continuity: one channel end to end, usable by Tx and Rx, passed by every
fibre's fixed muxes (and the mux ports taken), not already carrying a quantum signal on the
fibre (contention per wavelength per fibre), and neither on nor next to (+-1) a classical
channel of the same band on the fibre. O-band interfaces
(no DWDM channel) skip these checks, as the optical plant does. For each group of channels
that block the same fibres, one Dijkstra run; the lowest loss within the receiver's
max_absorption wins, and equal losses go to the lowest channel.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.topology.model import RECEIVER, TRANSMITTER, Fibre, FibreEnd, QkdInterface, Topology

_EPS = 1e-9
IfKey = tuple[str, int]


@dataclass(frozen=True)
class OpticalRequest:
    """Either explicit interfaces (tx, rx as (qkdn_id, qkdi_id)) or two nodes: then every
    compatible TRANSMITTER at src is tried with every RECEIVER at dst."""

    tx: IfKey | None = None
    rx: IfKey | None = None
    src: str | None = None
    dst: str | None = None
    channel: int | None = None  # a DWDM channel asked for; None: the path computation picks

    def __post_init__(self) -> None:
        by_if = (self.tx is not None, self.rx is not None)
        by_node = (self.src is not None, self.dst is not None)
        if sorted([by_if, by_node]) != [(False, False), (True, True)]:
            raise ValueError("give either tx and rx, or src and dst")


@dataclass(frozen=True)
class OpticalPath:
    """A feasible direct channel. hops: (switch, port_in, port_out) per switch crossed,
    i.e. the cross-connects to set; channel None for O-band."""

    tx: IfKey
    rx: IfKey
    channel: int | None
    fibres: tuple[str, ...]
    hops: tuple[tuple[str, int, int], ...]
    loss_db: float


def optical_path(topo: Topology, req: OpticalRequest, busy: Mapping[IfKey, str] | None = None) -> OpticalPath:
    """The lowest-loss feasible channel for the request, or NoPath with the most specific reason.

    Only free modules: one already terminating a link serves that link (one module, one quantum
    channel), so between two nodes a free Tx/Rx pair of one technology is taken whatever the loss."""
    busy = topo.memo("optical_busy", busy_interfaces) if busy is None else busy
    options = optical_options(topo, req, busy)
    p = options[0]
    for key in (p.tx, p.rx):
        if key in busy:
            raise NoPath(f"{_ifname(topo, key)} is busy: it terminates link {busy[key]}"
                         + (" (and no free Tx/Rx pair works)" if len(options) > 1 or req.src else ""))
    return p


def optical_options(topo: Topology, req: OpticalRequest,
                    busy: Mapping[IfKey, str] | None = None) -> list[OpticalPath]:
    """Every feasible (Tx, Rx, channel) for the request with its lowest-loss route, best first
    (free pairs, then loss, then channel): what a dry run shows. NoPath when there is none.
    busy: interfaces already serving a link (default: the snapshot's links' ends)."""
    pairs = _pairs(topo, req)
    paths, fails = [], []
    for t, r in pairs:
        try:
            tx, rx = _iface(topo, t, "Tx"), _iface(topo, r, "Rx")
            if tx.node == rx.node:
                raise _Fail(_Fail.COMPAT, f"{_ifname(topo, t)} and {_ifname(topo, r)} are on the same node: "
                                          "a quantum channel joins two nodes")
            reason = incompatible(topo, tx, rx)
            if reason:
                raise _Fail(_Fail.COMPAT, reason)
            paths.extend(_routes(topo, tx, rx, req.channel))
        except _Fail as exc:
            fails.append((exc, t, r))
    if paths:
        busy = topo.memo("optical_busy", busy_interfaces) if busy is None else busy
        return sorted(paths, key=lambda p: (p.tx in busy or p.rx in busy, p.loss_db,
                                             -1 if p.channel is None else p.channel, p.tx, p.rx))
    exc, t, r = max(fails, key=lambda f: (f[0].stage, -f[0].loss))
    if len(pairs) > 1:
        raise NoPath(f"none of {len(pairs)} Tx/Rx pairs works; best try {_ifname(topo, t)} -> "
                     f"{_ifname(topo, r)}: {exc.reason}")
    raise NoPath(exc.reason)


def _pairs(topo: Topology, req: OpticalRequest) -> list[tuple[IfKey, IfKey]]:
    if req.tx is not None and req.rx is not None:
        return [(req.tx, req.rx)]
    assert req.src is not None and req.dst is not None
    for role, nid in (("source", req.src), ("destination", req.dst)):
        if nid not in topo.nodes:
            raise NoPath(f"unknown {role} node {nid!r}")
    if req.src == req.dst:
        raise NoPath("source and destination are the same node")
    txs = [i for i in topo.interfaces_of(req.src) if TRANSMITTER in i.roles]
    rxs = [i for i in topo.interfaces_of(req.dst) if RECEIVER in i.roles]
    if not txs:
        raise NoPath(f"no transmitter at {_name(topo, req.src)}")
    if not rxs:
        raise NoPath(f"no receiver at {_name(topo, req.dst)}")
    return [(t.key, r.key) for t in txs for r in rxs if t.technology == r.technology] or \
        [(t.key, r.key) for t in txs for r in rxs]


def busy_interfaces(topo: Topology) -> dict[IfKey, str]:
    """Interfaces that already terminate a link -> that link's id (memoised per snapshot by callers)."""
    out: dict[IfKey, str] = {}
    for lk in topo.links.values():
        out.setdefault((lk.a, lk.a_if), lk.qkdl_id)
        out.setdefault((lk.b, lk.b_if), lk.qkdl_id)
    return out


def direct_links(topo: Topology) -> list[OpticalPath]:
    """Every feasible Tx -> Rx pair on different nodes with its best channel, in a fixed order.

    Counts what switching makes possible; ports held by existing cross-connects count as taken."""
    found = []
    txs = sorted(i.key for i in topo.interfaces.values() if TRANSMITTER in i.roles)
    rxs = sorted(i.key for i in topo.interfaces.values() if RECEIVER in i.roles)
    for t in txs:
        for r in rxs:
            if t[0] == r[0] or incompatible(topo, topo.interfaces[t], topo.interfaces[r]):
                continue
            try:
                found.append(_routes(topo, topo.interfaces[t], topo.interfaces[r])[0])  # the lowest loss, then channel
            except _Fail:
                continue
    return found


# --- failures -----------------------------------------------------------------------

class _Fail(Exception):
    """A pair's failure; stage ranks how far it got (higher = more specific)."""

    COMPAT, ROUTE, WAVELENGTH, BUDGET = range(4)

    def __init__(self, stage: int, reason: str, loss: float = 0.0) -> None:
        super().__init__(reason)
        self.stage, self.reason, self.loss = stage, reason, loss


def _iface(topo: Topology, key: IfKey, what: str) -> QkdInterface:
    iface = topo.interfaces.get(key)
    if iface is None:
        raise _Fail(_Fail.COMPAT, f"unknown {what} interface {key}")
    return iface


def incompatible(topo: Topology, tx: QkdInterface, rx: QkdInterface) -> str | None:
    """Why this Tx cannot talk to this Rx whatever the route, or None."""
    checks = [
        (TRANSMITTER not in tx.roles, f"{_ifname(topo, tx.key)} cannot transmit"),
        (RECEIVER not in rx.roles, f"{_ifname(topo, rx.key)} cannot receive"),
        (not tx.up, f"{_ifname(topo, tx.key)} is down"),
        (not rx.up, f"{_ifname(topo, rx.key)} is down"),
        (not topo.nodes[tx.node].up, f"node {_name(topo, tx.node)} is down"),
        (not topo.nodes[rx.node].up, f"node {_name(topo, rx.node)} is down"),
        (tx.technology != rx.technology, f"technology {tx.technology} (Tx) != {rx.technology} (Rx)"),
        (tx.band != rx.band, f"band {tx.band} (Tx) != {rx.band} (Rx)"),
        (common_channels(tx, rx) == frozenset(), f"Tx channels {sorted(tx.wavelengths())} and Rx channels "
                                           f"{sorted(rx.wavelengths())} have none in common"),
    ]
    return next((why for bad, why in checks if bad), None)


def common_channels(tx: QkdInterface, rx: QkdInterface) -> frozenset[int | None]:
    """Channels both ends can use; {None} when neither has a DWDM channel (O-band, or not known)."""
    a, b = tx.wavelengths(), rx.wavelengths()
    if tx.band == "O-band" or (not a and not b):
        return frozenset({None})
    return (a & b) if a and b else (a or b)


def fibre_blocks(fibre: Fibre, channel: int | None, band: str) -> str | None:
    """Why `channel` cannot cross this fibre, or None."""
    if channel is None:
        return None
    if fibre.mux_channels and channel not in fibre.mux_channels:
        return "mux"
    if channel in fibre.quantum_in_use:
        return f"ch {channel} already carries a quantum channel on {fibre.name}"
    for cl in fibre.classical:
        if cl.band == band and cl.channel is not None and abs(cl.channel - channel) <= 1:
            where = "on" if cl.channel == channel else "next to"
            return f"ch {channel} is {where} classical ch {cl.channel} on {fibre.name}"
    return None


# --- routing ------------------------------------------------------------------------

def _candidates(topo: Topology, tx: QkdInterface, rx: QkdInterface, channel: int | None) -> list[int | None]:
    """The channels to try, lowest first; only `channel` when one is asked for."""
    chans = sorted(common_channels(tx, rx), key=lambda c: -1 if c is None else c)
    if channel is None:
        return chans
    if chans == [None]:
        raise _Fail(_Fail.COMPAT, f"{_ifname(topo, tx.key)} -> {_ifname(topo, rx.key)} is {tx.band}: "
                                  f"no DWDM channel to choose (asked for {channel})")
    if channel not in chans:
        raise _Fail(_Fail.COMPAT, f"channel {channel} is not one both {_ifname(topo, tx.key)} and "
                                  f"{_ifname(topo, rx.key)} can use")
    return [channel]


def _routes(topo: Topology, tx: QkdInterface, rx: QkdInterface, channel: int | None = None) -> list[OpticalPath]:
    """One lowest-loss route per usable channel, best first; _Fail when there is none."""
    chans = _candidates(topo, tx, rx, channel)
    if tx.switch is None and rx.switch is None:
        return _fixed(topo, tx, rx, chans)
    if tx.switch is None or rx.switch is None:
        loose = tx if tx.switch is None else rx
        raise _Fail(_Fail.ROUTE, f"no route: {_ifname(topo, loose.key)} is not patched to a switch, "
                                 f"so it only reaches a peer on a fixed fibre")
    return _switched(topo, tx, rx, chans)


def _fixed(topo: Topology, tx: QkdInterface, rx: QkdInterface, chans: list[int | None]) -> list[OpticalPath]:
    """Interfaces on fixed fibres: a fibre between their nodes with no switch at either end,
    and, for a module that terminates a known link, one of that link's fibres (it is
    plugged into it)."""
    ends = {tx.node, rx.node}
    plugged = topo.memo("optical_plugged", _plugged)
    fibres = sorted((f for f in topo.fibres.values()
                     if {f.a.node, f.b.node} == ends and f.a.switch is None and f.b.switch is None
                     and tx.node != rx.node and all(f.name in plugged.get(i.key, (f.name,)) for i in (tx, rx))),
                    key=lambda f: (f.loss_db, f.name))
    if not fibres:
        raise _Fail(_Fail.ROUTE, f"no route: no fixed fibre joins {_ifname(topo, tx.key)} and {_ifname(topo, rx.key)}")
    best: dict[int | None, Fibre] = {}
    for f in fibres:  # lowest loss first
        for c in chans:
            if c not in best and fibre_blocks(f, c, tx.band) is None:
                best[c] = f
    if not best:
        raise _Fail(_Fail.WAVELENGTH, _no_wavelength(tx, rx, fibres, chans))
    out = [OpticalPath(tx.key, rx.key, c, (f.name,), (), round(f.loss_db, 6)) for c, f in best.items()]
    return _within_budget(topo, tx, rx, out)


def _within_budget(topo: Topology, tx: QkdInterface, rx: QkdInterface, paths: list[OpticalPath]) -> list[OpticalPath]:
    paths.sort(key=lambda p: (p.loss_db, -1 if p.channel is None else p.channel))
    _check_budget(topo, tx, rx, paths[0].loss_db)
    return [p for p in paths if p.loss_db <= rx.max_absorption + _EPS]


def _switched(topo: Topology, tx: QkdInterface, rx: QkdInterface, chans: list[int | None]) -> list[OpticalPath]:
    g = topo.memo("optical_graph", _build_graph)
    src, dst = ("tx",) + tx.key, ("rx",) + rx.key
    if src not in g or dst not in g:
        raise _Fail(_Fail.ROUTE, _why_not_in_graph(topo, tx if src not in g else rx))
    try:
        _, free_route = nx.bidirectional_dijkstra(g, src, dst, weight="loss")
    except nx.NetworkXNoPath:
        raise _Fail(_Fail.ROUTE, f"no route from {_ifname(topo, tx.key)} to {_ifname(topo, rx.key)} "
                                 f"over free switch ports and fibres") from None
    by_blocked: dict[frozenset[tuple[Any, Any]], list[int | None]] = {}
    for c in chans:
        blocked = frozenset((u, v) for u, v, d in g.graph["spans"]
                            if not _passes(d, c) or fibre_blocks(topo.fibres[d["fibre"]], c, tx.band))
        by_blocked.setdefault(blocked, []).append(c)
    found = []
    for blocked, channels in by_blocked.items():
        def weight(u: Any, v: Any, d: dict[str, Any], blocked: frozenset[tuple[Any, Any]] = blocked) -> float | None:
            return None if (u, v) in blocked else d["loss"]
        try:
            loss, route = nx.bidirectional_dijkstra(g, src, dst, weight=weight)
        except nx.NetworkXNoPath:
            continue
        fibres = tuple(g[u][v]["fibre"] for u, v in zip(route, route[1:]) if "fibre" in g[u][v])
        hops = tuple((u[1], u[2], w[2]) for u, _, w in zip(route, route[1:], route[2:]) if u[0] == "in")
        found += [OpticalPath(tx.key, rx.key, c, fibres, hops, round(loss, 6)) for c in channels]
    if not found:
        fibres = [topo.fibres[g[u][v]["fibre"]] for u, v in zip(free_route, free_route[1:]) if "fibre" in g[u][v]]
        raise _Fail(_Fail.WAVELENGTH, _no_wavelength(tx, rx, fibres, chans))
    return _within_budget(topo, tx, rx, found)


def _passes(span: dict[str, Any], channel: int | None) -> bool:
    """Whether the mux ports at both ends of a fibre span pass the channel (None: O-band)."""
    return channel is None or span["channels"] is None or channel in span["channels"]


def _check_budget(topo: Topology, tx: QkdInterface, rx: QkdInterface, loss: float) -> None:
    if loss > rx.max_absorption + _EPS:
        raise _Fail(_Fail.BUDGET, f"loss over budget: {loss:.2f} dB > {rx.max_absorption:.2f} dB "
                                  f"({_ifname(topo, tx.key)} -> {_ifname(topo, rx.key)})", loss)


def _no_wavelength(tx: QkdInterface, rx: QkdInterface, fibres: Iterable[Fibre],
                   chans: Iterable[int | None]) -> str:
    """Name what blocks each channel on the lowest-loss route (muxes summarised)."""
    fibres = list(fibres)
    channels = sorted(c for c in chans if c is not None)
    muxed, details = 0, []
    for c in channels:
        why = next((w for w in (fibre_blocks(f, c, tx.band) for f in fibres) if w), None)
        if why == "mux":
            muxed += 1
        elif why:
            details.append(why)
    parts = ([f"{muxed} channel(s) not passed by fixed muxes"] if muxed else []) + details
    route = ", ".join(f.name for f in fibres)
    return f"no common free wavelength on the route ({route}): " + "; ".join(parts or ["every channel is blocked"])


# --- the switch graph ---------------------------------------------------------------

def _build_graph(topo: Topology) -> nx.DiGraph:
    """Directed graph of free patched ports (see the module docstring); built once per snapshot.
    graph["spans"]: the fibre edges (out port -> far in port) with the channels their mux
    ports pass (None: any)."""
    g = nx.DiGraph(spans=[])
    usable = topo.usable_switches()

    def free(switch: str | None, port: int | None) -> bool:
        return switch in usable and port not in usable[switch].used_ports

    for name, sw in usable.items():
        g.add_node(("hub", name))
    for iface in sorted(topo.interfaces.values(), key=lambda i: i.key):
        if not iface.up or not free(iface.switch, iface.port):
            continue
        il = usable[iface.switch].insertion_loss
        if TRANSMITTER in iface.roles:
            g.add_edge(("tx",) + iface.key, ("in", iface.switch, iface.port), loss=0.0)
            g.add_edge(("in", iface.switch, iface.port), ("hub", iface.switch), loss=il)
        if RECEIVER in iface.roles:
            g.add_edge(("hub", iface.switch), ("out", iface.switch, iface.port), loss=0.0)
            g.add_edge(("out", iface.switch, iface.port), ("rx",) + iface.key, loss=0.0)
    for fibre in sorted(topo.fibres.values(), key=lambda f: f.name):
        a, b = fibre.a, fibre.b
        for near, far in ((a, b), (b, a)):
            for pn, cn in near.ports():
                for pf, cf in far.ports():
                    if not (free(near.switch, pn) and free(far.switch, pf)):
                        continue
                    chans = FibreEnd.pair_channels(cn, cf)
                    if chans is not None and not chans:
                        continue  # the demux sends no channel of this port to that one
                    u, v = ("out", near.switch, pn), ("in", far.switch, pf)
                    g.add_edge(("hub", near.switch), u, loss=0.0)
                    g.add_edge(u, v, loss=fibre.loss_db, fibre=fibre.name, channels=chans)
                    g.add_edge(v, ("hub", far.switch), loss=usable[far.switch].insertion_loss)
                    g.graph["spans"].append((u, v, g[u][v]))
    return nx.freeze(g)


def _plugged(topo: Topology) -> dict[IfKey, frozenset[str]]:
    """Unswitched interface -> the fibres it is plugged into: the inventory's record, and the
    fibres of the links it terminates."""
    out: dict[IfKey, frozenset[str]] = {i.key: frozenset(i.plugged) for i in topo.interfaces.values()
                                        if i.plugged and i.switch is None}
    for lk in topo.links.values():
        for key in ((lk.a, lk.a_if), (lk.b, lk.b_if)):
            iface = topo.interfaces.get(key)
            if lk.fibres and iface is not None and iface.switch is None:
                out[key] = out.get(key, frozenset()) | frozenset(lk.fibres)
    return out


def _why_not_in_graph(topo: Topology, iface: QkdInterface) -> str:
    sw = topo.switches[iface.switch] if iface.switch else None
    if sw is not None and iface.port in sw.used_ports:
        return (f"no route: {_ifname(topo, iface.key)} sits on port {iface.port} of switch {sw.name}, "
                "already cross-connected")
    if sw is not None and sw.node in topo.nodes and not topo.nodes[sw.node].up:
        return f"no route: switch {sw.name} is at a down node"
    return f"no route: {_ifname(topo, iface.key)} is not usable"


def _name(topo: Topology, node: str) -> str:
    return topo.nodes[node].name if node in topo.nodes else node


def _ifname(topo: Topology, key: IfKey) -> str:
    return f"{_name(topo, key[0])}:{key[1]}"
