"""The edits the controller makes on an agent, one small class each. Each states its
content as RFC 7951 JSON and writes it as XML beside the compiled schema
(yangcodec.json_to_xml: names, namespaces, order and identity prefixes from the
schema, never by string templates), and says which capabilities the agent must have;
provisioning only orders and sends them. Building pyangbind objects here cost ~10 ms
an edit on the provisioning path; the agent type-checks every value anyway.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

from lxml import etree

from sdqkd import yangcodec, yangschema

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
ETSI_NS = "urn:etsi:qkd:yang:etsi-qkd-node"
CANDIDATE = "urn:ietf:params:netconf:capability:candidate:1.0"
CONFIRMED = "urn:ietf:params:netconf:capability:confirmed-commit:1.1"


def _etsi() -> yangschema.Schema:
    return yangschema.load("etsi-qkd-sdn-node")


def _osw() -> yangschema.Schema:
    return yangschema.load("sdqkd-optical-switch")


class Edit:
    """One change on one agent."""

    DEPENDS: ClassVar[tuple[str, ...]] = (CANDIDATE, CONFIRMED)
    delete: bool = False

    def elements(self) -> list[etree._Element]:
        raise NotImplementedError


def _mark_delete(top: etree._Element, entry_tag: str) -> None:
    for el in top.iter(entry_tag):
        el.set(f"{{{NC_NS}}}operation", "remove")
        for child in list(el)[1:]:  # only the key stays
            el.remove(child)


@dataclass
class LinkEdit(Edit):
    """A qkd_link entry: PHYS (a QKD module pair) or VIRT (a relayed key path)."""

    qkdl_id: str
    kind: str  # PHYS | VIRT
    local: str
    remote: str
    local_qkdi: int | None = None
    remote_qkdi: int | None = None
    enable: bool = True
    prev_hop: str | None = None
    next_hops: tuple[str, ...] = ()
    bandwidth: int | None = None
    role: str | None = None  # PHYS: TRANSMITTER | RECEIVER
    channel: int | None = None
    attenuation: float | None = None
    delete: bool = False

    def elements(self) -> list[etree._Element]:
        lk: dict[str, Any] = {"qkdl_id": self.qkdl_id}
        if not self.delete:
            lk["qkdl_type"] = f"etsi-qkd-node-types:{self.kind}"
            lk["qkdl_enable"] = self.enable
            lk["qkdl_local"] = {"qkdn_id": self.local}
            lk["qkdl_remote"] = {"qkdn_id": self.remote}
            if self.local_qkdi is not None:
                lk["qkdl_local"]["qkdi_id"] = self.local_qkdi
            if self.remote_qkdi is not None:
                lk["qkdl_remote"]["qkdi_id"] = self.remote_qkdi
            if self.prev_hop:
                lk["virt_prev_hop"] = self.prev_hop
            if self.next_hops:
                lk["virt_next_hop"] = list(self.next_hops)
            if self.bandwidth is not None:
                lk["virt_bandwidth"] = self.bandwidth
            if self.role:
                lk["phys_qkd_role"] = f"etsi-qkd-node-types:{self.role}"
            if self.channel is not None:
                lk["phys_wavelength"] = str(self.channel)
            if self.attenuation is not None:
                lk["phys_channel_att"] = Decimal(str(round(self.attenuation, 3)))
        els = yangcodec.json_to_xml({"etsi-qkd-sdn-node:qkd_node": {"qkd_links": {"qkd_link": [lk]}}}, _etsi())
        if self.delete:
            _mark_delete(els[0], f"{{{ETSI_NS}}}qkd_link")
        return els


@dataclass
class AppEdit(Edit):
    """A qkd_app entry: the SAE pair, its QoS and the links that back it."""

    app_id: str
    server: str = ""
    clients: tuple[str, ...] = ()
    backing: tuple[str, ...] = ()
    local: str | None = None
    remote: str | None = None
    priority: int | None = None
    min_bps: int | None = None
    max_bps: int | None = None
    ttl: int | None = None
    delete: bool = False

    def elements(self) -> list[etree._Element]:
        app: dict[str, Any] = {"app_id": self.app_id}
        if not self.delete:
            app["app_type"] = "etsi-qkd-node-types:CLIENT"
            app["server_app_id"] = self.server
            if self.clients:
                app["client_app_id"] = list(self.clients)
            if self.backing:
                app["backing_qkdl_id"] = list(self.backing)
            if self.local:
                app["local_qkdn_id"] = self.local
            if self.remote:
                app["remote_qkdn_id"] = self.remote
            if self.priority is not None:
                app["app_priority"] = self.priority
            qos = {k: v for k, v in (("min_bandwidth", self.min_bps), ("max_bandwidth", self.max_bps), ("ttl", self.ttl)) if v is not None}
            if qos:
                app["app_qos"] = qos
        els = yangcodec.json_to_xml({"etsi-qkd-sdn-node:qkd_node": {"qkd_applications": {"qkd_app": [app]}}}, _etsi())
        if self.delete:
            _mark_delete(els[0], f"{{{ETSI_NS}}}qkd_app")
        else:
            # The entry is stated whole: a reroute must replace backing_qkdl_id, not add to it.
            for el in els[0].iter(f"{{{ETSI_NS}}}qkd_app"):
                el.set(f"{{{NC_NS}}}operation", "replace")
        return els


@dataclass
class CrossConnectEdit(Edit):
    switch: str
    port_a: int
    port_b: int = 0
    delete: bool = False

    def elements(self) -> list[etree._Element]:
        xc: dict[str, Any] = {"port-a": self.port_a}
        if not self.delete:
            xc["port-b"] = self.port_b
        els = yangcodec.json_to_xml({"sdqkd-optical-switch:optical-switches": {"switch": [{"name": self.switch, "cross-connect": [xc]}]}}, _osw())
        if self.delete:
            _mark_delete(els[0], "{urn:sdqkd:yang:sdqkd-optical-switch}cross-connect")
        return els


def config_element(edits: list[Edit]) -> etree._Element:
    """One <config> with every edit for one agent (merged per top-level node)."""
    config = etree.Element(f"{{{NC_NS}}}config", nsmap={None: NC_NS})
    for e in edits:
        for el in e.elements():
            config.append(el)
    return config


@dataclass
class Plan:
    """Ordered edits per agent (qkdn_id): what one transaction changes."""

    edits: dict[str, list[Edit]] = field(default_factory=dict)

    def add(self, qkdn_id: str, edit: Edit) -> None:
        self.edits.setdefault(qkdn_id.lower(), []).append(edit)

    def nodes(self) -> list[str]:
        return sorted(self.edits)  # a fixed order: no lock-order deadlock between transactions
