"""`sdqkd topo plot`'s drawing of MadQCI as the controller reports it: the topology built from
the lab file the way the controller builds it (tests/madqci.py), its CV links set up by the
controller's optical path computation, turned into the northbound messages by the servicer's
own conversion. Checked on the rendered figure: no two labels overlap (boxes measured by the
renderer), parallel links are separate curves, every fibre and cross-connect is drawn with its
wavelength. Then the same on a running MadQCI lab, fetched as `sdqkd topo plot` fetches it."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from rich.console import Console

import madqci
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound.servicer import topology_message
from sdqkd.lab import launcher, plot, topofigure
from sdqkd.lab.labelplace import box
from testlib import REPO

# The case: Distrito-Norte carries its DV link and a CV link (Norte's CV receiver taken
# from Quevedo), so three node pairs have a DV and a CV link side by side.
WITH_DISTRITO_NORTE = (("Distrito", "Norte"), ("Quiron", "Quijote"), ("Norte", "Concepcion"), ("Quijote", "Quintin"))


def _messages(cv_links: tuple[tuple[str, str], ...]) -> tuple[pb.Topology, list[pb.Channel]]:
    topo, paths = madqci.topology_and_paths(cv_links=cv_links)
    channels = [pb.Channel(chan_id=lid, tx=pb.InterfaceRef(node=p.tx[0], qkdi_id=p.tx[1]),
                           rx=pb.InterfaceRef(node=p.rx[0], qkdi_id=p.rx[1]), channel=p.channel, loss_db=p.loss_db,
                           fibres=list(p.fibres), hops=[pb.Hop(switch=s, port_in=i, port_out=o) for s, i, o in p.hops])
                for lid, p in paths.items()]
    return topology_message(topo), channels


@pytest.fixture(scope="module", params=[madqci.CV_IN_SERVICE, WITH_DISTRITO_NORTE], ids=["default", "distrito-norte"])
def drawn(request: pytest.FixtureRequest) -> tuple[pb.Topology, list[pb.Channel], Figure]:
    topo, channels = _messages(request.param)
    fig = topofigure.figure(topo, channels, "lab madqci")
    fig.canvas.draw()
    return topo, channels, fig


def _by_gid(fig: Figure, kind: type, prefix: str) -> dict[str, object]:
    return {a.get_gid()[len(prefix):]: a for a in fig.findobj(kind) if (a.get_gid() or "").startswith(prefix)}


def test_no_two_labels_overlap(drawn: tuple[pb.Topology, list[pb.Channel], Figure]) -> None:
    topo, _, fig = drawn
    renderer = fig.canvas.get_renderer()
    labels = _by_gid(fig, Text, "label:")
    xcs = sum(len(s.cross_connects) for s in topo.switches)
    assert len(labels) == len(topo.nodes) + len(topo.switches) + len(topo.fibres) + len(topo.links) + xcs
    assert all(t.get_visible() for t in labels.values())
    boxes = {gid: box(t, renderer) for gid, t in labels.items()}
    frame = fig.axes[0].get_window_extent(renderer)
    for gid, b in boxes.items():
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1, gid
    clashes = [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes.items(), 2) if ba.overlaps(bb)]
    assert not clashes
    # a node's name is its own: each name once, next to its marker
    nodes = _by_gid(fig, Line2D, "node:")
    for n in topo.nodes:
        t = labels[f"node:{n.qkdn_id}"]
        assert t.get_text() == n.name
        centre = fig.axes[0].transData.transform((nodes[n.qkdn_id].get_xdata()[0], nodes[n.qkdn_id].get_ydata()[0]))
        assert np.hypot(*(np.array(boxes[f"node:{n.qkdn_id}"].get_points()).mean(axis=0) - centre)) < 60


def test_parallel_links_are_separate_curves(drawn: tuple[pb.Topology, list[pb.Channel], Figure]) -> None:
    topo, _, fig = drawn
    curves = _by_gid(fig, Line2D, "link:")
    assert set(curves) == {lk.qkdl_id for lk in topo.links}
    labels = _by_gid(fig, Text, "label:link:")
    pairs: dict[frozenset[str], list[pb.Link]] = defaultdict(list)
    for lk in topo.links:
        pairs[frozenset((lk.a, lk.b))].append(lk)
    parallel = [links for links in pairs.values() if len(links) > 1]
    assert len(parallel) >= 3  # DV and CV side by side: Quintin-Quijote, Norte-Concepcion, and Quevedo- or Distrito-Norte
    to_px = fig.axes[0].transData.transform
    for links in parallel:
        mids = [to_px(curves[lk.qkdl_id].get_xydata()[len(curves[lk.qkdl_id].get_xydata()) // 2]) for lk in links]
        for m1, m2 in itertools.combinations(mids, 2):
            assert np.hypot(*(m1 - m2)) > 20  # bent apart, not drawn on top of each other
        styles = {curves[lk.qkdl_id].get_linestyle() for lk in links}
        assert len(styles) == 2  # DV solid, CV dashed
    ifaces = {(i.node, i.qkdi_id): i.technology for i in topo.interfaces}
    for lk in topo.links:
        text = labels[lk.qkdl_id].get_text()
        assert text.startswith(ifaces[(lk.a, lk.a_if)].split("-")[0]) and topofigure.rate(lk.skr) in text and lk.status in text


def test_distrito_norte_shows_its_cv_link_beside_the_dv_one() -> None:
    topo, channels = _messages(WITH_DISTRITO_NORTE)
    fig = topofigure.figure(topo, channels)
    names = {n.qkdn_id: n.name for n in topo.nodes}
    between = [lk.qkdl_id for lk in topo.links if {names[lk.a], names[lk.b]} == {"Distrito", "Norte"}]
    assert sorted(between) == ["qkdl-cv-distrito-norte", "qkdl-distrito-norte"]
    curves, labels = _by_gid(fig, Line2D, "link:"), _by_gid(fig, Text, "label:link:")
    assert {curves[q].get_linestyle() for q in between} == {"-", "--"}
    assert labels["qkdl-distrito-norte"].get_text().startswith("DV O-band")
    assert labels["qkdl-cv-distrito-norte"].get_text().startswith("CV C")


def test_every_fibre_and_cross_connect_is_drawn(drawn: tuple[pb.Topology, list[pb.Channel], Figure]) -> None:
    topo, channels, fig = drawn
    fibres = _by_gid(fig, Line2D, "fibre:")
    assert set(fibres) == {f.name for f in topo.fibres}
    labels = _by_gid(fig, Text, "label:")
    for f in topo.fibres:
        assert labels[f"fibre:{f.name}"].get_text() == f"{f.length_km:.1f} km, {f.loss_db:.1f} dB"
    switches = _by_gid(fig, Line2D, "switch:")
    assert set(switches) == {s.name for s in topo.switches}
    xcs = _by_gid(fig, Line2D, "xc:")
    expected = {f"{s.name}:{x.port_a}-{x.port_b}": s.name for s in topo.switches for x in s.cross_connects}
    assert set(xcs) == set(expected) and len(expected) >= 2 * len(channels)  # every channel crosses two switches or more
    for gid, sw in expected.items():  # fibre (or module) - switch - fibre, through the switch marker
        middle = xcs[gid].get_xydata()[1]
        assert np.allclose(middle, switches[sw].get_xydata()[0])
    # each arm heads along what its port is patched to: the fibre at that port, or the node's module
    nodes = _by_gid(fig, Line2D, "node:")
    patched = {(e.switch, port): fibres[f.name].get_xydata() for f in topo.fibres for e in (f.a, f.b) if e.switch
               for port in ([e.port] if e.HasField("port") else []) + [m.port for m in e.mux_ports]}
    patched |= {(i.switch, i.port): np.array([nodes[i.node].get_xydata()[0]] * 2) for i in topo.interfaces if i.switch}
    for gid, sw in expected.items():
        centre = switches[sw].get_xydata()[0]
        for port, arm in zip((int(p) for p in gid.split(":")[1].split("-")), xcs[gid].get_xydata()[::2]):
            line = patched[(sw, port)]
            towards = line[1] if np.allclose(line[0], centre) else line[-2] if np.allclose(line[-1], centre) else line[0]
            u, v = arm - centre, towards - centre
            assert abs(u[0] * v[1] - u[1] * v[0]) < 1e-9 and u @ v > 0, (gid, port)
    wavelength = {(h.switch, frozenset((h.port_in, h.port_out))): f"C{c.channel}" for c in channels for h in c.hops}
    for gid, sw in expected.items():
        a, b = (int(p) for p in gid.split(":")[1].split("-"))
        assert labels[f"xc:{gid}"].get_text().startswith(wavelength[(sw, frozenset((a, b)))] + " ")
        # the cross-connect is drawn in the colour of the CV link it carries
        chan = next(c for c in channels for h in c.hops if h.switch == sw and {h.port_in, h.port_out} == {a, b})
        assert xcs[gid].get_color() == _by_gid(fig, Line2D, "link:")[chan.chan_id].get_color()


def test_writes_the_png(tmp_path: Path) -> None:
    topo, channels = _messages(WITH_DISTRITO_NORTE)
    out = plot.write(topo, channels, tmp_path / "sub" / "topology.png", "lab madqci")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    again = plot.write(topo, channels, tmp_path / "again.png", "lab madqci")
    assert again.read_bytes() == out.read_bytes()  # the same topology draws the same picture


def test_live_lab_plot(tmp_path: Path) -> None:
    """A running MadQCI lab (real agents and controller) with a CV channel set up by the
    operator beside Distrito-Norte's DV link: what `sdqkd topo plot` fetches and draws."""
    console = Console(file=open(os.devnull, "w"))
    root = tmp_path / "lab"  # what --lab-dir tmp_path names
    data = launcher.up(REPO / "lab" / "topologies" / "madqci.json", root=root, free_ports=True, console=console)
    try:
        stub = launcher.controller_stub(data["controller"])
        made = stub.CreateChannel(pb.CreateChannelRequest(tx=pb.InterfaceRef(node="Distrito", qkdi_id=11),
                                                          rx=pb.InterfaceRef(node="Norte", qkdi_id=12)), timeout=60)
        deadline = time.monotonic() + 60
        while True:
            topo, channels = plot.fetch(data)
            cv = next((lk for lk in topo.links if lk.qkdl_id == made.chan_id), None)
            if cv is not None and cv.status == "ACTIVE" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert cv is not None and cv.status == "ACTIVE" and len(made.hops) == 2
        fig = topofigure.figure(topo, channels, "lab madqci")
        fig.canvas.draw()
        names = {n.qkdn_id: n.name for n in topo.nodes}
        between = {lk.qkdl_id for lk in topo.links if {names[lk.a], names[lk.b]} == {"Distrito", "Norte"}}
        curves = _by_gid(fig, Line2D, "link:")
        assert made.chan_id in between and len(between) == 2 and between <= set(curves)
        assert set(_by_gid(fig, Line2D, "fibre:")) == {f.name for f in topo.fibres} and len(topo.fibres) == len(madqci.lab()["fibre"])
        xcs = _by_gid(fig, Line2D, "xc:")
        assert {f"{h.switch}:{min(h.port_in, h.port_out)}-{max(h.port_in, h.port_out)}" for h in made.hops} <= set(xcs)
        labels = _by_gid(fig, Text, "label:")
        for h in made.hops:
            gid = f"xc:{h.switch}:{min(h.port_in, h.port_out)}-{max(h.port_in, h.port_out)}"
            assert labels[gid].get_text().startswith(f"C{made.channel} ")
        renderer = fig.canvas.get_renderer()
        boxes = [box(t, renderer) for t in labels.values()]
        assert all(t.get_visible() for t in labels.values())
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
        # the command itself, as an operator runs it
        out = tmp_path / "topology.png"
        res = subprocess.run([sys.executable, "-m", "sdqkd", "topo", "plot", "--lab", "madqci", "--lab-dir", str(tmp_path),
                              "-o", str(out)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == f"wrote {out}", res.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        launcher.down("madqci", root)
