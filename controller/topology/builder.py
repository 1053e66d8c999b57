"""The controller's Topology snapshot, from what the agents report (nodes, QKD
interfaces, PHYS links with SKR/QBER, switch cross-connects) and the optical plant
inventory that NETCONF does not carry (fibres, their loss and classical channels,
how they are patched into switches), read from the lab topology file.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lxml import etree

from sdqkd.controller.southbound.agent import NSMAP, ident, qkd_node, text
from sdqkd.qkdprofile import QkdProfile, resolved_profile
from sdqkd.controller.topology.model import (
    ClassicalChannel,
    KeyStock,
    Fibre,
    FibreEnd,
    Node,
    QkdInterface,
    QkdLink,
    Switch,
    Topology,
)


def key_stock(node: str, lk: etree._Element) -> KeyStock | None:
    """One end's sdqkd-key-stock key-stock of a qkd_link, if its agent reports one."""
    ks = lk.find("ks:key-stock", NSMAP)
    if ks is None:
        return None

    def num(name: str) -> int:
        return int(ks.findtext(f"ks:{name}", "0", NSMAP) or 0)

    return KeyStock(node, num("stored-keys"), num("stored-bits"), num("local-keys"), num("key-size"), num("limit-keys"))


def _channels(rng: str | None) -> frozenset[int]:
    out: set[int] = set()
    for part in (rng or "").split(","):
        if not part.strip():
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


class Inventory:
    """The optical plant and lab facts from the sdqkd-lab topology (may be empty)."""

    def __init__(self, lab: dict[str, Any] | None) -> None:
        lab = (lab or {}).get("sdqkd-lab:lab", lab or {})
        self.lab = lab
        self.profiles = {p["name"]: p for p in lab.get("profile", [])}
        self._resolved: dict[tuple[str, int], QkdProfile | None] = {}
        self.node_names = {n["name"] for n in lab.get("node", [])}
        self.ifaces: dict[tuple[str, int], dict[str, Any]] = {}
        for n in lab.get("node", []):
            for i in n.get("qkd-interface", []):
                self.ifaces[(n["name"], int(i["id"]))] = i
        self.kms = {n["name"]: bool(n.get("kms", True)) for n in lab.get("node", [])}
        # a fixed link's modules are plugged into its fibres, whether the link is set up yet or not
        self.plugged: dict[tuple[str, int], tuple[str, ...]] = {}
        for lk in lab.get("link", []):
            for ep in lk.get("endpoints", []):
                node, _, qkdi = str(ep).rpartition(":")
                self.plugged[(node, int(qkdi))] = self.plugged.get((node, int(qkdi)), ()) + tuple(lk.get("path", ()))

    def band(self, node: str, qkdi: int) -> str | None:
        i = self.ifaces.get((node, qkdi))
        p = self.profiles.get(i["profile"]) if i else None
        return p.get("band") if p else None

    def profile(self, node: str, qkdi: int) -> QkdProfile | None:
        """The calibrated profile of a module (by node name), or None when the inventory has none."""
        if (node, qkdi) not in self._resolved:  # the lab does not change: resolved once per module
            i = self.ifaces.get((node, qkdi))
            got = None
            if i is not None and i.get("profile") in self.profiles:
                try:  # as the lab resolved it for the agent: the dry run's rate is the one the link will make
                    got = resolved_profile(self.lab, node, qkdi, i["profile"])
                except (ValueError, TypeError):
                    got = None
            self._resolved[(node, qkdi)] = got
        return self._resolved[(node, qkdi)]

    def fixed_channel(self, node: str, qkdi: int) -> int | None:
        i = self.ifaces.get((node, qkdi))
        return int(i["channel"]) if i and i.get("channel") is not None else None

    def fibres(self, ids: dict[str, str], in_use: dict[str, set[int]]) -> dict[str, Fibre]:
        out = {}
        for f in self.lab.get("fibre", []):
            def end(e: dict[str, Any]) -> FibreEnd:
                return FibreEnd(ids.get(e["node"], e["node"]), e.get("switch"),
                                int(e["port"]) if e.get("port") is not None else None,
                                tuple((int(m["port"]), frozenset(int(c) for c in m.get("channel", [])))
                                      for m in e.get("mux-port", [])))

            out[f["name"]] = Fibre(
                name=f["name"],
                a=end(f["a-end"]),
                b=end(f["b-end"]),
                loss_db=float(f["loss"]),
                length_km=float(f.get("length", 0)),
                classical=tuple(
                    ClassicalChannel(int(c["channel"]) if c.get("channel") is not None else None, c.get("band", "C-band"))
                    for c in f.get("classical-channel", [])
                ),
                mux_channels=frozenset(int(c) for c in f.get("mux-channel", [])),
                quantum_in_use=frozenset(in_use.get(f["name"], set())),
            )
        return out

    def switches(self, ids: dict[str, str]) -> dict[str, dict[str, Any]]:
        return {s["name"]: {**s, "qkdn_id": ids.get(s["node"], s["node"])} for s in self.lab.get("switch", [])}


def build(agents: Iterable[tuple[str, str, str | None, bool, etree._Element | None]], inv: Inventory,
          in_use: dict[str, set[int]] | None = None) -> Topology:
    """agents: (name, qkdn_id, domain, connected, last <data>) for every configured agent."""
    agents = list(agents)
    ids = {name: qid for name, qid, _, _, _ in agents}
    nodes, ifaces, links, switches = {}, {}, {}, {}
    inv_switches = inv.switches(ids)
    link_views: dict[str, list[dict[str, Any]]] = {}
    for name, qid, domain, up, data in agents:
        qrng = data.findtext("qr:qrng/qr:state", namespaces=NSMAP) if data is not None else None
        nodes[qid] = Node(qid, name, domain, inv.kms.get(name, True), up, qrng if up else None)
        node = qkd_node(data)
        for i in node.findall("q:qkd_interfaces/q:qkd_interface", NSMAP) if node is not None else []:
            qkdi = int(text(i, "q:qkdi_id") or 0)
            roles = ident(text(i, "q:qkdi_capabilities/q:role_support")) or "TRANSCEIVER"
            rng = text(i, "q:qkdi_capabilities/q:wavelength_range")
            band = inv.band(name, qkdi) or ("C-band" if rng else "O-band")
            ifaces[(qid, qkdi)] = QkdInterface(
                node=qid,
                qkdi_id=qkdi,
                technology=ident(text(i, "q:qkdi_type")) or "DV-QKD",
                band=band,
                roles=frozenset({"TRANSMITTER", "RECEIVER"} if roles == "TRANSCEIVER" else {roles}),
                channels=_channels(rng),
                max_absorption=float(text(i, "q:qkdi_capabilities/q:max_absorption") or 0.0),
                switch=text(i, "q:qkdi_att_point/q:device"),
                port=int(text(i, "q:qkdi_att_point/q:port")) if text(i, "q:qkdi_att_point/q:port") else None,
                fixed_channel=inv.fixed_channel(name, qkdi),
                plugged=inv.plugged.get((name, qkdi), ()),
                up=up and (ident(text(i, "q:qkdi_status")) or "ENABLED") == "ENABLED",
            )
        for lk in node.findall("q:qkd_links/q:qkd_link", NSMAP) if node is not None else []:
            if ident(text(lk, "q:qkdl_type")) != "PHYS":
                continue
            qv = next((p for p in lk.findall("q:qkdl_performance/q:phys_perf", NSMAP) if ident(text(p, "q:perf_type")) == "QBER"), None)
            link_views.setdefault((text(lk, "q:qkdl_id") or "").lower(), []).append({
                "node": qid,
                "qkdi": int(text(lk, "q:qkdl_local/q:qkdi_id") or 0),
                "remote": (text(lk, "q:qkdl_remote/q:qkdn_id") or "").lower(),
                "remote_qkdi": int(text(lk, "q:qkdl_remote/q:qkdi_id") or 0),
                "status": ident(text(lk, "q:qkdl_status")) or "OFF",
                "skr": float(text(lk, "q:qkdl_performance/q:skr") or 0),
                "qber": float(text(qv, "q:value")) if qv is not None and text(qv, "q:value") else None,
                "channel": int(text(lk, "q:phys_wavelength")) if text(lk, "q:phys_wavelength") else None,
                "up": up,
                "stock": key_stock(qid, lk) if up else None,
            })
        for sw in data.findall("o:optical-switches/o:switch", NSMAP) if data is not None else []:
            sname = text(sw, "o:name") or ""
            xcs = tuple(sorted((int(text(x, "o:port-a") or 0), int(text(x, "o:port-b") or 0)) for x in sw.findall("o:cross-connect", NSMAP)))
            inv_sw = inv_switches.get(sname, {})
            switches[sname] = Switch(
                name=sname,
                node=qid,
                ports=int(text(sw, "o:port-count") or inv_sw.get("ports", 0)),
                insertion_loss=float(text(sw, "o:insertion-loss") or inv_sw.get("insertion-loss", 1.0)),
                cross_connects=xcs,
            )
    for sname, s in inv_switches.items():
        if sname not in switches:
            switches[sname] = Switch(sname, s["qkdn_id"], int(s["ports"]), float(s.get("insertion-loss", 1.0)))
    for lid, views in link_views.items():
        a = min(views, key=lambda v: v["node"])
        others = [v for v in views if v is not a]
        both_active = all(v["status"] == "ACTIVE" and v["up"] for v in views) and len(views) == 2
        status = "ACTIVE" if both_active else (a["status"] if a["status"] != "ACTIVE" else "PENDING")
        skr = min(v["skr"] for v in views) if both_active else 0.0
        qbers = [v["qber"] for v in views if v["qber"] is not None]
        stock = tuple(sorted((v["stock"] for v in views if v["stock"] is not None), key=lambda st: st.node))
        links[lid] = QkdLink(
            qkdl_id=lid,
            a=a["node"],
            a_if=a["qkdi"],
            b=a["remote"] if not others else others[0]["node"],
            b_if=a["remote_qkdi"] if not others else others[0]["qkdi"],
            status=status,
            skr=skr,
            qber=max(qbers) if qbers else None,
            channel=a["channel"],
            key_bits=min(st.bits for st in stock) if stock else 0,
            stock=stock,
        )
    return Topology(nodes=nodes, interfaces=ifaces, links=links, fibres=inv.fibres(ids, in_use or {}), switches=switches)
