"""Direct quantum channels through switches: MadQCI's co-located domain, the RWA rules one
by one, and random switched networks checked against a brute force written here."""
from __future__ import annotations

import dataclasses
import itertools
import random

import networkx as nx
import pytest

from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.pathcomp.optical import OpticalPath, OpticalRequest, direct_links, optical_path
import madqci
from madqci import qkdn_id as Q
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

CH = frozenset(range(30, 41))


def iface(node: str, qkdi: int, role: str, port: int | None, channels: frozenset[int] = CH, budget: float = 23.0,
          tech: str = "CV-QKD", band: str = "C-band") -> QkdInterface:
    return QkdInterface(node, qkdi, tech, band, {role}, channels, budget,
                        switch=f"s{node}" if port else None, port=port)


def fibre(name: str, a: str, pa: int, b: str, pb: int, loss: float, **kw) -> Fibre:
    return Fibre(name, FibreEnd(a, f"s{a}", pa), FibreEnd(b, f"s{b}", pb), loss, **kw)


def line(ab: dict | None = None, bc: dict | None = None, tx: dict | None = None, rx: dict | None = None,
         xc: dict[str, tuple] | None = None, extra: tuple[Fibre, ...] = (), down: str = "") -> Topology:
    """A -ab(5 dB)- B -bc(6 dB)- C, a switch (1 dB) at each; Tx at A port 1, Rx at C port 2."""
    xc = xc or {}
    return Topology.build(
        [Node(n, n, up=n != down) for n in "ABC"],
        [iface("A", 1, TRANSMITTER, 1, **(tx or {})), iface("C", 2, RECEIVER, 2, **(rx or {}))],
        fibres=[fibre("ab", "A", 3, "B", 3, 5.0, **(ab or {})), fibre("bc", "B", 4, "C", 3, 6.0, **(bc or {})), *extra],
        switches=[Switch(f"s{n}", n, 8, 1.0, xc.get(n, ())) for n in "ABC"])


REQ = OpticalRequest(tx=("A", 1), rx=("C", 2))


# --- the rules, one by one ----------------------------------------------------------

def test_path_through_a_middle_switch() -> None:
    p = optical_path(line(), REQ)
    assert p == OpticalPath(("A", 1), ("C", 2), 30, ("ab", "bc"), (("sA", 1, 3), ("sB", 3, 4), ("sC", 3, 2)), 14.0)


def test_loss_budget_boundary() -> None:
    assert optical_path(line(rx={"budget": 14.0}), REQ).loss_db == 14.0
    with pytest.raises(NoPath, match=r"loss over budget: 14.00 dB > 13.99 dB"):
        optical_path(line(rx={"budget": 13.99}), REQ)


def test_classical_channel_on_or_next_to_the_quantum_channel_blocks_it() -> None:
    two = {"channels": frozenset({36, 37})}
    with pytest.raises(NoPath) as err:
        optical_path(line(tx=two, rx=two, bc={"classical": (ClassicalChannel(36),)}), REQ)
    assert "ch 36 is on classical ch 36 on bc" in err.value.reason
    assert "ch 37 is next to classical ch 36 on bc" in err.value.reason
    # classical on 35 blocks 36 (adjacent) but leaves 37
    assert optical_path(line(tx=two, rx=two, bc={"classical": (ClassicalChannel(35),)}), REQ).channel == 37
    # a classical channel of unknown number, or in another band, blocks nothing
    other = (ClassicalChannel(None), ClassicalChannel(36, band="O-band"))
    assert optical_path(line(tx=two, rx=two, bc={"classical": other}), REQ).channel == 36


def test_o_band_quantum_channels_ignore_c_band_classical_channels() -> None:
    o_band = {"channels": frozenset(), "band": "O-band"}
    crowded = {"classical": tuple(ClassicalChannel(c) for c in range(20, 60)), "mux_channels": frozenset({34})}
    p = optical_path(line(tx=o_band, rx=o_band, ab=crowded, bc=crowded), REQ)
    assert p.channel is None and p.loss_db == 14.0


def test_fixed_muxes_block_channels_they_do_not_pass() -> None:
    two = {"channels": frozenset({36, 37})}
    with pytest.raises(NoPath, match=r"2 channel\(s\) not passed by fixed muxes"):
        optical_path(line(tx=two, rx=two, ab={"mux_channels": frozenset({34, 38})}), REQ)
    assert optical_path(line(ab={"mux_channels": frozenset({34, 38})}), REQ).channel == 34


def test_wavelength_continuity_one_channel_end_to_end() -> None:
    # 36 is taken on ab and 37 is next to classical 38 on bc: each fibre has a free channel, no channel is free on both
    two = {"channels": frozenset({36, 37})}
    with pytest.raises(NoPath) as err:
        optical_path(line(tx=two, rx=two, ab={"quantum_in_use": frozenset({36})},
                          bc={"classical": (ClassicalChannel(38),)}), REQ)
    assert err.value.reason.startswith("no common free wavelength on the route (ab, bc)")
    assert "ch 36 already carries a quantum channel on ab" in err.value.reason
    assert "ch 37 is next to classical ch 38 on bc" in err.value.reason


def test_tx_and_rx_must_share_a_channel_and_technology() -> None:
    with pytest.raises(NoPath, match="have none in common"):
        optical_path(line(tx={"channels": frozenset({30})}, rx={"channels": frozenset({31})}), REQ)
    with pytest.raises(NoPath, match="technology CV-QKD .Tx. != DV-QKD .Rx."):
        optical_path(line(rx={"tech": "DV-QKD"}), REQ)
    with pytest.raises(NoPath, match="band"):
        optical_path(line(rx={"band": "O-band", "channels": frozenset()}), REQ)


def test_ports_already_cross_connected_are_not_free() -> None:
    with pytest.raises(NoPath, match="port 2 of switch sC, already cross-connected"):
        optical_path(line(xc={"C": ((2, 5),)}), REQ)
    with pytest.raises(NoPath, match="no route .* over free switch ports"):
        optical_path(line(xc={"B": ((3, 7),)}), REQ)
    # a second, lossier A-B fibre on free ports takes over
    spare = fibre("ab2", "A", 4, "B", 5, 8.0)
    p = optical_path(line(xc={"B": ((3, 7),)}, extra=(spare,)), REQ)
    assert p.fibres == ("ab2", "bc") and p.hops[1] == ("sB", 5, 4) and p.loss_db == 17.0


def test_lowest_loss_route_without_a_free_wavelength_gives_way() -> None:
    spare = fibre("ab2", "A", 4, "B", 5, 8.0)
    p = optical_path(line(ab={"quantum_in_use": CH}, extra=(spare,)), REQ)
    assert p.fibres == ("ab2", "bc") and p.channel == 30 and p.loss_db == 17.0


def test_switch_at_a_down_node_cannot_be_used() -> None:
    with pytest.raises(NoPath, match="no route"):
        optical_path(line(down="B"), REQ)


def test_unswitched_interfaces_use_a_fixed_fibre_only() -> None:
    dv = {"tech": "DV-QKD", "band": "O-band", "channels": frozenset()}
    nodes = [Node("A", "A"), Node("B", "B"), Node("C", "C")]
    topo = Topology.build(
        nodes, [iface("A", 1, TRANSMITTER, None, **dv), iface("B", 2, RECEIVER, None, **dv),
                iface("C", 3, RECEIVER, None, **dv), iface("C", 4, RECEIVER, 2, **dv)],
        fibres=[Fibre("ab-long", FibreEnd("A"), FibreEnd("B"), 9.0), Fibre("ab", FibreEnd("A"), FibreEnd("B"), 4.0),
                Fibre("ac-switched", FibreEnd("A"), FibreEnd("C", "sC", 3), 1.0)],
        switches=[Switch("sC", "C", 4)])
    p = optical_path(topo, OpticalRequest(tx=("A", 1), rx=("B", 2)))
    assert p.fibres == ("ab",) and p.hops == () and p.loss_db == 4.0 and p.channel is None
    with pytest.raises(NoPath, match="no fixed fibre joins A:1 and C:3"):
        optical_path(topo, OpticalRequest(tx=("A", 1), rx=("C", 3)))
    with pytest.raises(NoPath, match="A:1 is not patched to a switch"):
        optical_path(topo, OpticalRequest(tx=("A", 1), rx=("C", 4)))


def test_node_request_tries_every_compatible_pair() -> None:
    topo = line()
    dv_tx = iface("A", 7, TRANSMITTER, 5, tech="DV-QKD")
    topo = topo.replace(interfaces={**topo.interfaces, dv_tx.key: dv_tx})
    p = optical_path(topo, OpticalRequest(src="A", dst="C"))
    assert p.tx == ("A", 1)
    with pytest.raises(NoPath, match="no transmitter at C"):
        optical_path(topo, OpticalRequest(src="C", dst="A"))
    # only the CV Tx matches the CV Rx's technology: the DV one is not tried
    with pytest.raises(NoPath, match=r"^loss over budget: 14.00 dB > 10.00 dB \(A:1 -> C:2\)"):
        optical_path(line(rx={"budget": 10.0}).replace(interfaces={**line(rx={"budget": 10.0}).interfaces,
                                                                   dv_tx.key: dv_tx}),
                     OpticalRequest(src="A", dst="C"))


@pytest.mark.parametrize("kw", [{}, {"tx": ("A", 1)}, {"tx": ("A", 1), "rx": ("C", 2), "src": "A"}, {"src": "A"}])
def test_request_needs_interfaces_or_nodes(kw: dict) -> None:
    with pytest.raises(ValueError):
        OpticalRequest(**kw)


def test_topology_rejects_double_patching() -> None:
    with pytest.raises(ValueError, match="already holds"):
        line(extra=(fibre("dup", "A", 1, "B", 6, 1.0),))


# --- MadQCI ---------------------------------------------------------------------------

def cv_links(paths: list[OpticalPath], topo: Topology) -> list[OpticalPath]:
    return [p for p in paths if topo.interfaces[p.tx].technology == "CV-QKD"]


def name(topo: Topology, key: tuple[str, int]) -> str:
    return topo.nodes[key[0]].name


def test_madqci_switching_reach() -> None:
    """The lab file's fixed roles (5 Tx, 5 Rx on seven sites) give 25 Tx->Rx pairs, 22 across
    sites (Quijote, Quevedo and Norte hold one of each), and 4 of those exceed the 23 dB
    budget: 18 direct CV links. Plus the 8 DV links on fixed fibres."""
    topo = madqci.topology(cv_in_service=False)
    paths = direct_links(topo)
    cv = cv_links(paths, topo)
    assert len(cv) == 18 and len(paths) - len(cv) == 8
    pairs = {(name(topo, p.tx), name(topo, p.rx)) for p in cv}
    assert ("Quiron", "Concepcion") not in pairs and ("Distrito", "Quintin") not in pairs
    for p in cv:
        assert p.loss_db <= madqci.cv_budget_db() and p.channel in madqci.cv_mux()
        assert len(p.hops) == len(p.fibres) + 1
        assert all(i != o for _, i, o in p.hops)
    with pytest.raises(NoPath, match=r"loss over budget: 34.30 dB > 23.00 dB"):
        optical_path(topo, OpticalRequest(tx=madqci.cv_tx("Quiron"), rx=madqci.cv_rx("Concepcion")))
    with pytest.raises(NoPath, match=r"loss over budget: 27.10 dB > 23.00 dB"):
        optical_path(topo, OpticalRequest(tx=madqci.cv_tx("Norte"), rx=madqci.cv_rx("Quintin")))


def test_madqci_with_free_roles_is_in_the_papers_range() -> None:
    """The paper: 45 possible direct links (= C(10,2), any module with any other) and 34
    routing combinations. If every CV module could take either role, the lab's plant has 45
    pairs, 3 of them on one site, 7 over budget: 35."""
    topo = madqci.topology(cv_in_service=False)
    both = {k: dataclasses.replace(i, roles=frozenset({TRANSMITTER, RECEIVER})) if i.technology == "CV-QKD" else i
            for k, i in topo.interfaces.items()}
    free = topo.replace(interfaces=both)
    cv_modules = [k for k, i in free.interfaces.items() if i.technology == "CV-QKD"]
    assert len(cv_modules) == 10 and len(list(itertools.combinations(cv_modules, 2))) == 45
    unordered = {frozenset((p.tx, p.rx)) for p in cv_links(direct_links(free), free)}
    assert len(unordered) == 35
    assert 34 <= len(unordered) <= 45


def test_madqci_switched_rows_of_the_table_are_reproduced() -> None:
    topo = madqci.topology(cv_in_service=False)
    # "Distrito-Concepcion, co-loc, 20.1 dB": their CV fibre, plus 0.4 dB in each switch
    p = optical_path(topo, OpticalRequest(tx=madqci.cv_tx("Distrito"), rx=madqci.cv_rx("Concepcion")))
    assert p.fibres == ("cv-distrito-concepcion",) and p.loss_db == pytest.approx(20.9)
    assert [h[0] for h in p.hops] == ["sw-distrito", "sw-concepcion"]
    # measured multi-link combinations are all within the 23 dB budget
    for tx, rx in (("Quijote", "Norte"), ("Quiron", "Norte"), ("Quiron", "Quevedo"), ("Distrito", "Quijote")):
        assert len(optical_path(topo, OpticalRequest(tx=madqci.cv_tx(tx), rx=madqci.cv_rx(rx))).fibres) > 1
        assert optical_path(topo, OpticalRequest(tx=madqci.cv_tx(tx), rx=madqci.cv_rx(rx))).loss_db < 23.0
    # direct links reproduce their table losses (plus the two switches)
    assert optical_path(topo, OpticalRequest(tx=madqci.cv_tx("Quevedo"), rx=madqci.cv_rx("Norte"))).loss_db == 5.1


def test_madqci_in_service_ports_and_channels_are_taken() -> None:
    topo = madqci.topology()
    # the idle Distrito Tx reaches the idle Quevedo Rx over fibres already carrying CV channels on
    # DWDM 34: the muxes give each fibre end a port per channel, so it goes on 37 (contention per wavelength)
    (p,) = cv_links(direct_links(topo), topo)
    assert (p.tx, p.rx) == (madqci.cv_tx("Distrito"), madqci.cv_rx("Quevedo")) and p.channel == 37
    assert p.fibres == ("cv-distrito-norte", "cv-quevedo-norte") and p.loss_db == pytest.approx(15.7)
    assert 34 in topo.fibres["cv-quevedo-norte"].quantum_in_use
    with pytest.raises(NoPath, match=r"no common free wavelength .*: ch 34 already carries a quantum channel on cv-quevedo-norte"):
        optical_path(topo, OpticalRequest(tx=madqci.cv_tx("Distrito"), rx=madqci.cv_rx("Quevedo"), channel=34))
    with pytest.raises(NoPath, match="already cross-connected"):
        optical_path(topo, OpticalRequest(tx=madqci.cv_tx("Quiron"), rx=madqci.cv_rx("Norte")))
    assert topo.fibres["cv-quevedo-norte"].quantum_in_use == {34}
    assert {lid for lid in topo.links if lid.startswith("qkdl-cv-")} == {
        f"qkdl-cv-{tx.lower()}-{rx.lower()}" for tx, rx in madqci.CV_IN_SERVICE}


# --- random switched networks against brute force --------------------------------------

def random_network(seed: int) -> Topology:
    rng = random.Random(seed)
    sites = [f"S{i}" for i in range(6)]
    g = nx.gnm_random_graph(6, 9, seed=seed)
    next_port = {s: 1 for s in sites}

    def port(site: str) -> int:
        next_port[site] += 1
        return next_port[site] - 1

    ifaces = []
    for site in sites:
        for qkdi, role in ((1, TRANSMITTER), (2, RECEIVER)):
            if rng.random() < 0.7:
                chans = frozenset(rng.sample(range(30, 40), 4))
                ifaces.append(QkdInterface(site, qkdi, "CV-QKD", "C-band", {role}, chans, rng.uniform(12, 24),
                                           switch=f"s{site}", port=port(site)))
    fibres = []
    for n, (u, v) in enumerate(sorted(g.edges())):
        for k in range(2 if rng.random() < 0.2 else 1):
            a, b = sites[u], sites[v]
            fibres.append(Fibre(
                f"f{n}{'abc'[k]}", FibreEnd(a, f"s{a}", port(a)), FibreEnd(b, f"s{b}", port(b)),
                round(rng.uniform(1, 8), 2),
                classical=tuple(ClassicalChannel(rng.randint(28, 42)) for _ in range(rng.randint(0, 2))),
                mux_channels=frozenset(rng.sample(range(30, 40), 6)) if rng.random() < 0.4 else frozenset(),
                quantum_in_use=frozenset(rng.sample(range(30, 40), rng.randint(0, 2)))))
    switches = []
    for site in sites:  # a few ports already taken by cross-connects
        taken = [p for p in range(1, next_port[site]) if rng.random() < 0.1]
        xcs = tuple((p, 20 + i) for i, p in enumerate(taken))
        switches.append(Switch(f"s{site}", site, 32, round(rng.uniform(0.5, 1.5), 2), xcs))
    return Topology.build([Node(s, s) for s in sites], ifaces, fibres=fibres, switches=switches)


def brute_force(topo: Topology, tx: QkdInterface, rx: QkdInterface) -> tuple[float, int] | None:
    """Lowest (loss, channel) over every site-level simple path and every channel, rules rechecked here."""
    sw = {s.node: s for s in topo.switches.values()}
    used = {s.node: {p for xc in s.cross_connects for p in xc} for s in topo.switches.values()}
    if tx.port in used[tx.node] or rx.port in used[rx.node]:
        return None
    g = nx.MultiGraph()
    for f in topo.fibres.values():
        if f.a.port not in used[f.a.node] and f.b.port not in used[f.b.node]:
            g.add_edge(f.a.node, f.b.node, key=f.name)
    best = None
    for path in nx.all_simple_edge_paths(g, tx.node, rx.node) if tx.node in g and rx.node in g else []:
        fibres = [topo.fibres[k] for _, _, k in path]
        sites = [tx.node] + [v for _, v, _ in path]
        loss = sum(f.loss_db for f in fibres) + sum(sw[s].insertion_loss for s in sites)
        for c in sorted(tx.channels & rx.channels):
            if all((not f.mux_channels or c in f.mux_channels) and c not in f.quantum_in_use
                   and all(abs(cl.channel - c) > 1 for cl in f.classical) for f in fibres):
                if loss <= rx.max_absorption + 1e-9 and (best is None or (loss, c) < best):
                    best = (loss, c)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_random_switched_networks_match_brute_force(seed: int) -> None:
    topo = random_network(seed)
    txs = [i for i in topo.interfaces.values() if TRANSMITTER in i.roles]
    rxs = [i for i in topo.interfaces.values() if RECEIVER in i.roles]
    found = {(p.tx, p.rx): p for p in direct_links(topo)}
    for tx, rx in itertools.product(txs, rxs):
        if tx.node == rx.node:
            continue
        expected = brute_force(topo, tx, rx)
        if expected is None:
            assert (tx.key, rx.key) not in found
            with pytest.raises(NoPath):
                optical_path(topo, OpticalRequest(tx=tx.key, rx=rx.key))
            continue
        p = found[(tx.key, rx.key)]
        assert (p.loss_db, p.channel) == (pytest.approx(expected[0]), expected[1])
        # the hops chain: out port of each switch is the fibre's end there, in port of the next its far end
        assert p.hops[0][:2] == (tx.switch, tx.port) and p.hops[-1][0::2] == (rx.switch, rx.port)
        for (s1, _, out), f, (s2, inp, _) in zip(p.hops, p.fibres, p.hops[1:]):
            ends = {(topo.fibres[f].a.switch, topo.fibres[f].a.port), (topo.fibres[f].b.switch, topo.fibres[f].b.port)}
            assert ends == {(s1, out), (s2, inp)}
