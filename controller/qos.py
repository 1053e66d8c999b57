"""Key-rate reservations: what applications' min_bps holds on each QKD link.

Admission control needs to know what is already promised: a link of 1264 bit/s carries
one application asking 1138 bit/s, not three. An application's reservation is its
min_bps, split over its paths in proportion to each path's planned rate (a single path
holds it all), and held on every PHYS link of each path. A hop served by parallel links
spreads its share over them in proportion to their SKR, as the forwarding module draws
link key from any of them. Path computation for a new application then runs on the
residual network (each link's SKR minus what it holds), so every admitted bit/s has link
key behind it at the time of admission. The reservations live in the applications' paths
(`reserved` in each path of store.Application), so they persist with them.

Pure functions of (topology, applications): no I/O, no locks.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdqkd.controller.topology.model import Topology

_EPS = 1e-9


@dataclass(frozen=True)
class Hold:
    """`bps` of application `app_id` held on link `qkdl_id`."""

    app_id: str
    qkdl_id: str
    bps: float


def shares(path_bps: Sequence[float], min_bps: float) -> list[float]:
    """Each path's part of min_bps, proportional to its planned rate (equal parts when no
    path has a rate). The parts add up to min_bps exactly, so an application holds what it
    asked for, not the (larger) sum of its paths' rates."""
    if min_bps <= 0 or not path_bps:
        return [0.0 for _ in path_bps]
    total = sum(max(0.0, b) for b in path_bps)
    if total <= _EPS:
        return [min_bps / len(path_bps) for _ in path_bps]
    return [min_bps * max(0.0, b) / total for b in path_bps]


def holds(topo: Topology, app_id: str, paths: Iterable[Mapping[str, Any]]) -> list[Hold]:
    """What one application's paths hold, link by link. A path lists the links of each hop
    (parallel links on one hop all listed); its `reserved` is spread over a hop's links by
    their SKR now (equally when none is known)."""
    out: list[Hold] = []
    for p in paths:
        bps = float(p.get("reserved") or 0.0)
        if bps <= 0:
            continue
        nodes = list(p.get("nodes") or [])
        by_hop: dict[frozenset[str], list[str]] = {}
        for lid in p.get("links") or []:
            lk = topo.links.get(lid)
            hop = frozenset((lk.a, lk.b)) if lk is not None else frozenset((lid,))
            by_hop.setdefault(hop, []).append(lid)
        if not by_hop and len(nodes) >= 2:
            continue
        for lids in by_hop.values():
            rates = [topo.links[x].skr if x in topo.links else 0.0 for x in lids]
            total = sum(rates)
            for lid, rate in zip(lids, rates):
                out.append(Hold(app_id, lid, bps * (rate / total if total > _EPS else 1.0 / len(lids))))
    return out


def by_link(all_holds: Iterable[Hold]) -> dict[str, list[Hold]]:
    """Holds grouped by link, applications in a fixed order."""
    out: dict[str, list[Hold]] = {}
    for h in sorted(all_holds, key=lambda h: (h.qkdl_id, h.app_id)):
        out.setdefault(h.qkdl_id, []).append(h)
    return out


def residual(topo: Topology, all_holds: Iterable[Hold]) -> Topology:
    """`topo` with every link's SKR lowered by what it holds (never below 0: a link whose
    rate fell under its reservations offers nothing more, and leaves the relay graph)."""
    held: dict[str, float] = {}
    for h in all_holds:
        held[h.qkdl_id] = held.get(h.qkdl_id, 0.0) + h.bps
    if not held:
        return topo
    def left(skr: float, hold: float) -> float:
        rest = skr - hold
        return rest if rest > 1e-6 * max(1.0, skr) else 0.0  # rounding must not leave a sliver

    links = {lid: (dataclasses.replace(lk, skr=left(lk.skr, held[lid])) if lid in held else lk)
             for lid, lk in topo.links.items()}
    return topo.replace(links=links)
