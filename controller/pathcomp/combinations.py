"""What a switched domain can connect: every routing combination between its QKD modules.

The counting rule (the one the MadQCI figures are compared with, README "Optical layer"):

- a *routing combination* is one pair of modules of one technology on two different nodes,
  one transmitting and one receiving, joined by one loop-free route of fibres through the
  switches whose loss (fibres plus every switch crossed, the two end switches included) is
  within the receiver's max_absorption and on which one DWDM channel is usable end to end
  (both modules tune to it, every fibre's mux ports pass it, it is free on every fibre and
  clear of classical channels) - the rules of `optical.optical_path`;
- *counted with wavelengths*, each usable channel of a combination counts once more;
- with `either_role`, a module may take either role (a Huawei CV module is a transceiver:
  its profile's role-support), and a pair counts once whichever end transmits;
- the *pairs* are the distinct module pairs with at least one combination.

Ports and channels already in use count as taken, so on an idle network this is what
switching makes possible, and on a busy one what is left.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx

from sdqkd.controller.pathcomp.optical import IfKey, common_channels, fibre_blocks, incompatible
from sdqkd.controller.topology.model import RECEIVER, TRANSMITTER, FibreEnd, QkdInterface, Topology

_EPS = 1e-9


@dataclass(frozen=True)
class Combination:
    """One routing combination: tx -> rx over `fibres` (in order), `channels` usable end to end."""

    tx: IfKey
    rx: IfKey
    fibres: tuple[str, ...]
    loss_db: float
    channels: frozenset[int | None]


def routing_combinations(topo: Topology, technology: str | None = None,
                         either_role: bool = False) -> list[Combination]:
    """Every routing combination of the switched modules (see the module docstring), in a fixed order.

    either_role: each unordered pair once, from the end whose route list is longer (ties: the
    lower key transmits); without it, the modules' own roles."""
    mods = sorted((i for i in topo.interfaces.values()
                   if i.switch is not None and (technology is None or i.technology == technology)),
                  key=lambda i: i.key)
    if either_role:
        mods = [_both(i) for i in mods]
    sites = _site_graph(topo)
    out: list[Combination] = []
    seen: set[frozenset[IfKey]] = set()
    for a in mods:
        for b in mods:
            pair = frozenset((a.key, b.key))
            if a.node == b.node or pair in seen or TRANSMITTER not in a.roles or RECEIVER not in b.roles:
                continue
            found = _combinations(topo, sites, a, b)
            if either_role:
                seen.add(pair)
                back = _combinations(topo, sites, _as(b, TRANSMITTER), _as(a, RECEIVER))
                found = max(found, back, key=len)
            out += found
    return out


def count(combos: list[Combination]) -> dict[str, int]:
    """The three counts: combinations, counted with wavelengths, and module pairs."""
    return {"combinations": len(combos),
            "with_wavelengths": sum(len(c.channels) for c in combos),
            "pairs": len({frozenset((c.tx, c.rx)) for c in combos})}


def _both(i: QkdInterface) -> QkdInterface:
    return replace(i, roles=frozenset({TRANSMITTER, RECEIVER}))


def _as(i: QkdInterface, role: str) -> QkdInterface:
    return replace(i, roles=frozenset({role}))


def _site_graph(topo: Topology) -> nx.MultiGraph:
    """Switches joined by fibres that have a free port pair at both ends; each edge keeps the
    channels those port pairs pass (None: any)."""
    g = nx.MultiGraph()
    usable = topo.usable_switches()
    for f in sorted(topo.fibres.values(), key=lambda f: f.name):
        if f.a.switch not in usable or f.b.switch not in usable:
            continue
        passed: set[int | None] = set()
        for pa, ca in f.a.ports():
            for pb, cb in f.b.ports():
                if pa in usable[f.a.switch].used_ports or pb in usable[f.b.switch].used_ports:
                    continue
                chans = FibreEnd.pair_channels(ca, cb)
                passed |= set(chans) if chans is not None else {None}
        if passed:
            g.add_edge(f.a.switch, f.b.switch, key=f.name, channels=frozenset(passed))
    return g


def _combinations(topo: Topology, g: nx.MultiGraph, tx: QkdInterface, rx: QkdInterface) -> list[Combination]:
    if incompatible(topo, tx, rx) or tx.switch not in g or rx.switch not in g:
        return []
    for i in (tx, rx):
        if i.port in topo.switches[i.switch].used_ports:  # type: ignore[index]
            return []
    il = {n: s.insertion_loss for n, s in topo.switches.items()}
    wanted = common_channels(tx, rx)
    out = []
    for route in nx.all_simple_edge_paths(g, tx.switch, rx.switch):
        fibres = [topo.fibres[k] for _, _, k in route]
        loss = sum(f.loss_db for f in fibres) + il[tx.switch] + sum(il[v] for _, v, _ in route)  # type: ignore[index]
        if loss > rx.max_absorption + _EPS:
            continue
        chans = set(wanted)
        for (u, v, k), f in zip(route, fibres):
            passed = g.edges[u, v, k]["channels"]
            chans = {c for c in chans if (c is None or None in passed or c in passed) and not fibre_blocks(f, c, tx.band)}
        if chans:
            out.append(Combination(tx.key, rx.key, tuple(f.name for f in fibres), round(loss, 6), frozenset(chans)))
    return out
