"""Key-relay paths over trusted nodes.

Weight: an edge costs 1/SKR (seconds of link key per relayed bit; parallel links merged,
see Topology.relay_graph). A path's cost is dominated by its slowest hop and still grows
with every extra hop, and each hop spends link key and exposes the key to one more trusted
node. So it prefers few fast hops, and never takes a 1-hop path at 10 bit/s over a
2-hop path at 1 kbit/s, as hop count would.

Steps:
1. One path: the lowest-cost path over only the edges with SKR >= min_bps (Dijkstra with
   the slower edges hidden). This finds a single path meeting min_bps whenever one exists,
   and is as cheap as a plain shortest path.
2. Several paths, only when no single path is enough.
   disjoint="none" (the default): the maximum flow (SKR capacities), decomposed into paths
   widest first, each path carrying its share of the flow, until min_bps is met or
   max_paths are taken (when max_paths cuts it short, the link-disjoint plan below if it
   does better). Paths may share hops: their shares on a hop never add up to more
   than its rate, and no two cross a hop in opposite directions (the flow is a net flow),
   so every planned bit of key has link key behind it. With enough paths the plan reaches
   the max-flow bound, which no relay plan can beat.
   disjoint="node" or "link" (paths must not share nodes or hops):
   a. greedy: repeat step 1's search (without the rate filter), each time hiding the nodes
      ("node") or hops ("link") already used;
   b. if a. falls short, a pool: a.'s paths; up to k shortest simple paths (Yen, networkx;
      fewer on large graphs with long paths, see _YEN_BUDGET); a maximum set of disjoint
      paths (networkx max-flow); and a.'s greedy restarted from each of those, once by
      cost and once by near-widest path. From the pool, the compatible set of at most
      max_paths paths that meets min_bps with the fewest paths, or else gives the highest
      total (branch and bound). Maximising the sum of bottlenecks over disjoint paths is
      NP-hard, so 2b is a heuristic; the tests compare it with brute force on small graphs.
3. maxflow_bps: networkx maximum flow with SKR capacities. No relay plan can do better.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import networkx as nx
from networkx.algorithms.flow import build_residual_network, dinitz, preflow_push

from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.topology.model import Topology

DISJOINT = ("node", "link", "none")
_SEARCH_BUDGET = 50_000  # subsets examined in step 2b before settling for the best so far
_EPS = 1e-9
# Yen's k-th path costs one Dijkstra per hop of the previous one: k x hops x nodes. The pool
# takes as many as fit here: all 8 up to 1,000 nodes and 32 hops, 1 at 10,000 nodes and 150 hops
# (8 took 24 s there).
_YEN_BUDGET = 256_000
_WIDE = 6  # exponent for near-widest paths; 3 missed the brute-force optimum 3x as often


@dataclass(frozen=True)
class RelayRequest:
    """Key relay between two KMS nodes (qkdn_ids). disjoint: how the paths of a multi-path
    plan may overlap: "none" (shared hops split their rate: the max-flow decomposition),
    "node" (no shared intermediate node or hop) or "link" (no shared hop)."""

    src: str
    dst: str
    min_bps: float = 0.0
    k: int = 8
    max_paths: int = 8
    disjoint: str = "none"
    avoid_links: frozenset[str] = frozenset()
    avoid_nodes: frozenset[str] = frozenset()
    bound: bool = True  # also the max-flow bound when one path does (what provisioning does not need)

    def __post_init__(self) -> None:
        object.__setattr__(self, "avoid_links", frozenset(self.avoid_links))
        object.__setattr__(self, "avoid_nodes", frozenset(self.avoid_nodes))
        if self.disjoint not in DISJOINT:
            raise ValueError(f"disjoint must be one of {DISJOINT}, not {self.disjoint!r}")
        if self.k < 1 or self.max_paths < 1 or self.min_bps < 0:
            raise ValueError("k and max_paths must be >= 1 and min_bps >= 0")


@dataclass(frozen=True)
class RelayPath:
    """nodes: src .. dst. links: the PHYS links the path uses, hop by hop (a hop with
    parallel links lists all of them, by id). bps: the path's bottleneck SKR, or with
    disjoint="none" the path's share of the maximum flow."""

    nodes: tuple[str, ...]
    links: tuple[str, ...]
    bps: float

    @property
    def hops(self) -> int:
        return len(self.nodes) - 1


@dataclass(frozen=True)
class RelayPlan:
    """Paths to carry the key (the first is the preferred one), their total rate, and the
    max-flow bound between the two ends (None: one path did and the request did not ask)."""

    paths: tuple[RelayPath, ...]
    total_bps: float
    maxflow_bps: float | None


def relay_paths(topo: Topology, req: RelayRequest) -> RelayPlan:
    """Relay plan from req.src to req.dst, or NoPath saying why not and what can be had."""
    names = _check_ends(topo, req)
    g = _graph(topo, req)
    s, t = req.src, req.dst
    try:
        best = _path(g, s, t, _rate_filter(req.min_bps))
    except nx.NetworkXNoPath:
        best = None
    if best is not None:
        path = _relay_path(g, best)
        return RelayPlan((path,), path.bps, max(path.bps, _maxflow(topo, g, req)) if req.bound else None)
    try:
        if req.min_bps <= 0:  # the search above had no rate filter: the same search
            raise nx.NetworkXNoPath
        _path(g, s, t, "weight")
    except nx.NetworkXNoPath:
        avoiding = " avoiding the given links/nodes" if req.avoid_links or req.avoid_nodes else ""
        raise NoPath(f"no path of ACTIVE QKD links from {names[0]} to {names[1]}{avoiding}") from None
    maxflow, flow = _flow(topo, g, req)
    chosen, total = _combine(g, req, flow, maxflow)
    if total + _EPS >= req.min_bps:
        return RelayPlan(tuple(chosen), total, maxflow)
    single = _bottleneck(g, _widest_path(g, s, t))
    how = "sharing hops" if req.disjoint == "none" else f"{req.disjoint}-disjoint"
    raise NoPath(
        f"{req.min_bps:.0f} bit/s cannot be met from {names[0]} to {names[1]}: best single path "
        f"{single:.0f} bit/s, best {len(chosen)} path(s) ({how}, at most "
        f"{req.max_paths}) {total:.0f} bit/s, max-flow bound {maxflow:.0f} bit/s",
        achievable_bps=total, maxflow_bps=maxflow)


# --- request graph ------------------------------------------------------------------

def _check_ends(topo: Topology, req: RelayRequest) -> tuple[str, str]:
    names = []
    for role, nid in (("source", req.src), ("destination", req.dst)):
        node = topo.nodes.get(nid)
        if node is None:
            raise NoPath(f"unknown {role} node {nid!r}")
        if not node.up:
            raise NoPath(f"{role} node {node.name} is down")
        if not node.kms:
            raise NoPath(f"{role} node {node.name} is relay-only (no KMS): it cannot be a key end")
        if nid in req.avoid_nodes:
            raise NoPath(f"{role} node {node.name} is in avoid_nodes")
        names.append(node.name)
    if req.src == req.dst:
        raise NoPath(f"source and destination are the same node ({names[0]})")
    return names[0], names[1]


def _graph(topo: Topology, req: RelayRequest) -> nx.Graph:
    """The snapshot's cached graph, or a copy without what the request avoids."""
    g = topo.relay_graph()
    if not req.avoid_links and not req.avoid_nodes:
        return g
    h = g.copy()
    h.remove_nodes_from([n for n in req.avoid_nodes if n in h])
    for lid in sorted(req.avoid_links):
        lk = topo.links.get(lid)
        if lk is None or not h.has_edge(lk.a, lk.b) or lid not in h[lk.a][lk.b]["links"]:
            continue
        d = h[lk.a][lk.b]
        rest = tuple(x for x in d["links"] if x != lid)
        cap = sum(topo.links[x].skr for x in rest)
        if not rest or cap <= 0:
            h.remove_edge(lk.a, lk.b)
        else:
            d.update(capacity=cap, weight=1.0 / cap, links=rest)
    return h


# --- single paths -------------------------------------------------------------------

Weight = str | Callable[[Any, Any, dict[str, Any]], float | None]


def _rate_filter(min_bps: float) -> Weight:
    if min_bps <= 0:
        return "weight"
    return lambda u, v, d: d["weight"] if d["capacity"] + _EPS >= min_bps else None


def _path(g: nx.Graph, s: str, t: str, weight: Weight) -> list[str]:
    return nx.bidirectional_dijkstra(g, s, t, weight=weight)[1]


def _bottleneck(g: nx.Graph, nodes: Sequence[str]) -> float:
    return min(g[u][v]["capacity"] for u, v in zip(nodes, nodes[1:]))


def _relay_path(g: nx.Graph, nodes: Sequence[str], bps: float | None = None) -> RelayPath:
    links = tuple(lid for u, v in zip(nodes, nodes[1:]) for lid in g[u][v]["links"])
    return RelayPath(tuple(nodes), links, _bottleneck(g, nodes) if bps is None else bps)


def _widest_path(g: nx.Graph, s: str, t: str) -> list[str]:
    """The path with the highest bottleneck: the one through a maximum spanning tree."""
    comp = nx.node_connected_component(g, s)
    tree = nx.maximum_spanning_tree(g.subgraph(comp), weight="capacity")
    return nx.shortest_path(tree, s, t)


def _hops(nodes: Sequence[str]) -> frozenset[frozenset[str]]:
    return frozenset(frozenset(e) for e in zip(nodes, nodes[1:]))


# --- several paths ------------------------------------------------------------------

def _combine(g: nx.Graph, req: RelayRequest, flow: Flow, maxflow: float) -> tuple[list[RelayPath], float]:
    """Step 2: the flow decomposition; or for disjoint paths greedy first, the pool search
    only when greedy falls short."""
    if req.max_paths == 1:  # step 1 already showed no single path is enough
        nodes = _widest_path(g, req.src, req.dst)
        return [_relay_path(g, nodes)], _bottleneck(g, nodes)
    if req.disjoint == "none":
        paths = _decompose(g, req, flow, maxflow)
        total = sum(p.bps for p in paths)
        if total + _EPS >= req.min_bps or len(paths) < req.max_paths:
            return _ordered(paths), total
        # max_paths cut the decomposition short: link-disjoint paths, each at its full
        # bottleneck, sometimes do better with that few paths
        other, value = _combine(g, dataclasses.replace(req, disjoint="link"), flow, maxflow)
        return (other, value) if value > total + _EPS else (_ordered(paths), total)
    greedy = _greedy(g, req)
    total = sum(p.bps for p in greedy)
    if total + _EPS >= req.min_bps:
        return _ordered(greedy), total
    pool = _pool(g, req, [p.nodes for p in greedy])
    for first in list(pool):  # greedy restarted from each candidate escapes its traps
        pool += [p.nodes for p in _greedy(g, req, first)[1:]]
        pool += [p.nodes for p in _greedy(g, req, first, wide=True)[1:]]
    chosen, value = _select(g, list(dict.fromkeys(pool)), req)
    if value > total + _EPS:
        return _ordered(chosen), value
    return _ordered(greedy), total


def _greedy(g: nx.Graph, req: RelayRequest, first: Sequence[str] | None = None,
            wide: bool = False) -> list[RelayPath]:
    """Cheapest path, hide what it used, repeat. `first` forces the first path; `wide`
    ranks paths by (1/SKR)^_WIDE, which is dominated by the bottleneck: nearly the widest path,
    still one Dijkstra run."""
    s, t = req.src, req.dst
    used_nodes: set[str] = set()
    used_hops: set[frozenset[str]] = set()
    paths: list[RelayPath] = []
    total = 0.0

    def weight(u: str, v: str, d: dict[str, Any]) -> float | None:
        if u in used_nodes or v in used_nodes or frozenset((u, v)) in used_hops:
            return None
        return d["weight"] ** _WIDE if wide else d["weight"]

    while len(paths) < req.max_paths and total + _EPS < req.min_bps:
        if first is not None and not paths:
            nodes = list(first)
        else:
            try:
                nodes = _path(g, s, t, weight)
            except nx.NetworkXNoPath:
                break
        used_hops.update(frozenset(e) for e in zip(nodes, nodes[1:]))
        if req.disjoint == "node":
            used_nodes.update(nodes[1:-1])
        path = _relay_path(g, nodes)
        paths.append(path)
        total += path.bps
    return paths


def _pool(g: nx.Graph, req: RelayRequest, seed: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Candidate paths for step 2b, without duplicates, in a fixed order."""
    s, t = req.src, req.dst
    found = list(seed)
    k = min(req.k, 1 + _YEN_BUDGET // ((len(seed[0]) - 1) * g.number_of_nodes()))
    found += [tuple(p) for p in islice(nx.shortest_simple_paths(g, s, t, weight="weight"), k)]
    if req.disjoint == "node":
        found += [tuple(p) for p in nx.node_disjoint_paths(g, s, t, cutoff=req.max_paths)]
    elif req.disjoint == "link":
        found += [tuple(p) for p in nx.edge_disjoint_paths(g, s, t, cutoff=req.max_paths)]
    return list(dict.fromkeys(found))


def _select(g: nx.Graph, pool: list[tuple[str, ...]], req: RelayRequest) -> tuple[list[RelayPath], float]:
    """Best compatible subset of the pool: meets min_bps with the fewest paths, else the
    highest total. Branch and bound over candidates sorted by bottleneck."""
    cands = sorted(pool, key=lambda p: (-_bottleneck(g, p), len(p), p))
    caps = [_bottleneck(g, p) for p in cands]
    inner = [frozenset(p[1:-1]) for p in cands]
    hops = [_hops(p) for p in cands]
    best: tuple[tuple[int, ...], float] = ((), 0.0)
    budget = [_SEARCH_BUDGET]

    def better(chosen: tuple[int, ...], val: float) -> bool:
        met, best_met = val + _EPS >= req.min_bps, best[1] + _EPS >= req.min_bps
        if met != best_met:
            return met
        if met and len(chosen) != len(best[0]):
            return len(chosen) < len(best[0])
        return val > best[1] + _EPS

    def fits(i: int, chosen: tuple[int, ...]) -> bool:
        for j in chosen:
            if hops[i] & hops[j] or (req.disjoint == "node" and inner[i] & inner[j]):
                return False
        return True

    def search(start: int, chosen: tuple[int, ...], val: float) -> None:
        nonlocal best
        budget[0] -= 1
        if chosen and better(chosen, val):
            best = (chosen, val)
        if len(chosen) == req.max_paths or budget[0] <= 0:
            return
        if best[1] + _EPS >= req.min_bps and len(chosen) + 1 > len(best[0]):
            return  # cannot meet it with fewer paths than the best set
        room = req.max_paths - len(chosen)
        if val + sum(caps[start:start + room]) <= best[1] + _EPS and best[1] + _EPS < req.min_bps:
            return  # even the fastest remaining candidates cannot beat the best total
        for i in range(start, len(cands)):
            if fits(i, chosen):
                search(i + 1, chosen + (i,), val + caps[i])

    search(0, (), 0.0)
    chosen, val = best
    return [_relay_path(g, cands[i]) for i in chosen], val


def _ordered(paths: list[RelayPath]) -> list[RelayPath]:
    return sorted(paths, key=lambda p: (-p.bps, p.hops, p.nodes))


# --- max flow -----------------------------------------------------------------------

Flow = dict[str, dict[str, float]]  # u -> v -> the net flow from u to v, positive only


def _maxflow(topo: Topology, g: nx.Graph, req: RelayRequest) -> float:
    """Max flow value with SKR capacities (preflow only: the bound, not the flow)."""
    if g is not topo.relay_graph():
        return float(nx.maximum_flow_value(g, req.src, req.dst, capacity="capacity"))
    residual, lock = topo.memo("relay_residual", _residual)
    with lock:
        return float(nx.maximum_flow_value(g, req.src, req.dst, capacity="capacity", flow_func=preflow_push,
                                           residual=residual))


def _flow(topo: Topology, g: nx.Graph, req: RelayRequest) -> tuple[float, Flow]:
    """A maximum flow with SKR capacities. Dinitz, not preflow-push: its flow does not hang on
    set order (string hashes differ per process), so a plan is the same in every run. On the
    snapshot's own graph the residual network is built once and reused under a lock (the flow
    code resets it on every call)."""
    if g is topo.relay_graph():
        residual, lock = topo.memo("relay_residual", _residual)
    else:
        residual, lock = build_residual_network(g, "capacity"), threading.Lock()
    with lock:
        r = dinitz(g, req.src, req.dst, capacity="capacity", residual=residual)
        flow: Flow = {}
        for u, nbrs in r.adj.items():
            for v, d in nbrs.items():
                if d["flow"] > 0:
                    flow.setdefault(u, {})[v] = float(d["flow"])
        return float(r.graph["flow_value"]), flow


def _residual(topo: Topology) -> tuple[nx.DiGraph, threading.Lock]:
    return build_residual_network(topo.relay_graph(), "capacity"), threading.Lock()


def _decompose(g: nx.Graph, req: RelayRequest, flow: Flow, value: float) -> list[RelayPath]:
    """Paths of the flow, widest first, each with the flow it carries, until min_bps is met
    or max_paths are taken. Each path empties at least one arc, so there are at most as
    many paths as arcs; what is left once no src-dst path carries flow is cycles, which
    move no key end to end."""
    left = {u: dict(nbrs) for u, nbrs in flow.items()}
    tiny = _EPS * max(1.0, value)  # rounding left on an arc by the subtractions
    paths: list[RelayPath] = []
    total = 0.0
    while len(paths) < req.max_paths and (req.min_bps <= 0 or total + _EPS < req.min_bps):
        nodes = _widest_flow_path(left, req.src, req.dst)
        if nodes is None:
            break
        share = min(left[u][v] for u, v in zip(nodes, nodes[1:]))
        for u, v in zip(nodes, nodes[1:]):
            left[u][v] -= share
            if left[u][v] <= tiny:
                del left[u][v]
        paths.append(_relay_path(g, nodes, share))
        total += share
    return paths


def _widest_flow_path(flow: Flow, s: str, t: str) -> list[str] | None:
    """The src-dst path of highest bottleneck over arcs with flow (fewest hops, then
    names, on ties): Dijkstra with min instead of +."""
    best: dict[str, tuple[float, int]] = {s: (-math.inf, 0)}
    prev: dict[str, str] = {}
    heap: list[tuple[float, int, str]] = [(-math.inf, 0, s)]
    done: set[str] = set()
    while heap:
        neg, hops, u = heapq.heappop(heap)
        if u in done:
            continue
        done.add(u)
        if u == t:
            nodes = [t]
            while nodes[-1] != s:
                nodes.append(prev[nodes[-1]])
            return nodes[::-1]
        for v, f in flow.get(u, {}).items():
            key = (max(neg, -f), hops + 1)
            if v not in done and key < best.get(v, (0.0, 0)):
                best[v] = key
                prev[v] = u
                heapq.heappush(heap, (*key, v))
    return None
