"""`sdqkd topo plot`: a PNG of a running lab — nodes by domain, QKD links labelled
with their live key rates, optical switches — drawn from the controller's view."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402

from sdqkd.controller.northbound import sdqkd_pb2 as pb  # noqa: E402
from sdqkd.lab import launcher  # noqa: E402

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _rate(bps: float) -> str:
    return f"{bps / 1e6:.2f} Mb/s" if bps >= 1e6 else f"{bps / 1e3:.2f} kb/s"


def plot(lab: dict[str, Any], out: Path) -> Path:
    topo = launcher.controller_stub(lab["controller"]).GetTopology(pb.GetTopologyRequest(), timeout=10).topology
    g = nx.Graph()
    names = {n.qkdn_id: n.name for n in topo.nodes}
    domains = sorted({n.domain or "" for n in topo.nodes})
    for n in topo.nodes:
        g.add_node(n.name, domain=n.domain or "", up=n.up)
    for lk in topo.links:
        a, b = names.get(lk.a, lk.a), names.get(lk.b, lk.b)
        g.add_edge(a, b, skr=lk.skr, status=lk.status)
    for f in topo.fibres:  # fibres without a QKD link (the switched domain) keep the drawing connected
        a, b = names.get(f.a.node, f.a.node), names.get(f.b.node, f.b.node)
        if a != b and not g.has_edge(a, b):
            g.add_edge(a, b, skr=None, status="fibre")
    layout = g.copy()
    for sw in topo.switches:
        g.add_node(f"[{sw.name}]", domain="switch", up=True)
        g.add_edge(f"[{sw.name}]", names.get(sw.node, sw.node), skr=None, status="patch")
    pos = nx.spring_layout(layout, seed=7, k=2.0 / max(1, len(layout)) ** 0.5, iterations=300)
    for sw in topo.switches:  # each switch sits just beside its site
        x, y = pos[names.get(sw.node, sw.node)]
        pos[f"[{sw.name}]"] = (x + 0.06, y - 0.06)
    fig, ax = plt.subplots(figsize=(12, 8), dpi=110)
    for i, dom in enumerate(domains):
        nodes = [n for n, d in g.nodes(data=True) if d["domain"] == dom]
        nx.draw_networkx_nodes(g, pos, nodelist=nodes, node_color=COLOURS[i % len(COLOURS)], node_size=900,
                               label=dom or "(no domain)", ax=ax)
    sws = [n for n, d in g.nodes(data=True) if d["domain"] == "switch"]
    nx.draw_networkx_nodes(g, pos, nodelist=sws, node_color="#bbbbbb", node_shape="s", node_size=500, label="optical switch", ax=ax)
    qkd = [(a, b) for a, b, d in g.edges(data=True) if d["skr"] is not None]
    active = [(a, b) for a, b in qkd if g.edges[a, b]["status"] == "ACTIVE"]
    down = [(a, b) for a, b in qkd if g.edges[a, b]["status"] != "ACTIVE"]
    nx.draw_networkx_edges(g, pos, edgelist=active, width=2.5, edge_color="#333333", ax=ax)
    nx.draw_networkx_edges(g, pos, edgelist=down, width=2.0, style="dashed", edge_color="#d62728", ax=ax)
    fibres = [(a, b) for a, b, d in g.edges(data=True) if d["status"] == "fibre"]
    nx.draw_networkx_edges(g, pos, edgelist=fibres, width=1.0, style="dotted", edge_color="#999999", ax=ax)
    nx.draw_networkx_labels(g, pos, font_size=9, ax=ax)
    nx.draw_networkx_edge_labels(g, pos, edge_labels={(a, b): _rate(g.edges[a, b]["skr"]) for a, b in qkd}, font_size=8, ax=ax)
    ax.set_title(f"lab {lab['name']}: QKD links with secret key rates")
    ax.legend(loc="lower left", fontsize=8, markerscale=0.35)
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
