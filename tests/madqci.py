"""The MadQCI network as a controller topology snapshot, for tests and benchmarks, built from
the lab's own file (lab/topologies/madqci.json): one model of MadQCI, whose figures and
assumptions are that file's.

What the file gives directly: nodes (qkdn_ids as the lab assigns them), QKD interfaces
(from their vendor profiles), fibres and switches (read as the controller's inventory reads
them), and the fixed DV links at their expected key rates. What the running network adds
on top, modelled here the way the controller and the plant do it: the CV links in service
(CV_IN_SERVICE), each set up by the controller's optical path computation through the
switches (ports and channel taken, in order), at the rate the CV profile gives for the
path's loss and the same-band classical channels on its fibres.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from sdqkd.qkdprofile import QkdProfile, identity_name, secret_key_rate
from sdqkd.controller.pathcomp.optical import OpticalPath, OpticalRequest, optical_path
from sdqkd.controller.topology.builder import Inventory
from sdqkd.controller.topology.model import QkdInterface, QkdLink, Node, Switch, Topology
from sdqkd.lab import topology as labfile
from sdqkd.lab.plan import node_id

FILE = Path(__file__).resolve().parents[1] / "lab" / "topologies" / "madqci.json"
CV_TECHNOLOGY = "CV-QKD"
# CV links in service by default, (Tx site, Rx site), set up in this order. The file places
# 5 Tx and 5 Rx on seven sites; these four leave one Tx (Distrito) and one Rx (Quevedo) idle.
CV_IN_SERVICE = (("Quiron", "Quijote"), ("Quevedo", "Norte"), ("Norte", "Concepcion"), ("Quijote", "Quintin"))


@cache
def lab() -> dict[str, Any]:
    """The `sdqkd-lab:lab` object of the file, YANG-checked by the lab's loader."""
    data = labfile.load(FILE)
    return data.get("sdqkd-lab:lab", data)


def qkdn_id(name: str) -> str:
    """A MadQCI node's qkdn_id, the one the lab gives it."""
    node = next((n for n in lab()["node"] if n["name"] == name), None)
    if node is None:
        raise KeyError(name)
    return node_id(lab()["name"], node)


@cache
def _profiles() -> dict[str, QkdProfile]:
    """The lab file's vendor profiles by name (built once: asked for per interface)."""
    return {p["name"]: QkdProfile.from_dict(p) for p in lab()["profile"]}


def _iface(name: str, qkdi: int) -> dict[str, Any]:
    node = next(n for n in lab()["node"] if n["name"] == name)
    return next(i for i in node["qkd-interface"] if int(i["id"]) == qkdi)


def _cv(site: str, role: str) -> tuple[str, int]:
    node = next((n for n in lab()["node"] if n["name"] == site), None)
    for i in (node or {}).get("qkd-interface", []):
        if _profiles()[i["profile"]].technology.endswith(CV_TECHNOLOGY) and identity_name(i["role"]) == role:
            return (qkdn_id(site), int(i["id"]))
    raise KeyError(f"no CV {role.lower()} at {site}")


def cv_tx(site: str) -> tuple[str, int]:
    """The (qkdn_id, qkdi_id) of the CV transmitter at a site."""
    return _cv(site, "TRANSMITTER")


def cv_rx(site: str) -> tuple[str, int]:
    """The (qkdn_id, qkdi_id) of the CV receiver at a site."""
    return _cv(site, "RECEIVER")


def cv_budget_db() -> float:
    return max(p.max_absorption for p in _profiles().values() if p.technology.endswith(CV_TECHNOLOGY))


def cv_mux() -> frozenset[int]:
    """The channels the CV fibres' fixed muxes pass."""
    return frozenset(int(c) for f in lab()["fibre"] for c in f.get("mux-channel", []))


def topology(cv_in_service: bool = True) -> Topology:
    """MadQCI. cv_in_service=False: CV modules idle and switches clear (to count what
    switching can reach); True: the CV links of CV_IN_SERVICE are up and hold their ports."""
    return topology_and_paths(cv_in_service)[0]


def topology_and_paths(cv_in_service: bool = True, cv_links: Sequence[tuple[str, str]] = CV_IN_SERVICE
                       ) -> tuple[Topology, dict[str, OpticalPath]]:
    """topology(), with the optical path of each CV link in service by its qkdl_id (what the
    controller keeps as the link's channel); cv_links: other (Tx site, Rx site) to set up instead."""
    lb, profiles = lab(), _profiles()
    ids = {n["name"]: node_id(lb["name"], n) for n in lb["node"]}
    inv = Inventory(lb)
    nodes = [Node(ids[n["name"]], n["name"], n.get("domain"), bool(n.get("kms", True))) for n in lb["node"]]
    interfaces = []
    for n in lb["node"]:
        for i in n["qkd-interface"]:
            p = profiles[i["profile"]]
            fixed = int(i["channel"]) if i.get("channel") is not None else None
            att = i.get("attachment") or {}
            interfaces.append(QkdInterface(
                ids[n["name"]], int(i["id"]), identity_name(p.technology), p.band, {identity_name(i["role"])},
                p.channels, p.max_absorption, att.get("switch"), int(att["port"]) if "port" in att else None, fixed))
    links = []
    for lk in lb["link"]:
        (a, ai), (b, bi) = (e.rsplit(":", 1) for e in lk["endpoints"])
        links.append(QkdLink(f"qkdl-{lk['name']}", ids[a], int(ai), ids[b], int(bi), skr=float(lk["expected-skr"]) * 1000,
                             channel=int(lk["channel"]) if lk.get("channel") is not None else None,
                             fibres=tuple(lk.get("path", ()))))
    switches = [Switch(name, s["qkdn_id"], int(s["ports"]), float(s.get("insertion-loss", 1.0)))
                for name, s in inv.switches(ids).items()]
    topo = Topology.build(nodes, interfaces, links, inv.fibres(ids, {}).values(), switches)
    paths = {}
    if cv_in_service:
        for tx, rx in cv_links:
            topo, lid, paths[lid] = _set_up(topo, profiles, tx, rx)
    return topo, paths


def _set_up(topo: Topology, profiles: dict[str, QkdProfile], tx: str, rx: str) -> tuple[Topology, str, OpticalPath]:
    """The CV link tx -> rx as the controller makes it: path, cross-connects, channel."""
    t, r = cv_tx(tx), cv_rx(rx)
    path = optical_path(topo, OpticalRequest(tx=t, rx=r))
    profile = profiles[_iface(tx, t[1])["profile"]]
    fibres = dict(topo.fibres)
    for name in path.fibres:
        fibres[name] = dataclasses.replace(fibres[name], quantum_in_use=fibres[name].quantum_in_use | {path.channel})
    classical = max((sum(1 for c in topo.fibres[f].classical if c.band == profile.band) for f in path.fibres), default=0)
    switches = dict(topo.switches)
    for sw, pin, pout in path.hops:
        s = switches[sw]
        switches[sw] = dataclasses.replace(s, cross_connects=(*s.cross_connects, (min(pin, pout), max(pin, pout))))
    links = dict(topo.links)
    lid = f"qkdl-cv-{tx.lower()}-{rx.lower()}"
    links[lid] = QkdLink(lid, *t, *r, skr=round(secret_key_rate(profile, path.loss_db, classical, spans=len(path.fibres)), 3),
                         channel=path.channel, fibres=path.fibres)
    return topo.replace(fibres=fibres, switches=switches, links=links), lid, path
