"""The controller's optical view as an ONF TAPI v2.1.3 context (RFC 7951 JSON).

Orchestrators that speak TAPI (ONOS, TeraFlowSDN, transport SDN controllers) see the
QKD network as photonic media: every QKD module is a service-interface-point, every
SD-QKD node and every optical switch a topology node, every fibre a link, and every
direct quantum channel a connectivity service realised by one connection whose route
lists the switch ports it crosses. The context is written as RFC 7951 JSON named from the
schema (sdqkd.yangdata.Builder) and validated by libyang before it is served, so the
output is valid against our TAPI subset and therefore against the official modules
(tests check both with yanglint).

Conventions:
- DWDM channel numbers are on the ITU-T G.694.1 100 GHz grid, counted from 190.0 THz:
  channel n is centred on 190.0 THz + n * 0.1 THz (n = 31 -> 193.1 THz). TAPI states
  frequencies in MHz; a channel occupies its whole 100 GHz slot (centre +- 50 GHz).
- Every QKD interface is a PHOTONIC_MEDIA SIP with qualifier OTSi (the quantum signal is
  one optical tributary signal); only C-band interfaces with tunable channels carry an
  otsi-capability (their supportable central-frequency bands, one per contiguous run).
- An interface's node-edge-point is owned by its SD-QKD node; when it is patched into a
  switch port, a patch-cord link joins the two. Switch ports are node-edge-points of the
  switch node: the ports an interface or fibre is plugged into or a cross-connect uses (a
  free port says nothing; the switch node's "port-count" name gives the size). A fibre end
  not patched into a switch is a line node-edge-point of its SD-QKD node.
- Link cost is the loss in dB ("loss-db"; also "length-km"); latency is propagation at
  4.9 us/km (group index ~1.47); each fibre is its own shared-risk group; the plant is
  validated by inventory (the lab topology file), not by discovery.
- UUIDs are uuid5 of stable names (qkdn_id, qkdi_id, switch/fibre names, chan_id) in
  one namespace, so the same network always gives the same context.
"""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from collections.abc import Mapping

from sdqkd import yangdata
from sdqkd.yangdata import Builder

log = logging.getLogger(__name__)

TAPI_MODULES = ("tapi-common", "tapi-topology", "tapi-connectivity", "tapi-photonic-media")
UUID_NS = uuid.UUID("5d0c7a52-8e3b-4f0e-9b7a-7a2f1c0e51a1")

GRID_ORIGIN_MHZ = 190_000_000  # 190.0 THz
GRID_SPACING_MHZ = 100_000  # 100 GHz
US_PER_KM = 4.9

PM = "PHOTONIC_MEDIA"
_Q = "tapi-photonic-media:PHOTONIC_LAYER_QUALIFIER_"
OTSI, OTSIMC, OTS = _Q + "OTSi", _Q + "OTSiMC", _Q + "OTS"


TRANSMITTER, RECEIVER = "TRANSMITTER", "RECEIVER"


# What the context is built from: the controller's topology view (controller.topology.model)
# as seen from here, so that TAPI depends on no controller code (the controller imports us).
class NodeLike(Protocol):
    name: str
    domain: str | None
    up: bool


class QkdInterface(Protocol):
    node: str
    qkdi_id: int
    technology: str
    band: str
    roles: frozenset[str]
    channels: frozenset[int]
    switch: str | None
    port: int | None
    fixed_channel: int | None
    up: bool


class FibreEndLike(Protocol):
    node: str
    switch: str | None
    port: int | None
    mux_ports: tuple[tuple[int, frozenset[int]], ...]  # a fixed mux: (switch port, channels it passes)


def _end_ports(e: FibreEndLike) -> list[tuple[int | None, frozenset[int] | None]]:
    """The switch ports a fibre end lands on, with the channels each passes (None: any)."""
    return [(p, c) for p, c in e.mux_ports] if e.mux_ports else [(e.port, None)]


def _spans(a: FibreEndLike, b: FibreEndLike) -> list[tuple[int | None, int | None, str]]:
    """The port pairs a fibre joins: one, or one per channel set its two muxes share ('' or '34,37')."""
    out = []
    for pa, ca in _end_ports(a):
        for pb, cb in _end_ports(b):
            sets = [c for c in (ca, cb) if c is not None]
            chans = frozenset.intersection(*sets) if sets else None
            if chans is None or chans:
                out.append((pa, pb, ",".join(map(str, sorted(chans))) if chans else ""))
    return out


class FibreLike(Protocol):
    a: FibreEndLike
    b: FibreEndLike
    loss_db: float
    length_km: float


class SwitchLike(Protocol):
    name: str
    node: str
    ports: int
    insertion_loss: float
    cross_connects: tuple[tuple[int, int], ...]


class Topology(Protocol):
    nodes: Mapping[str, NodeLike]
    interfaces: Mapping[tuple[str, int], QkdInterface]
    fibres: Mapping[str, FibreLike]
    switches: Mapping[str, SwitchLike]

    def interfaces_of(self, qkdn_id: str) -> list[QkdInterface]: ...


class ChannelLike(Protocol):
    """A direct quantum channel: services.Channel or pathcomp's OpticalPath (no chan_id)."""

    tx: tuple[str, int]
    rx: tuple[str, int]
    channel: int | None
    fibres: Sequence[str]
    hops: Sequence[Sequence[Any]]  # (switch, port_in, port_out)


def channel_mhz(channel: int) -> int:
    """Central frequency of DWDM channel `channel`, in MHz (the module's grid convention)."""
    return GRID_ORIGIN_MHZ + channel * GRID_SPACING_MHZ


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(UUID_NS, "/".join(str(p) for p in parts)))


# --- small writers (YANG names) -------------------------------------------------------------


def _names(obj: Builder, names: dict[str, Any]) -> None:
    for key, value in names.items():
        if value is not None:
            obj.entry("name", {"value-name": key}, {"value": str(value)})


def _state(obj: Builder, up: bool, admin: bool = True) -> None:
    obj.set({"administrative-state": "UNLOCKED" if admin else None,
             "operational-state": "ENABLED" if up else "DISABLED", "lifecycle-state": "INSTALLED"})


def _constraint(obj: Builder) -> None:
    obj.child("frequency-constraint").set({"adjustment-granularity": "G_100GHZ", "grid-type": "DWDM"})


def _runs(channels: Iterable[int]) -> list[tuple[int, int]]:
    """Contiguous runs of channel numbers, as (first, last)."""
    out: list[tuple[int, int]] = []
    for c in sorted(set(channels)):
        if out and c == out[-1][1] + 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


def _direction(iface: QkdInterface) -> str:
    if iface.roles == {TRANSMITTER}:
        return "OUTPUT"
    if iface.roles == {RECEIVER}:
        return "INPUT"
    return "BIDIRECTIONAL"


# --- the mapping ------------------------------------------------------------------------


class _Builder:
    """One context: remembers which NEPs exist so connections only reference real ones."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.doc, self.ctx = Builder.top("tapi-common", "context")
        self.topo_uuid = _uuid("topology", "sdqkd")
        self.neps: dict[tuple[str, ...], tuple[Builder, str, str]] = {}  # key -> (nep, node uuid, nep uuid)

    def build(self, channels: Iterable[ChannelLike]) -> dict[str, Any]:
        self.ctx.set({"uuid": _uuid("context", "sdqkd")})
        _names(self.ctx, {"context-name": "sdqkd"})
        for key in sorted(self.topo.interfaces):
            self._sip(self.topo.interfaces[key])
        tc = self.ctx.child("topology-context")
        nts = tc.child("nw-topology-service").set({"uuid": _uuid("nw-topology-service", "sdqkd")})
        nts.entry("topology", {"topology-uuid": self.topo_uuid})
        _names(nts, {"nw-topology-service-name": "sdqkd"})
        topo = tc.entry("topology", {"uuid": self.topo_uuid}, {"layer-protocol-name": [PM]})
        _names(topo, {"topology-name": "sdqkd-optical"})
        channels = list(channels)
        self._nodes(topo, channels)
        self._links(topo)
        for ch in channels:
            self._channel(ch)
        return yangdata.validate_json(self.doc, config=False).json

    def _sip(self, iface: QkdInterface) -> None:
        node = self.topo.nodes[iface.node]
        sip = self.ctx.entry("service-interface-point", {"uuid": _uuid("sip", iface.node, iface.qkdi_id)}, {
            "layer-protocol-name": PM, "supported-layer-protocol-qualifier": [OTSI], "direction": _direction(iface)})
        _names(sip, {"sip-name": f"{node.name}:qkdi-{iface.qkdi_id}", "qkdn_id": iface.node,
                     "qkdi_id": iface.qkdi_id, "technology": iface.technology, "band": iface.band})
        _state(sip, node.up and iface.up)
        channels = iface.channels or ({iface.fixed_channel} if iface.fixed_channel is not None else set())
        if iface.band == "C-band" and channels:
            cap = sip.child("otsi-service-interface-point-spec/otsi-capability")
            for lo, hi in _runs(channels):
                band = cap.entry("supportable-central-frequency-spectrum-band",
                              {"lower-central-frequency": channel_mhz(lo), "upper-central-frequency": channel_mhz(hi)})
                _constraint(band)

    def _node(self, topo: Builder, key: str, names: dict[str, Any], up: bool, loss_db: float) -> Builder:
        node = topo.entry("node", {"uuid": _uuid("node", key)}, {"layer-protocol-name": [PM]})
        _names(node, names)
        _state(node, up)
        node.entry("cost-characteristic", {"cost-name": "insertion-loss-db"}, {"cost-value": f"{loss_db:g}"})
        node.entry("latency-characteristic", {"traffic-property-name": "fixed"}, {"fixed-latency-characteristic": "0us"})
        return node

    def _nep(self, node: Builder, key: tuple[str, ...], name: str, qualifier: str, direction: str, up: bool,
             sip: str | None = None) -> None:
        nep_uuid = _uuid("nep", *key)
        nep = node.entry("owned-node-edge-point", {"uuid": nep_uuid}, {
            "layer-protocol-name": PM, "supported-cep-layer-protocol-qualifier": [qualifier], "link-port-direction": direction})
        _names(nep, {"nep-name": name})
        _state(nep, up)
        if sip is not None:
            nep.entry("mapped-service-interface-point", {"service-interface-point-uuid": sip})
        self.neps[key] = (nep, str(node.obj["uuid"]), nep_uuid)

    def _used_ports(self, channels: Sequence[ChannelLike]) -> dict[str, set[int]]:
        """Switch ports something is plugged into (an interface, a fibre), cross-connected, or
        crossed by a channel (the switch may not have reported its cross-connect yet)."""
        t = self.topo
        used: dict[str, set[int]] = {}
        plugs = [(i.switch, i.port) for i in t.interfaces.values()]
        plugs += [(e.switch, p) for f in t.fibres.values() for e in (f.a, f.b) for p, _ in _end_ports(e)]
        plugs += [(s.name, p) for s in t.switches.values() for pair in s.cross_connects for p in pair]
        plugs += [(str(h[0]), int(p)) for ch in channels for h in ch.hops for p in h[1:]]
        for sw, port in plugs:
            if sw in t.switches and port is not None and 1 <= port <= t.switches[sw].ports:
                used.setdefault(sw, set()).add(port)
        return used

    def _nodes(self, topo: Builder, channels: Sequence[ChannelLike]) -> None:
        t = self.topo
        used = self._used_ports(channels)
        for qid in sorted(t.nodes):
            n = t.nodes[qid]
            node = self._node(topo, qid, {"node-name": n.name, "qkdn_id": qid, "domain": n.domain}, n.up, 0.0)
            for iface in t.interfaces_of(qid):
                self._nep(node, ("qkdi", qid, str(iface.qkdi_id)), f"{n.name}:qkdi-{iface.qkdi_id}", OTSI,
                          _direction(iface), n.up and iface.up, _uuid("sip", qid, iface.qkdi_id))
            for fname in sorted(t.fibres):
                f = t.fibres[fname]
                for side, end in (("a", f.a), ("b", f.b)):
                    if end.node == qid and end.switch is None:
                        self._nep(node, ("line", fname, side), f"{n.name}:{fname}", OTS, "BIDIRECTIONAL", n.up)
        for sname in sorted(t.switches):
            sw = t.switches[sname]
            owner = t.nodes.get(sw.node)
            up = owner.up if owner else False
            node = self._node(topo, f"switch/{sname}", {"node-name": sname, "qkdn_id": sw.node, "port-count": sw.ports},
                              up, sw.insertion_loss)
            for port in sorted(used.get(sname, ())):
                self._nep(node, ("port", sname, str(port)), f"{sname}:{port}", OTSIMC, "BIDIRECTIONAL", up)

    def _link(self, topo: Builder, key: str, name: str, ends: tuple[tuple[str, ...], tuple[str, ...]],
              loss_db: float, length_km: float, risk: tuple[str, str], up: bool) -> None:
        if any(end not in self.neps for end in ends):  # e.g. a fibre to a node without an agent
            log.warning("link %s left out of the TAPI context: an end is not in the topology", name)
            return
        link = topo.entry("link", {"uuid": _uuid("link", key)}, {
            "layer-protocol-name": [PM], "direction": "BIDIRECTIONAL",
            "transitioned-layer-protocol-name": [PM, "PHOTONIC_MEDIA_OTS"], "loss-characteristic": f"{loss_db:g}dB"})
        _names(link, {"link-name": name})
        _state(link, up)
        for end in ends:
            _, node_uuid, nep_uuid = self.neps[end]
            link.entry("node-edge-point", {"topology-uuid": self.topo_uuid, "node-uuid": node_uuid,
                                              "node-edge-point-uuid": nep_uuid})
        link.entry("cost-characteristic", {"cost-name": "loss-db"}, {"cost-value": f"{loss_db:g}"})
        link.entry("cost-characteristic", {"cost-name": "length-km"}, {"cost-value": f"{length_km:g}"})
        link.entry("latency-characteristic", {"traffic-property-name": "propagation"},
               {"fixed-latency-characteristic": f"{length_km * US_PER_KM:g}us"})
        link.entry("risk-characteristic", {"risk-characteristic-name": risk[0]}, {"risk-identifier-list": [risk[1]]})
        link.entry("validation-mechanism", {"validation-mechanism": "inventory"},
               {"layer-protocol-adjacency-validated": "not validated: from the lab topology file"})

    def _links(self, topo: Builder) -> None:
        t = self.topo
        for fname in sorted(t.fibres):
            f = t.fibres[fname]
            up = all(t.nodes[e.node].up for e in (f.a, f.b) if e.node in t.nodes)
            for pa, pb, chans in _spans(f.a, f.b):  # a fibre behind fixed muxes: one link per passband
                ends = tuple(("port", e.switch, str(p)) if e.switch is not None else ("line", fname, side)
                             for side, e, p in (("a", f.a, pa), ("b", f.b, pb)))
                name = f"{fname}:{chans}" if chans and f.a.mux_ports else fname
                self._link(topo, f"fibre/{name}", name, ends, f.loss_db, f.length_km, ("fibre-span", fname), up)  # type: ignore[arg-type]
        for key in sorted(t.interfaces):
            i = t.interfaces[key]
            if i.switch is not None:
                ends = (("qkdi", i.node, str(i.qkdi_id)), ("port", i.switch, str(i.port)))
                self._link(topo, f"patch/{i.node}/{i.qkdi_id}", f"patch {t.nodes[i.node].name}:qkdi-{i.qkdi_id}",
                           ends, 0.0, 0.0, ("patch-cord", f"{i.switch}:{i.port}"), i.up)

    # --- direct quantum channels ----------------------------------------------------------

    def _cep(self, nep_key: tuple[str, ...], chan: str, channel: int | None, termination: bool) -> dict[str, str]:
        nep, node_uuid, nep_uuid = self.neps[nep_key]
        cep_uuid = _uuid("cep", chan, *nep_key)
        cep = nep.child("cep-list").entry("connection-end-point", {"uuid": cep_uuid}, {
            "layer-protocol-name": PM, "layer-protocol-qualifier": OTSI if termination else OTSIMC,
            "operational-state": "ENABLED", "lifecycle-state": "INSTALLED"})
        cep.child("parent-node-edge-point").set({"topology-uuid": self.topo_uuid, "node-uuid": node_uuid,
                                                    "node-edge-point-uuid": nep_uuid})
        if channel is not None and termination:
            sel = cep.child("otsi-connection-end-point-spec/otsi-termination/selected-central-frequency")
            sel.set({"central-frequency": channel_mhz(channel)})
            _constraint(sel)
        elif channel is not None:
            occ = cep.child("media-channel-connection-end-point-spec/media-channel/occupied-spectrum")
            occ.set({"lower-frequency": channel_mhz(channel) - GRID_SPACING_MHZ // 2,
                       "upper-frequency": channel_mhz(channel) + GRID_SPACING_MHZ // 2})
            _constraint(occ)
        return {"topology-uuid": self.topo_uuid, "node-uuid": node_uuid, "node-edge-point-uuid": nep_uuid,
                "connection-end-point-uuid": cep_uuid}

    def _channel(self, ch: ChannelLike) -> None:
        (txn, txi), (rxn, rxi) = ch.tx, ch.rx
        nm = {q: n.name for q, n in self.topo.nodes.items()}
        chan = getattr(ch, "chan_id", None) or f"{nm.get(txn, txn)}:qkdi-{txi}->{nm.get(rxn, rxn)}:qkdi-{rxi}"
        tx_key, rx_key = ("qkdi", txn, str(txi)), ("qkdi", rxn, str(rxi))
        hop_keys = [(("port", str(sw), str(pin)), ("port", str(sw), str(pout))) for sw, pin, pout in ch.hops]
        missing = [k for k in (tx_key, rx_key, *(k for pair in hop_keys for k in pair)) if k not in self.neps]
        if missing:
            log.warning("channel %s left out of the TAPI context: %s not in the topology", chan, missing)
            return
        conn_uuid = _uuid("connection", chan)
        up = all(self.topo.interfaces[(n, i)].up for n, i in (ch.tx, ch.rx))
        route = [self._cep(tx_key, chan, ch.channel, True)]
        for pin, pout in hop_keys:
            route += [self._cep(pin, chan, ch.channel, False), self._cep(pout, chan, ch.channel, False)]
        route.append(self._cep(rx_key, chan, ch.channel, True))

        cc = self.ctx.child("connectivity-context")
        svc = cc.entry("connectivity-service", {"uuid": _uuid("connectivity-service", chan)}, {
            "service-layer": PM, "service-type": "POINT_TO_POINT_CONNECTIVITY", "connectivity-direction": "UNIDIRECTIONAL"})
        _names(svc, {"service-name": chan, "channel": ch.channel, "loss-db": f"{getattr(ch, 'loss_db', 0.0):g}"})
        _state(svc, up)
        for local_id, (node, qkdi), direction in (("tx", ch.tx, "OUTPUT"), ("rx", ch.rx, "INPUT")):
            ep = svc.entry("end-point", {"local-id": local_id}, {
                "layer-protocol-name": PM, "layer-protocol-qualifier": OTSI, "direction": direction, "role": "SYMMETRIC"})
            ep.child("service-interface-point").set({"service-interface-point-uuid": _uuid("sip", node, qkdi)})
            _state(ep, up)
            if ch.channel is not None:
                cfg = ep.child("otsi-connectivity-service-end-point-spec/otsi-config")
                cf = cfg.child("central-frequency").set({"central-frequency": channel_mhz(ch.channel)})
                _constraint(cf)
                cfg.child("spectrum").set({"lower-frequency": channel_mhz(ch.channel) - GRID_SPACING_MHZ // 2,
                                              "upper-frequency": channel_mhz(ch.channel) + GRID_SPACING_MHZ // 2})
        svc.entry("connection", {"connection-uuid": conn_uuid})

        conn = cc.entry("connection", {"uuid": conn_uuid}, {"layer-protocol-name": PM, "direction": "UNIDIRECTIONAL"})
        _names(conn, {"connection-name": chan, "fibres": ",".join(ch.fibres)})
        _state(conn, up, admin=False)
        for ref in (route[0], route[-1]):
            conn.entry("connection-end-point", ref)
        r = conn.entry("route", {"local-id": "main"})
        for ref in route:
            r.entry("connection-end-point", ref)


def to_tapi(topo: Topology, channels: Iterable[ChannelLike] = ()) -> dict[str, Any]:
    """`topo` (and the direct quantum channels set up over it) as a TAPI context, RFC 7951 JSON.

    A channel whose interfaces or switch ports are not in `topo` (say, its node's agent is
    unreachable) is left out, with a warning: TAPI references must resolve."""
    return json.loads(to_tapi_text(topo, channels))


def to_tapi_text(topo: Topology, channels: Iterable[ChannelLike] = ()) -> str:
    """to_tapi() as the JSON text (what the northbound sends)."""
    return json.dumps(_Builder(topo).build(list(channels)))
