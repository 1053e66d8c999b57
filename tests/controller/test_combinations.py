"""The routing-combination enumerator (controller/pathcomp/combinations.py): its counting rule on
small plants worked out by hand, and on MadQCI against the paper's figures."""
from __future__ import annotations

import itertools

import pytest

import madqci
from sdqkd.controller.pathcomp.combinations import count, routing_combinations
from sdqkd.controller.pathcomp.optical import OpticalRequest, direct_links, optical_options
from sdqkd.controller.topology.model import (
    RECEIVER,
    TRANSMITTER,
    ClassicalChannel,
    Fibre,
    FibreEnd,
    Node,
    QkdInterface,
    Switch,
    Topology,
)

MUX = ((34, 3), (37, 10), (38, 17))  # (channel, port offset)


def muxed(node: str, base: int) -> FibreEnd:
    """A fibre end behind a fixed mux: one switch port per channel 34, 37, 38."""
    return FibreEnd(node, f"s{node}", None, tuple((base + off, frozenset({ch})) for ch, off in MUX))


def triangle(classical_bc: tuple[ClassicalChannel, ...] = (), xc: dict[str, tuple] | None = None) -> Topology:
    """A, B, C; fibres A-B (5 dB), B-C (6 dB), A-C (14 dB), each behind muxes; 1 dB per switch.
    Tx at A, Rx at B and at C, all tunable 30..40, budget 20 dB."""
    xc = xc or {}
    chans = frozenset(range(30, 41))
    ifaces = [QkdInterface("A", 1, "CV-QKD", "C-band", {TRANSMITTER}, chans, 20.0, "sA", 1),
              QkdInterface("B", 2, "CV-QKD", "C-band", {RECEIVER}, chans, 20.0, "sB", 2),
              QkdInterface("C", 2, "CV-QKD", "C-band", {RECEIVER}, chans, 20.0, "sC", 2)]
    fibres = [Fibre("ab", muxed("A", 0), muxed("B", 0), 5.0),
              Fibre("bc", muxed("B", 1), muxed("C", 1), 6.0, classical=classical_bc),
              Fibre("ac", muxed("A", 2), muxed("C", 2), 14.0)]
    return Topology.build([Node(n, n) for n in "ABC"], ifaces, fibres=fibres,
                          switches=[Switch(f"s{n}", n, 20, 1.0, xc.get(n, ())) for n in "ABC"])


def test_counting_rule_on_a_triangle() -> None:
    """A->B: ab (7 dB), ac+bc (23 dB, over 20); A->C: ac (16 dB), ab+bc (14 dB): 3 combinations,
    2 pairs, 9 counted with wavelengths (each route passes 34, 37 and 38)."""
    combos = routing_combinations(triangle())
    assert sorted((c.rx[0], c.fibres, c.loss_db) for c in combos) == [
        ("B", ("ab",), 7.0), ("C", ("ab", "bc"), 14.0), ("C", ("ac",), 16.0)]
    assert count(combos) == {"combinations": 3, "with_wavelengths": 9, "pairs": 2}
    assert all(c.channels == {34, 37, 38} for c in combos)


def test_wavelengths_drop_where_a_fibre_cannot_carry_them() -> None:
    # classical 36 on bc blocks 37 (adjacent) on the A->B->C route only
    combos = {c.fibres: c.channels for c in routing_combinations(triangle(classical_bc=(ClassicalChannel(36),)))}
    assert combos[("ab", "bc")] == {34, 38} and combos[("ac",)] == {34, 37, 38}
    # a cross-connect holding the 34 mux port of ab at A (as a channel on 34 would): 37 and 38 remain there
    held = routing_combinations(triangle(xc={"A": ((3, 19),)}))
    assert {c.fibres: c.channels for c in held}[("ab",)] == {37, 38}


def test_either_role_counts_each_pair_once() -> None:
    combos = routing_combinations(triangle(), either_role=True)
    # B and C can now be joined too (bc, 8 dB; ab+ac 21 dB is over budget) and A->B, A->C as before
    assert count(combos) == {"combinations": 4, "with_wavelengths": 12, "pairs": 3}


def test_enumerator_agrees_with_path_computation() -> None:
    """Every (Tx, Rx) the enumerator finds, the path computation routes, at the loss of the
    enumerator's lowest-loss route, on each of its channels; and no other pair routes."""
    topo = madqci.topology(cv_in_service=False)
    combos = routing_combinations(topo, "CV-QKD")
    best: dict[tuple, tuple[float, frozenset]] = {}
    for c in combos:
        if (c.tx, c.rx) not in best or c.loss_db < best[(c.tx, c.rx)][0]:
            best[(c.tx, c.rx)] = (c.loss_db, c.channels)
    cv = {(p.tx, p.rx) for p in direct_links(topo) if topo.interfaces[p.tx].technology == "CV-QKD"}
    assert set(best) == cv
    for (tx, rx), (loss, chans) in best.items():
        options = optical_options(topo, OpticalRequest(tx=tx, rx=rx))
        assert {o.channel for o in options} == chans and min(o.loss_db for o in options) == pytest.approx(loss)


def site(topo: Topology, key: tuple[str, int]) -> str:
    return topo.nodes[key[0]].name


def test_madqci_counts_against_the_paper() -> None:
    """The paper: 9 physical direct links, 45 possible with switching, 34 routing combinations
    between the 10 CV modules, 36 counted with wavelengths.

    - 9: with the lab's roles (5 Tx, 5 Rx), the Tx/Rx pairs at the two ends of one fibre.
    - 45 = C(10, 2): any module with any other.
    - with the modules' own roles, switching reaches 18 pairs over 19 routes (Distrito ->
      Concepcion also via Norte), 57 counted with wavelengths (34, 37, 38 on every route).
    - either module transmitting (the Huawei modules are transceivers), 35 pairs over 36
      routes. The paper's 36 matches the routes; its 34 is one short of our 35 pairs, and no
      lab data consistent with the measured paths can give an even pair count: Quijote,
      Quevedo and Norte hold two modules each, so every pair with one of them comes twice, and
      the only pair of two single-module sites in reach is Distrito-Concepcion, which the
      paper measured (0.11 kb/s). So the 34 counts something the papers do not spell out
      (another module placement, or a pair not tested); the lab keeps the measured facts.
    """
    topo = madqci.topology(cv_in_service=False)
    fixed = routing_combinations(topo, "CV-QKD")
    assert sum(1 for c in fixed if len(c.fibres) == 1) == 9
    assert len(list(itertools.combinations([k for k, i in topo.interfaces.items() if i.technology == "CV-QKD"], 2))) == 45
    assert count(fixed) == {"combinations": 19, "with_wavelengths": 57, "pairs": 18}
    either = routing_combinations(topo, "CV-QKD", either_role=True)
    assert count(either) == {"combinations": 36, "with_wavelengths": 108, "pairs": 35}
    singles = {n.name for n in topo.nodes.values()
               if sum(1 for i in topo.interfaces_of(n.qkdn_id) if i.technology == "CV-QKD") == 1}
    assert singles == {"Quintin", "Quiron", "Distrito", "Concepcion"}
    single_pairs = {frozenset((site(topo, c.tx), site(topo, c.rx))) for c in either
                    if {site(topo, c.tx), site(topo, c.rx)} <= singles}
    assert single_pairs == {frozenset({"Distrito", "Concepcion"})}


def test_madqci_in_service_leaves_what_the_muxes_free() -> None:
    """With the four CV links in service (34 on their fibres), the idle Distrito Tx still
    reaches the idle Quevedo Rx over Norte, on 37 or 38."""
    topo = madqci.topology()
    (c,) = routing_combinations(topo, "CV-QKD")
    assert (site(topo, c.tx), site(topo, c.rx), c.fibres) == ("Distrito", "Quevedo", ("cv-distrito-norte", "cv-quevedo-norte"))
    assert c.channels == {37, 38}
