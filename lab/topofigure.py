"""The drawing of `sdqkd topo plot`: the controller's topology and channels (its northbound
messages) to a matplotlib Figure, with no I/O, so it is tested on a real topology without a lab.

What is drawn, each its own artist (gid in brackets, for tests and SVG readers):
  nodes by domain colour ["node:<qkdn_id>"]; optical switches as squares beside the node whose
  agent drives them ["switch:<name>"]; every fibre as a grey line between its ends (a node, or
  the switch it is patched into), labelled with length and loss ["fibre:<name>"]; every QKD link
  as its own curve between its nodes, parallel links bent apart, DV solid and CV dashed, labelled
  with technology, DWDM channel, key rate and status ["link:<qkdl_id>"]; every cross-connect of a
  switch as the route through it (fibre or module, switch, fibre), coloured like the channel that
  set it and labelled with that channel's wavelength ["xc:<switch>:<port_a>-<port_b>"]. Labels
  ["label:..."] are placed so that no two overlap (sdqkd.lab.labelplace).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import networkx as nx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.lab.labelplace import Label, place

DOMAIN_COLOURS = ["#4e79a7", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#9c755f"]
CHANNEL_COLOURS = ["#e15759", "#f28e2b", "#af7aa1", "#17becf", "#8c564b", "#bcbd22", "#e377c2", "#7f7f7f"]
DV_COLOUR = "#222222"
FIBRE_COLOUR = "#a8a8a8"
NODE_PT = 26  # node marker diameter, points
SWITCH_PT = 13
ASPECT = 1.35  # width / height of the drawing area
SWITCH_SPAN = 0.4  # a switch's distance from its node, in fibre spans
XC_ARM = 0.075  # length of a cross-connect's arms out of the switch
BEND = 0.16  # sideways bend of the first of parallel curves, as a fraction of their chord
DPI = 110


def rate(bps: float) -> str:
    """A key rate as an operator reads it."""
    if bps >= 1e6:
        return f"{bps / 1e6:.2f} Mb/s"
    if bps >= 1e3:
        return f"{bps / 1e3:.2f} kb/s"
    return f"{bps:.0f} b/s"


def wavelength(channel: int | None) -> str:
    """A DWDM channel as written on the patch panel (C34), or the O-band for none."""
    return f"C{channel}" if channel is not None else "O-band"


def layout(topo: pb.Topology) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Positions of nodes (by qkdn_id) and of switches (by name): stress majorization on the path
    lengths of the fibre plant counted in spans (a switch SWITCH_SPAN from its node; links
    count where no fibre is known), so neighbours sit about one step apart and a dense cluster
    is not squeezed; started from a seeded spring layout, so the same topology always lands
    the same way."""
    g = nx.Graph()
    g.add_nodes_from(("node", q) for q in sorted(_node_ids(topo)))
    sw_node = {s.name: s.node for s in topo.switches if s.node}
    g.add_edges_from(((("switch", s), ("node", n)) for s, n in sw_node.items()), length=SWITCH_SPAN)
    for f in topo.fibres:
        ends = [("switch", e.switch) if e.switch in sw_node else ("node", e.node) for e in (f.a, f.b)]
        if ends[0] != ends[1]:
            g.add_edge(*ends, length=1.0)
    for lk in topo.links:
        if lk.a != lk.b and not g.has_edge(("node", lk.a), ("node", lk.b)):
            g.add_edge(("node", lk.a), ("node", lk.b), length=1.0)
    keys = list(g)
    if len(keys) < 3:
        xy = np.array([[ASPECT * (2 * i - 1) * (len(keys) - 1), 0.0] for i in range(len(keys))]).reshape(-1, 2)
        return _split(keys, xy)
    lengths = dict(nx.all_pairs_dijkstra_path_length(g, weight="length"))
    far = 1 + max((d for row in lengths.values() for d in row.values()), default=1)
    dist = np.array([[lengths[a].get(b, far) for b in keys] for a in keys], dtype=float)
    start = nx.spring_layout(g, seed=7, iterations=200)
    xy = _stress(np.array([start[n] for n in keys], dtype=float), dist)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 1e-9, hi - lo, 1.0)
    xy = (xy - (lo + hi) / 2) / span * 2 * np.array([ASPECT, 1.0])  # fill the drawing area both ways
    return _split(keys, xy)


def _split(keys: list[tuple[str, str]], xy: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    nodes = {k[1]: xy[i] for i, k in enumerate(keys) if k[0] == "node"}
    return nodes, {k[1]: xy[i] for i, k in enumerate(keys) if k[0] == "switch"}


def _stress(xy: np.ndarray, dist: np.ndarray, rounds: int = 300) -> np.ndarray:
    """SMACOF (Gansner, Koren, North 2004) with weights 1/d^2: positions whose distances match
    `dist` as well as they can."""
    n = len(xy)
    w = np.where(dist > 0, 1.0 / np.maximum(dist, 1e-9) ** 2, 0.0)
    np.fill_diagonal(w, 0.0)
    lap = -w.copy()
    np.fill_diagonal(lap, w.sum(axis=1))
    pinv = np.linalg.pinv(lap)
    for _ in range(rounds):
        diff = xy[:, None, :] - xy[None, :, :]
        now = np.sqrt((diff ** 2).sum(axis=2))
        b = np.where(now > 1e-9, -w * dist / np.maximum(now, 1e-9), 0.0)
        np.fill_diagonal(b, 0.0)
        np.fill_diagonal(b, -b.sum(axis=1))
        xy = pinv @ (b @ xy)
    return xy - xy.mean(axis=0) if n else xy


def _node_ids(topo: pb.Topology) -> set[str]:
    """Every node the drawing needs: the known ones and any a link, fibre or switch names."""
    ids = {n.qkdn_id for n in topo.nodes}
    ids |= {x for lk in topo.links for x in (lk.a, lk.b)}
    ids |= {x for f in topo.fibres for x in (f.a.node, f.b.node)}
    ids |= {s.node for s in topo.switches}
    return {x for x in ids if x}


def _curve(p0: np.ndarray, p2: np.ndarray, bend: float, n: int = 48) -> np.ndarray:
    """A quadratic Bezier from p0 to p2 whose middle sits `bend` chords to the left of the chord."""
    d = p2 - p0
    normal = np.array([-d[1], d[0]])
    ctrl = (p0 + p2) / 2 + 2 * bend * normal
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p2


def _outer_side(p0: np.ndarray, p2: np.ndarray, neighbours: list[np.ndarray]) -> float:
    """+1 or -1: the side of the chord p0-p2 away from the middle of `neighbours`, where the first
    of the pair's curves goes: the third corners of the triangles the pair is in (links bend out of
    a triangle, not across it), else the ends' other neighbours and switches (links stay clear of
    the switched plane)."""
    if not neighbours:
        return 1.0
    apex = _curve(p0, p2, BEND, 3)[1]
    middle = np.mean(np.array(neighbours), axis=0)
    return 1.0 if np.linalg.norm(apex - middle) >= np.linalg.norm((p0 + p2) / 2 - middle) else -1.0


def _bends(count: int, always: bool) -> list[float]:
    """Sideways bends for `count` curves between one pair of places: 0 first unless `always`,
    then alternately left and right, further each time."""
    out = [] if always else [0.0]
    k = 1
    while len(out) < count:
        out += [BEND * k, -BEND * k]
        k += 1
    return out[:count]


def figure(topo: pb.Topology, channels: Sequence[pb.Channel] = (), title: str = "") -> Figure:
    """The topology as one figure (see the module docstring for what is in it)."""
    names = {n.qkdn_id: n.name for n in topo.nodes}
    pos, sw_pos = layout(topo)
    ifaces = {(i.node, i.qkdi_id): i for i in topo.interfaces}
    switched = sorted(c.chan_id for c in channels if c.hops)
    chan_colour = {cid: CHANNEL_COLOURS[i % len(CHANNEL_COLOURS)] for i, cid in enumerate(switched)}
    domains = sorted({n.domain for n in topo.nodes})
    dom_colour = {d: DOMAIN_COLOURS[i % len(DOMAIN_COLOURS)] for i, d in enumerate(domains)}

    fig = Figure(figsize=(17, 11), dpi=DPI)
    FigureCanvasAgg(fig)  # files only, no display, no pyplot state
    ax = fig.add_axes((0.01, 0.02, 0.80, 0.92))
    ax.set_aspect("equal")
    ax.axis("off")
    labels: list[tuple[int, Label]] = []  # (priority, label)

    def label(gid: str, text: str, at: np.ndarray, prio: int, colour: str = "#333333", size: float = 7.5,
              beside: float = 0.0, edge: str | None = None, weight: str = "normal") -> None:
        t = ax.text(float(at[0]), float(at[1]), text, ha="center", va="center", fontsize=size, color=colour, zorder=10,
                    gid=f"label:{gid}", fontweight=weight,
                    bbox={"boxstyle": "round,pad=0.18", "fc": "white", "ec": edge or "none", "lw": 0.6, "alpha": 0.92})
        labels.append((prio, Label(t, (float(at[0]), float(at[1])), beside=beside)))

    def end_key(end: pb.FibreEnd) -> str:
        return f"switch:{end.switch}" if end.switch in sw_pos else end.node

    def place_of(end: pb.FibreEnd) -> np.ndarray:
        return sw_pos[end.switch] if end.switch in sw_pos else pos[end.node]

    # fibres: grey, straight unless parallel to another between the same two places
    fibre_line: dict[str, np.ndarray] = {}
    groups: dict[tuple[str, str], list[pb.Fibre]] = defaultdict(list)
    for f in sorted(topo.fibres, key=lambda f: f.name):
        groups[tuple(sorted((end_key(f.a), end_key(f.b))))].append(f)  # type: ignore[arg-type]
    for (first, _), fibres in groups.items():
        for f, bend in zip(fibres, _bends(len(fibres), always=False)):
            p0, p2 = place_of(f.a), place_of(f.b)
            flip = end_key(f.a) != first  # bends counted from one side of the pair
            pts = _curve(p2, p0, bend)[::-1] if flip else _curve(p0, p2, bend)
            fibre_line[f.name] = pts
            ax.add_line(Line2D(pts[:, 0], pts[:, 1], color=FIBRE_COLOUR, lw=2.2, alpha=0.8, zorder=1,
                               solid_capstyle="round", gid=f"fibre:{f.name}"))
            label(f"fibre:{f.name}", f"{f.length_km:.1f} km, {f.loss_db:.1f} dB", pts[len(pts) // 2], 4, "#666666", 6.5)

    # QKD links: each its own curve, always bent off the straight fibre between the same nodes
    pairs: dict[tuple[str, str], list[pb.Link]] = defaultdict(list)
    for lk in sorted(topo.links, key=lambda lk: lk.qkdl_id):
        pairs[tuple(sorted((lk.a, lk.b)))].append(lk)  # type: ignore[arg-type]
    adjacent: dict[str, set[str]] = defaultdict(set)
    for x, y in [(lk.a, lk.b) for lk in topo.links] + [(f.a.node, f.b.node) for f in topo.fibres]:
        adjacent[x].add(y)
        adjacent[y].add(x)
    for (first, second), links in pairs.items():
        links.sort(key=lambda lk: (_technology(ifaces, lk), lk.qkdl_id))
        near = {first: adjacent[first] - {second}, second: adjacent[second] - {first}}
        common = near[first] & near[second]  # a triangle: bend out of it
        around = [pos[q] for q in sorted(common)] or (
            [pos[q] for q in sorted(near[first] | near[second])]
            + [sw_pos[sw.name] for sw in topo.switches if sw.name in sw_pos and sw.node in near[first] | near[second] | {first, second}])
        side = _outer_side(pos[first], pos[second], around)
        for lk, bend in zip(links, _bends(len(links), always=True)):
            a, b = (lk.a, lk.b) if lk.a == first else (lk.b, lk.a)
            pts = _curve(pos[a], pos[b], side * bend)
            tech = _technology(ifaces, lk)
            colour = chan_colour.get(lk.qkdl_id, DV_COLOUR if tech == "DV" else CHANNEL_COLOURS[-1])
            active = lk.status == "ACTIVE"
            ax.add_line(Line2D(pts[:, 0], pts[:, 1], color=colour, lw=2.4 if active else 1.6, zorder=3,
                               linestyle="-" if tech == "DV" else (0, (5, 2)), alpha=1.0 if active else 0.55,
                               gid=f"link:{lk.qkdl_id}"))
            ch = lk.channel if lk.HasField("channel") else None
            text = f"{tech} {wavelength(ch)}  {rate(lk.skr)}  {lk.status or 'UNKNOWN'}"
            label(f"link:{lk.qkdl_id}", text, pts[len(pts) // 2], 2, colour if active else "#c0392b", 7.5, edge=colour)

    # patch cords: a node's modules plugged into a switch port
    for node, sw in sorted({(i.node, i.switch) for i in topo.interfaces if i.switch in sw_pos and i.node in pos}):
        pts = np.array([pos[node], sw_pos[sw]])
        ax.add_line(Line2D(pts[:, 0], pts[:, 1], color=FIBRE_COLOUR, lw=1.2, linestyle=(0, (1, 1.5)), zorder=1,
                           gid=f"patch:{node}:{sw}"))

    # cross-connects: the route through the switch, arm towards what each port is patched to
    port_to: dict[tuple[str, int], np.ndarray] = {}
    for f in topo.fibres:
        pts = fibre_line[f.name]
        for end, near in ((f.a, pts[1]), (f.b, pts[-2])):
            if end.switch and end.HasField("port"):
                port_to[(end.switch, end.port)] = near
            for mux in end.mux_ports:  # a fixed mux: one switch port per passband, all on this fibre
                port_to[(end.switch, mux.port)] = near
    for i in topo.interfaces:
        if i.switch and i.HasField("port") and i.node in pos:
            port_to[(i.switch, i.port)] = pos[i.node]
    hop_chan = {(h.switch, frozenset((h.port_in, h.port_out))): c for c in channels for h in c.hops}
    for s in sorted(topo.switches, key=lambda s: s.name):
        if s.name not in sw_pos:
            continue
        centre = sw_pos[s.name]
        for xc in sorted(s.cross_connects, key=lambda x: (x.port_a, x.port_b)):
            arms = []
            for k, port in enumerate((xc.port_a, xc.port_b)):
                towards = port_to.get((s.name, port))
                if towards is None:  # a port patched to nothing the controller knows
                    a = 2 * math.pi * port / max(1, s.ports)
                    towards = centre + np.array([math.cos(a), math.sin(a)])
                d = towards - centre
                arms.append(centre + XC_ARM * d / (np.linalg.norm(d) or 1.0))
            c = hop_chan.get((s.name, frozenset((xc.port_a, xc.port_b))))
            colour = chan_colour.get(c.chan_id, DV_COLOUR) if c is not None else DV_COLOUR
            pts = np.array([arms[0], centre, arms[1]])
            gid = f"xc:{s.name}:{xc.port_a}-{xc.port_b}"
            ax.add_line(Line2D(pts[:, 0], pts[:, 1], color=colour, lw=3.0, zorder=6, solid_capstyle="round", gid=gid))
            ch = c.channel if c is not None and c.HasField("channel") else None
            text = (wavelength(ch) if c is not None else "?") + f" {xc.port_a}\u2194{xc.port_b}"
            label(gid, text, (arms[0] + arms[1]) / 2 * 0.5 + centre * 0.5, 3, colour, 7.0, edge=colour, weight="bold")

    # nodes and switches on top
    markers: list[Line2D] = []
    for q in sorted(pos):
        node = next((n for n in topo.nodes if n.qkdn_id == q), None)
        colour = dom_colour.get(node.domain, "#cccccc") if node is not None else "#cccccc"
        up = node is not None and node.up
        m = Line2D([pos[q][0]], [pos[q][1]], marker="o", ms=NODE_PT, mfc=colour if up else "white", mec=colour if not up else "#222222",
                   mew=1.2 if up else 2.5, linestyle="none", zorder=8, gid=f"node:{q}")
        ax.add_line(m)
        markers.append(m)
        text = names.get(q) or q[:8]
        if node is not None and not node.kms:
            text += " (relay)"
        if not up:
            text += " DOWN"
        label(f"node:{q}", text, pos[q], 0, "#111111", 9.5, beside=NODE_PT / 2 * DPI / 72 + 1, weight="bold")
    for s in sorted(topo.switches, key=lambda s: s.name):
        if s.name not in sw_pos:
            continue
        p = sw_pos[s.name]
        m = Line2D([p[0]], [p[1]], marker="s", ms=SWITCH_PT, mfc="#dddddd", mec="#222222", mew=1.2, linestyle="none",
                   zorder=9, gid=f"switch:{s.name}")
        ax.add_line(m)
        markers.append(m)
        label(f"switch:{s.name}", s.name, p, 1, "#444444", 6.5, beside=SWITCH_PT / 2 * DPI / 72 + 1)

    everything = np.vstack([np.zeros((1, 2)) if not pos else np.array(list(pos.values())),
                            *(np.asarray(line.get_xydata(), dtype=float) for line in ax.lines)])
    lo, hi = everything.min(axis=0), everything.max(axis=0)
    margin = 0.12 * max(hi - lo) or 1.0
    ax.set_xlim(lo[0] - margin, hi[0] + margin)
    ax.set_ylim(lo[1] - margin, hi[1] + margin)
    ax.set_autoscale_on(False)
    _legend(fig, dom_colour, bool(chan_colour))
    n_active = sum(1 for lk in topo.links if lk.status == "ACTIVE")
    fig.suptitle(f"{title + ': ' if title else ''}{len(topo.nodes)} nodes, {len(topo.links)} QKD links ({n_active} active), "
                 f"{len(topo.fibres)} fibres, {len(topo.switches)} optical switches", fontsize=12, x=0.41, y=0.985)

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    obstacles = [Bbox.from_extents(*_marker_box(m, renderer)) for m in markers]
    stuck = place(ax, [lb for _, lb in sorted(labels, key=lambda pl: pl[0])], obstacles)
    for lb in stuck:  # only on a figure with no room left: say so rather than cover another label
        lb.text.set_visible(False)
    return fig


def _technology(ifaces: dict[tuple[str, int], pb.Interface], lk: pb.Link) -> str:
    """DV or CV, from the interface at either end (the link itself does not say)."""
    for key in ((lk.a, lk.a_if), (lk.b, lk.b_if)):
        i = ifaces.get(key)
        if i is not None and i.technology:
            return "CV" if "CV" in i.technology.upper() else "DV"
    return "DV"


def _marker_box(m: Line2D, renderer: object) -> tuple[float, float, float, float]:
    x, y = m.get_transform().transform((m.get_xdata()[0], m.get_ydata()[0]))
    r = m.get_markersize() / 2 * DPI / 72 + 1
    return x - r, y - r, x + r, y + r


def _legend(fig: Figure, dom_colour: dict[str, str], switched: bool) -> None:
    h = [Line2D([], [], marker="o", ms=12, mfc=c, mec="#222222", linestyle="none", label=f"node, domain {d or '(none)'}")
         for d, c in dom_colour.items()]
    h += [Line2D([], [], marker="o", ms=12, mfc="white", mec="#888888", mew=2, linestyle="none", label="node down"),
          Line2D([], [], marker="s", ms=9, mfc="#dddddd", mec="#222222", linestyle="none", label="optical switch"),
          Line2D([], [], color=FIBRE_COLOUR, lw=2.2, label="fibre (length, loss)"),
          Line2D([], [], color=FIBRE_COLOUR, lw=1.2, linestyle=(0, (1, 1.5)), label="QKD module patched into a switch"),
          Line2D([], [], color=DV_COLOUR, lw=2.4, label="DV-QKD link"),
          Line2D([], [], color=CHANNEL_COLOURS[0], lw=2.4, linestyle=(0, (5, 2)), label="CV-QKD link (colour: its channel)"),
          Line2D([], [], color="#888888", lw=1.6, alpha=0.55, label="link not ACTIVE"),
          Line2D([], [], color=CHANNEL_COLOURS[0], lw=3.0, label="cross-connect: channel, ports")]
    fig.legend(handles=h, loc="upper left", bbox_to_anchor=(0.815, 0.93), fontsize=9, frameon=False,
               title="label: technology, DWDM channel,\nkey rate, status", title_fontsize=8.5, alignment="left")
