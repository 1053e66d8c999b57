"""Relay path computation time on random QKD topologies, against plain networkx in the same run.

    .venv/bin/python bench/pathcomp.py [--sizes 100 1000 10000] [--pairs 5] [--seed 1]

Topologies are random geometric graphs (QKD links are short, so paths are long: the hard
case for k-shortest paths), mean degree 6, largest component, 10% of node pairs with two parallel links,
log-normal SKRs. For each size, `--pairs` random (src, dst) pairs; every figure is the
median over the pairs, warm (the snapshot's graph already built; its build time is shown
apart). Columns:
  1 path: relay_paths with min_bps=0 (one Dijkstra + the max-flow bound);
  multi:  min_bps = 1.5 x the widest single path (the max-flow decomposition, then NoPath
          with the achievable figure when even the bound falls short), the worst case;
  sp:     networkx shortest_path (Dijkstra, weight 1/SKR) on the same graph: the baseline;
  flow:   networkx maximum_flow_value on the same graph (default algorithm, from scratch).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import networkx as nx

from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.pathcomp.relay import RelayRequest, relay_paths
from sdqkd.controller.topology.model import Node, QkdLink, Topology


def geometric_graph(n: int, degree: float, seed: int) -> nx.Graph:
    """nx.random_geometric_graph's model (unit square, radius for the mean degree), binned
    into cells of the radius: networkx's own is O(n^2) without scipy (40 s at 10,000)."""
    rng = random.Random(seed)
    r = math.sqrt(degree / (math.pi * n))
    pos = [(rng.random(), rng.random()) for _ in range(n)]
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(pos):
        cells.setdefault((int(x / r), int(y / r)), []).append(i)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for (cx, cy), members in cells.items():
        near = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in cells.get((cx + dx, cy + dy), ())]
        for i in members:
            g.add_edges_from((i, j) for j in near if i < j and math.dist(pos[i], pos[j]) <= r)
    return g


def random_topology(n: int, seed: int, degree: float = 6.0) -> Topology:
    """Largest component of a random geometric graph, as a snapshot."""
    rng = random.Random(seed)
    g = geometric_graph(n, degree, seed)
    keep = max(nx.connected_components(g), key=len)
    links = []
    for u, v in sorted(g.subgraph(keep).edges()):
        for j in range(2 if rng.random() < 0.1 else 1):
            links.append(QkdLink(f"l{u}-{v}-{j}", f"n{u}", 1 + j, f"n{v}", 1 + j,
                                 skr=float(round(rng.lognormvariate(8, 1.5)) + 1)))
    return Topology.build([Node(f"n{i}", f"n{i}") for i in sorted(keep)], links=links)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def widest(g: nx.Graph, s: str, t: str) -> float:
    tree = nx.maximum_spanning_tree(g, weight="capacity")
    path = nx.shortest_path(tree, s, t)
    return min(g[u][v]["capacity"] for u, v in zip(path, path[1:]))


def multi(topo: Topology, req: RelayRequest) -> None:
    try:
        relay_paths(topo, req)
    except NoPath:
        pass


def run(n: int, pairs: int, seed: int) -> dict[str, float]:
    base = random_topology(n, seed)
    start = time.perf_counter()  # the snapshot itself: objects in, checked, frozen
    topo = Topology(dict(base.nodes), dict(base.interfaces), dict(base.links))
    t_snapshot = time.perf_counter() - start
    t_graph = timed(topo.relay_graph)
    g = topo.relay_graph()
    rng = random.Random(seed)
    ends = rng.sample(sorted(g), 2 * pairs)
    relay_paths(topo, RelayRequest(ends[0], ends[1]))  # warm: builds the cached residual network
    rows: dict[str, list[float]] = {"one": [], "multi": [], "sp": [], "flow": [], "hops": []}
    for s, t in zip(ends[::2], ends[1::2]):
        rows["sp"].append(timed(lambda: nx.shortest_path(g, s, t, weight="weight")))
        rows["one"].append(timed(lambda: relay_paths(topo, RelayRequest(s, t))))
        rows["flow"].append(timed(lambda: nx.maximum_flow_value(g, s, t, capacity="capacity")))
        rate = 1.5 * widest(g, s, t)
        rows["multi"].append(timed(lambda: multi(topo, RelayRequest(s, t, min_bps=rate))))
        rows["hops"].append(len(nx.shortest_path(g, s, t, weight="weight")) - 1)
    out = {k: statistics.median(v) for k, v in rows.items()}
    out.update(nodes=g.number_of_nodes(), edges=g.number_of_edges(), snapshot=t_snapshot, graph=t_graph)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    ms = 1000.0
    print(f"{'nodes':>6} {'hops':>4} {'edges':>6} {'snapshot':>9} {'graph':>8} {'sp':>8} {'1 path':>8} "
          f"{'ratio':>6} {'flow':>8} {'multi':>9} {'ratio':>6}")
    for n in args.sizes:
        r = run(n, args.pairs, args.seed)
        print(f"{r['nodes']:>6.0f} {r['hops']:>4.0f} {r['edges']:>6.0f} {r['snapshot'] * ms:>7.1f}ms "
              f"{r['graph'] * ms:>6.1f}ms {r['sp'] * ms:>6.2f}ms {r['one'] * ms:>6.1f}ms "
              f"{r['one'] / r['sp']:>5.0f}x {r['flow'] * ms:>6.1f}ms {r['multi'] * ms:>7.1f}ms "
              f"{r['multi'] / r['sp']:>5.0f}x")
    print("median over the pairs; 1 path includes the max-flow bound (cached residual network);"
          " flow = networkx max flow from scratch")


if __name__ == "__main__":
    main()
