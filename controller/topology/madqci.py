"""The MadQCI network (shared/reference/madqci.md) as a topology snapshot, for tests and the lab.

Nine nodes in two operator domains (RM, TID) joined by the Quevedo-Norte border link;
eight DV links on fixed fibres (ID Quantique, Toshiba) with the measured key rates; and the
switched co-located domain: ten Huawei CV modules (5 Tx, 5 Rx) behind fibre switches,
with fixed muxes on channels 34, 37 and 38.

Figures from the reference: nodes, domains, lengths, losses, rates, classical channel
counts, the 23 dB CV budget, the mux channels. Assumed, because the reference does not
give them (change them here if better data comes):
- names without accents (Quintin, Quiron, Concepcion), as lab identifiers;
- where the CV modules sit. Per-direction measurements on links 3 and 4 put a Tx and an
  Rx at Quijote, Quevedo and Norte. The two Quijote-Quiron links (11.8/12.1 dB) put a Tx
  and an Rx at Quiron. That leaves one Tx at Concepcion and one Rx at Distrito
  ("link6+link7" runs Concepcion -> Norte -> Distrito);
- switches only at those six CV sites (the reference says seven but names six), 8 ports,
  1.0 dB insertion loss;
- the CV losses in the table include the switches at both ends, so a CV fibre's loss is the
  table figure minus 2 dB. This reproduces the switched rows: "Distrito-Concepcion, co-loc,
  20.1 dB" is Concepcion -> Norte -> Distrito, 9.1 + 8.2 + 3 x 1.0 = 20.3 dB here;
- there is no direct Distrito-Concepcion CV fibre (see the previous point);
- classical channel numbers (even channels from 20 up, clear of 33-39), O-band for ID
  Quantique links whose band the table leaves open, DV budgets from agents/drivers/profile.py.
"""
from __future__ import annotations

import dataclasses
import uuid

from sdqkd.controller.topology.model import (
    RECEIVER,
    TRANSMITTER,
    ClassicalChannel,
    Fibre,
    FibreEnd,
    Node,
    QkdInterface,
    QkdLink,
    Switch,
    Topology,
)

_NS = uuid.UUID("6d1f3a52-8c0e-4b7a-9e21-3f5c7a9b1d04")
RM = ("Quintin", "Quijote", "Quiron", "Quevedo", "Quijano", "Quinto")
TID = ("Norte", "Concepcion", "Distrito")
CV_MUX = frozenset({34, 37, 38})
CV_BUDGET_DB = 23.0
CV_CHANNELS = frozenset(range(1, 97))
SWITCH_LOSS_DB = 1.0
SWITCH_PORTS = 8

IDQ, TOSHIBA, HUAWEI = "DV-QKD-COW", "DV-QKD", "CV-QKD"
_BUDGET = {IDQ: 18.0, TOSHIBA: 24.0}

# (a = Tx, b = Rx, km, loss dB, technology, band, fixed channel, key rate kbit/s, classical channels)
DV_LINKS = (
    ("Quintin", "Quijote", 24.1, 7.47, IDQ, "C-band", 34, 1.95, 6),
    ("Quijote", "Quevedo", 7.8, 4.00, IDQ, "O-band", None, 2.04, 5),
    ("Quevedo", "Quijano", 33.1, 11.80, TOSHIBA, "O-band", None, 37.21, 5),
    ("Quijano", "Quinto", 1.9, 2.0, TOSHIBA, "O-band", None, 2857.12, 5),
    ("Distrito", "Norte", 15.0, 8.30, IDQ, "O-band", None, 1.47, 3),
    ("Distrito", "Concepcion", 15.3, 14.3, TOSHIBA, "O-band", None, 242.33, 4),
    ("Concepcion", "Norte", 8.1, 2.9, TOSHIBA, "O-band", None, 1039.98, 6),
    ("Quevedo", "Norte", 3.9, 3.0, IDQ, "O-band", None, 1.38, 4),  # the border link
)
# CV fibres: (name, a, b, km, loss in the table incl. both switches, classical channels)
CV_FIBRES = (
    ("cv-quijote-quiron-1", "Quijote", "Quiron", 24.5, 11.8, 4),
    ("cv-quijote-quiron-2", "Quijote", "Quiron", 24.5, 12.1, 4),
    ("cv-quijote-quevedo", "Quijote", "Quevedo", 7.8, 4.8, 0),
    ("cv-quevedo-norte", "Quevedo", "Norte", 3.9, 4.3, 0),
    ("cv-norte-distrito", "Norte", "Distrito", 15.0, 10.2, 0),
    ("cv-norte-concepcion", "Norte", "Concepcion", 8.1, 11.1, 0),
)
# CV modules per site: (Tx, Rx)
CV_SITES = {
    "Quiron": (True, True), "Quijote": (True, True), "Quevedo": (True, True),
    "Norte": (True, True), "Concepcion": (True, False), "Distrito": (False, True),
}
# CV links in service (default): (Tx site, Rx site, fibres, channel, key rate kbit/s).
# Ten modules and six fibres allow at most four at once (one switch port per fibre end).
CV_IN_SERVICE = (
    ("Quiron", "Quijote", ("cv-quijote-quiron-1",), 37, 6.2),
    ("Quijote", "Quiron", ("cv-quijote-quiron-2",), 37, 3.3),
    ("Quevedo", "Norte", ("cv-quevedo-norte",), 38, 12.0),
    ("Norte", "Distrito", ("cv-norte-distrito",), 37, 8.4),
)


def qkdn_id(name: str) -> str:
    """The fixed qkdn_id of a MadQCI node."""
    return str(uuid.uuid5(_NS, f"madqci/{name}"))


def cv_tx(site: str) -> tuple[str, int]:
    """The (qkdn_id, qkdi_id) of the CV transmitter at a site."""
    return (qkdn_id(site), 1)


def cv_rx(site: str) -> tuple[str, int]:
    """The (qkdn_id, qkdi_id) of the CV receiver at a site."""
    return (qkdn_id(site), 2)


def _classical(count: int) -> tuple[ClassicalChannel, ...]:
    return tuple(ClassicalChannel(20 + 2 * i) for i in range(count))


def topology(cv_in_service: bool = True) -> Topology:
    """MadQCI. cv_in_service=False: CV modules idle and switches clear (to count what
    switching can reach); True: the four CV links of CV_IN_SERVICE are up and hold their ports."""
    nodes = [Node(qkdn_id(n), n, "RM") for n in RM] + [Node(qkdn_id(n), n, "TID") for n in TID]
    interfaces: list[QkdInterface] = []
    switches: dict[str, Switch] = {}
    ports: dict[tuple[str, str], int] = {}  # (site, what) -> port of the site's switch

    for site, (tx, rx) in CV_SITES.items():
        sw = f"sw-{site.lower()}"
        switches[site] = Switch(sw, qkdn_id(site), SWITCH_PORTS, SWITCH_LOSS_DB)
        for qkdi, role, has in ((1, TRANSMITTER, tx), (2, RECEIVER, rx)):
            if has:
                ports[(site, role)] = qkdi
                interfaces.append(QkdInterface(qkdn_id(site), qkdi, HUAWEI, "C-band", {role}, CV_CHANNELS,
                                               CV_BUDGET_DB, switch=sw, port=qkdi))
    fibres: list[Fibre] = []
    for name, a, b, km, loss, classical in CV_FIBRES:
        ends = []
        for site in (a, b):
            port = 3 + sum(1 for key in ports if key[0] == site and key[1].startswith("cv-"))
            ports[(site, name)] = port
            ends.append(FibreEnd(qkdn_id(site), switches[site].name, port))
        fibres.append(Fibre(name, ends[0], ends[1], round(loss - 2 * SWITCH_LOSS_DB, 3), km,
                            _classical(classical), CV_MUX))

    next_if = {n.qkdn_id: 3 for n in nodes}
    links: list[QkdLink] = []
    for a, b, km, loss, tech, band, channel, kbps, classical in DV_LINKS:
        fname = f"dv-{a.lower()}-{b.lower()}"
        fibres.append(Fibre(fname, FibreEnd(qkdn_id(a)), FibreEnd(qkdn_id(b)), loss, km, _classical(classical)))
        ids = []
        for site, role in ((a, TRANSMITTER), (b, RECEIVER)):
            nid = qkdn_id(site)
            ids.append(next_if[nid])
            chans = frozenset({channel}) if channel is not None else frozenset()
            interfaces.append(QkdInterface(nid, next_if[nid], tech, band, {role}, chans, _BUDGET[tech],
                                           fixed_channel=channel))
            next_if[nid] += 1
        links.append(QkdLink(f"qkdl-{a.lower()}-{b.lower()}", qkdn_id(a), ids[0], qkdn_id(b), ids[1],
                             skr=kbps * 1000, channel=channel, fibres=(fname,)))

    if cv_in_service:
        _put_cv_in_service(links, fibres, switches, ports)
    return Topology.build(nodes, interfaces, links, fibres, switches.values())


def _put_cv_in_service(links: list[QkdLink], fibres: list[Fibre], switches: dict[str, Switch],
                       ports: dict[tuple[str, str], int]) -> None:
    """Add the CV links, their cross-connects and their channels on the fibres."""
    by_name = {f.name: i for i, f in enumerate(fibres)}
    xcs: dict[str, list[tuple[int, int]]] = {site: [] for site in switches}
    for tx, rx, path, channel, kbps in CV_IN_SERVICE:
        at, port = tx, ports[(tx, TRANSMITTER)]
        for name in path:
            a, b = next((f[1], f[2]) for f in CV_FIBRES if f[0] == name)
            far = b if at == a else a
            xcs[at].append((port, ports[(at, name)]))
            at, port = far, ports[(far, name)]
            i = by_name[name]
            fibres[i] = dataclasses.replace(fibres[i], quantum_in_use=fibres[i].quantum_in_use | {channel})
        xcs[at].append((port, ports[(rx, RECEIVER)]))
        links.append(QkdLink(f"qkdl-cv-{tx.lower()}-{rx.lower()}", *cv_tx(tx), *cv_rx(rx), skr=kbps * 1000,
                             channel=channel, fibres=path))
    for site, pairs in xcs.items():
        sw = switches[site]
        switches[site] = Switch(sw.name, sw.node, sw.ports, sw.insertion_loss, tuple(pairs))
