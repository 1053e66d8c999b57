"""Rates as measured: the emulated Huawei CV modules of the MadQCI lab against the paper's
CV figures (npj Quantum Information 10, 80, 2024, Table 1 and the single co-located links;
shared/reference/madqci.md), and the DV links' QBER against the paper's 2.2-4.2 %.

Each row is traced through the emulated plant as the emulator sees it (fibres, 0.4 dB per
switch, classical channels on the fibres, number of spans) and the rate is the lab file's
huawei-cv-c profile at that channel. A figure given for C-37 and C-38 is met when the model
is within a factor 2 of the interval between the two (the channels differ by up to 7x on
the same path, which no model of the path can reproduce both ways).

The table as computed (loss as the plant sees it, fibres + 0.4 dB per switch; kb/s):

  path                                            loss  spans  paper        model  ratio
  link3+link4                                     10.30  2     7.1 / 5.2     9.07  1.28
  link4(Norte->Quevedo)+link6                     15.70  2     4.3 / 4.3     2.22  1.94
  link2+link3+link4                               22.80  3     0.07 / 0.01   0.006 1.69
  link3(Quevedo->Quijote)+link4(Norte->Quevedo)   10.30  2     6.0 / 6.6     9.07  1.37
  link6+link7                                     22.50  2     0.11          0.057 1.93
  link4(Quevedo->Norte)+link7                     16.60  2     2.4           1.46  1.64
  link1+link3(Quevedo->Quijote)                   22.40  2     0.07          0.061 1.16  (link1's loss is the lab's choice)
  link3+link4+link6                               20.90  3     0.04 / 0.04   0.075 1.87

(the test prints the live table; run with -s to see it.)
"""
from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from testlib import REPO
from sdqkd.agents.emulation.plant import Plant
from sdqkd.qkdprofile import (
    QkdProfile, mean_qber, no_key_reason, sample_qber, secret_key_rate, span_loss_limit,
)
from sdqkd.lab import plan as lab_plan
from sdqkd.lab import topology

T = "etsi-qkd-node-types:"
MADQCI = REPO / "lab" / "topologies" / "madqci.json"

# Switched CV paths measured in MadQCI (npj Table 1), Tx site first; links: 1 Quintin-Quijote,
# 2 Quijote-Quiron, 3 Quijote-Quevedo, 4 Quevedo-Norte, 6 Distrito-Norte, 7 Concepcion-Norte.
# (name, sites, paper kb/s: one figure, or C-37 / C-38)
MULTI: list[tuple[str, list[str], tuple[float, ...]]] = [
    ("link3+link4", ["Quijote", "Quevedo", "Norte"], (7.1, 5.2)),
    ("link4(Norte->Quevedo)+link6", ["Distrito", "Norte", "Quevedo"], (4.3, 4.3)),
    ("link2+link3+link4", ["Quiron", "Quijote", "Quevedo", "Norte"], (0.07, 0.01)),
    ("link3(Quevedo->Quijote)+link4(Norte->Quevedo)", ["Norte", "Quevedo", "Quijote"], (6.0, 6.6)),
    ("link6+link7", ["Distrito", "Norte", "Concepcion"], (0.11,)),
    ("link4(Quevedo->Norte)+link7", ["Quevedo", "Norte", "Concepcion"], (2.4,)),
    ("link1+link3(Quevedo->Quijote)", ["Quevedo", "Quijote", "Quintin"], (0.07,)),
    ("link3+link4+link6", ["Distrito", "Norte", "Quevedo", "Quijote"], (0.04, 0.04)),
]
# The single co-located links of the paper's link table; the model is calibrated on these.
SINGLE: list[tuple[str, list[str], tuple[float, ...]]] = [
    ("Quijote-Quiron", ["Quiron", "Quijote"], (6.2, 3.3)),
    ("Quijote-Quevedo", ["Quijote", "Quevedo"], (11.0,)),
    ("Distrito-Norte", ["Distrito", "Norte"], (8.4,)),
    ("Distrito-Concepcion", ["Distrito", "Concepcion"], (0.11,)),
    ("Concepcion-Norte", ["Norte", "Concepcion"], (7.4,)),
    ("Quevedo-Norte", ["Quevedo", "Norte"], (12.0,)),
]
# The per-direction figures of links 3 and 4 (C-37 / C-38). The model does not know which
# module pair runs a link: Quijote->Quevedo made 4.0 / 2.25 kb/s where Quevedo->Quijote, same
# fibre, made 11 / 7.8, so that direction's pair is 2.7x below the model (within 3x).
DIRECTIONAL: list[tuple[str, list[str], tuple[float, ...]]] = [
    ("link3(Quijote->Quevedo)", ["Quijote", "Quevedo"], (4.0, 2.25)),
    ("link3(Quevedo->Quijote)", ["Quevedo", "Quijote"], (11.0, 7.8)),
    ("link4(Quevedo->Norte)", ["Quevedo", "Norte"], (8.7, 12.0)),
    ("link4(Norte->Quevedo)", ["Norte", "Quevedo"], (9.0, 6.2)),
]


def _lab() -> dict:
    return topology.load(MADQCI)["sdqkd-lab:lab"]


def mux_port(end: dict, channel: int) -> int:
    """The switch port a fibre end gives a DWDM channel: its mux port passing it, else its one port."""
    if "mux-port" not in end:
        return end["port"]
    (port,) = [m["port"] for m in end["mux-port"] if str(channel) in m["channel"]]
    return port


def _trace(lb: dict, sites: list[str], tmp_path: Path):
    """Cross-connect a Tx at the first site to an Rx at the last over the co-located fibres
    and trace it in the emulated plant, on C-37."""
    nodes = {n["name"]: n for n in lb["node"]}
    sw = {s["node"]: s["name"] for s in lb["switch"]}
    tx = next(i for i in nodes[sites[0]]["qkd-interface"] if i.get("role") == T + "TRANSMITTER" and "attachment" in i)
    rx = next(i for i in nodes[sites[-1]]["qkd-interface"] if i.get("role") == T + "RECEIVER" and "attachment" in i)
    xc: dict[str, dict[int, int]] = {sw[n]: {} for n in sites}
    port_in = tx["attachment"]["port"]
    for here, there in zip(sites, sites[1:]):
        (f,) = [f for f in lb["fibre"] if f["name"].startswith("cv-")
                and {f["a-end"]["node"], f["b-end"]["node"]} == {here, there}]
        near, far = (f["a-end"], f["b-end"]) if f["a-end"]["node"] == here else (f["b-end"], f["a-end"])
        xc[sw[here]][port_in] = mux_port(near, 37)
        port_in = mux_port(far, 37)
    xc[sw[sites[-1]]][port_in] = rx["attachment"]["port"]
    plant = Plant({"sdqkd-lab:lab": lb}, tmp_path / f"plant-{'-'.join(sites)}.sqlite")
    try:
        for name, pairs in xc.items():
            plant.set_cross_connects(name, pairs)
        ch = plant.trace(sites[0], tx["id"], wavelength=37)
        assert (ch.peer_node, ch.peer_qkdi_id) == (sites[-1], rx["id"])
        return ch, QkdProfile.from_dict(next(p for p in lb["profile"] if p["name"] == tx["profile"]))
    finally:
        plant.close()


def _ratio(model: float, paper: tuple[float, ...]) -> float:
    """How far the model is from the paper's figure (or from the C-37..C-38 interval), >= 1."""
    lo, hi = min(paper), max(paper)
    if model <= 0:
        return float("inf")
    return max(lo / model, model / hi, 1.0)


def _rows(table, tmp_path: Path) -> list[tuple[str, float, int, tuple[float, ...], float, float]]:
    lb = _lab()
    rows = []
    for name, sites, paper in table:
        ch, prof = _trace(lb, sites, tmp_path)
        spans = len(ch.fibres)
        model = secret_key_rate(prof, ch.loss_db, ch.classical_in_band(prof.band), spans=spans) / 1000
        rows.append((name, ch.loss_db, spans, paper, model, _ratio(model, paper)))
    print(f"\n{'path':48} {'loss dB':>7} {'spans':>5} {'paper kb/s':>12} {'model kb/s':>10} {'ratio':>6}")
    for name, loss, spans, paper, model, ratio in rows:
        print(f"{name:48} {loss:7.2f} {spans:5d} {' / '.join(map(str, paper)):>12} {model:10.3f} {ratio:6.2f}")
    return rows


def test_every_multi_link_cv_figure_within_a_factor_of_2(tmp_path: Path) -> None:
    rows = _rows(MULTI, tmp_path)
    bad = [(name, round(model, 3), paper) for name, _, _, paper, model, ratio in rows if ratio > 2.0]
    assert not bad, bad


def test_single_cv_links_within_a_factor_of_2(tmp_path: Path) -> None:
    rows = _rows(SINGLE, tmp_path)
    bad = [(name, round(model, 3), paper) for name, _, _, paper, model, ratio in rows if ratio > 2.0]
    assert not bad, bad
    # the reference point is the Concepcion-Norte link as the plant sees it (11.1 + 2 x 0.4 dB)
    assert dict((r[0], r[4]) for r in rows)["Concepcion-Norte"] == pytest.approx(7.4)
    rows = _rows(DIRECTIONAL, tmp_path)
    assert [r[0] for r in rows if r[5] > 2.0] == ["link3(Quijote->Quevedo)"]
    assert all(r[5] < 3.0 for r in rows)


def test_cv_rate_falls_off_towards_its_loss_limit(tmp_path: Path) -> None:
    """The old power law was 5-38x high above 20 dB: the rate now drops ~20-40x from 16 to
    22 dB; a 3-span path is nearly dark at the 23 dB budget, a 4-span one at its own limit."""
    lb = _lab()
    prof = QkdProfile.from_dict(next(p for p in lb["profile"] if p["name"] == "huawei-cv-c"))
    r = {loss: secret_key_rate(prof, loss, spans=2) for loss in (10.3, 16.6, 22.5)}
    assert r[10.3] / r[16.6] < 8 and r[16.6] / r[22.5] > 15
    assert 0 < secret_key_rate(prof, 23.0, spans=3) < 0.2 * secret_key_rate(prof, 20.9, spans=3)
    limit4 = span_loss_limit(prof, 4)
    assert limit4 == pytest.approx(prof.loss_limit - 3 * prof.span_penalty) and limit4 < prof.max_absorption
    assert secret_key_rate(prof, limit4 - 0.1, spans=4) > 0 == secret_key_rate(prof, limit4, spans=4)
    assert no_key_reason(prof, limit4 + 0.5, 2.0, spans=4) == (
        f"loss {limit4 + 0.5:.2f} dB at or over the loss limit {limit4:.2f} dB of a 4-span path")
    assert no_key_reason(prof, limit4 + 0.5, 2.0) is None  # one span: far from its limit
    assert secret_key_rate(prof, 2.0) < prof.max_skr * 1000  # the post-processing cap
    assert secret_key_rate(prof, 2.0) > 0.9 * prof.max_skr * 1000


def test_dv_qber_in_the_papers_range(tmp_path: Path) -> None:
    """Every fixed (DV) MadQCI link, with the classical channels of its fibre lit: the
    mean QBER and 95 % of the samples are within the paper's 2.2-4.2 %."""
    lb = _lab()
    topo = {"sdqkd-lab:lab": lb}
    plant = Plant(topo, tmp_path / "plant.sqlite")
    rng = random.Random(5)
    try:
        for lk in lb["link"]:
            node, qid = lk["endpoints"][0].split(":")
            iface = next(i for n in lb["node"] if n["name"] == node for i in n["qkd-interface"] if i["id"] == int(qid))
            prof = lab_plan.resolved_profile(lb, node, int(qid), iface["profile"])
            ch = plant.trace(node, int(qid))
            classical = ch.classical_in_band(prof.band)
            mean = mean_qber(prof, ch.loss_db, classical)
            samples = [sample_qber(prof, ch.loss_db, classical, rng) for _ in range(2000)]
            inside = sum(2.2 <= s <= 4.2 for s in samples) / len(samples)
            assert 2.6 <= mean <= 3.8 and inside >= 0.95, (lk["name"], round(mean, 2), inside)
            assert statistics.fmean(samples) == pytest.approx(mean, abs=0.05)
    finally:
        plant.close()
