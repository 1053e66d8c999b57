"""The edits the controller makes on an agent, one small class each. Each states its
content as RFC 7951 JSON, which libyang writes as XML (sdqkd.yangdata.encode_json: names,
namespaces, order, identity prefixes and every value's type from the schema, never by
string templates), and says which capabilities the agent must have; provisioning only
orders and sends them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lxml import etree

from sdqkd import yangdata

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
# Edits in an order in which each leaves a valid configuration: what others refer to first
# (a cross-connect under a link, a link under an application); removals in the reverse one.
DEPENDENCY_RANK = {"xc": 0, "link": 1, "app": 2}
ETSI_NS = "urn:etsi:qkd:yang:etsi-qkd-node"
CANDIDATE = "urn:ietf:params:netconf:capability:candidate:1.0"
CONFIRMED = "urn:ietf:params:netconf:capability:confirmed-commit:1.1"


def _xml(content: dict[str, Any]) -> list[etree._Element]:
    """A partial configuration (an edit) in XML, each value checked against its type; `nc`
    declared on top for the operation attributes."""
    out = []
    for el in yangdata.encode_json_xml(content, config=True):
        top = etree.Element(el.tag, nsmap={**el.nsmap, "nc": NC_NS})
        top.extend(list(el))
        out.append(top)
    return out


OSW_NS = "urn:sdqkd:yang:sdqkd-optical-switch"
Key = tuple[str, str]  # (kind: app | link | xc, id): one entry on one agent


class Edit:
    """One change on one agent."""

    DEPENDS: ClassVar[tuple[str, ...]] = (CANDIDATE, CONFIRMED)
    delete: bool = False

    @property
    def key(self) -> Key:
        """The entry this edit writes: what the controller records as its own before pushing
        it, and what reconciliation compares with what the agent has."""
        raise NotImplementedError

    def matches(self, found: dict[str, Any]) -> bool:
        """Whether the entry as the agent has it (see present()) says what this edit says,
        in what reconciliation must restore (default: that it exists)."""
        return True

    @property
    def in_view(self) -> bool:
        """Whether the controller's topology view reads what this edit changes (PHYS links,
        cross-connects: yes; applications and VIRT links: no)."""
        return True

    @property
    def operation(self) -> str:
        """What the edit does to its entry (RFC 6241 7.2): remove, replace (stated whole) or merge."""
        return "remove" if self.delete else "merge"

    def content(self) -> dict[str, Any]:
        """The edit as RFC 7951 JSON from the top-level node down to its entry (for a removal,
        the entry's keys only): the one statement each transport encodes."""
        raise NotImplementedError

    def target(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The entry's data path, top-level node first (module-qualified), each step with its
        list keys (none for a container): where RESTCONF puts, and deletes, it."""
        raise NotImplementedError

    def elements(self) -> list[etree._Element]:
        """The content as XML for <edit-config>, the operation on the entry."""
        els = _xml(self.content())
        if self.delete:
            _mark_delete(els[0], self.ENTRY)
        elif self.operation == "replace":
            for el in els[0].iter(self.ENTRY):
                el.set(f"{{{NC_NS}}}operation", "replace")
        return els

    ENTRY: ClassVar[str] = ""  # the entry's XML tag


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

    @property
    def in_view(self) -> bool:
        return self.kind != "VIRT"

    @property
    def key(self) -> Key:
        return ("link", self.qkdl_id.lower())

    ENTRY: ClassVar[str] = f"{{{ETSI_NS}}}qkd_link"

    def target(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [("etsi-qkd-sdn-node:qkd_node", ()), ("qkd_links", ()), ("qkd_link", (self.qkdl_id,))]

    def content(self) -> dict[str, Any]:
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
                lk["phys_channel_att"] = f"{self.attenuation:.3f}"
        return {"etsi-qkd-sdn-node:qkd_node": {"qkd_links": {"qkd_link": [lk]}}}


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

    @property
    def in_view(self) -> bool:
        return False

    @property
    def key(self) -> Key:
        return ("app", self.app_id.lower())

    def matches(self, found: dict[str, Any]) -> bool:
        """The backing links decide where the keys go: a reroute that committed on some
        hops and not others leaves them differing, and reconciliation puts them back."""
        return (found.get("backing") == sorted(b.lower() for b in self.backing) and found.get("server") == self.server
                and found.get("clients") == sorted(self.clients))

    ENTRY: ClassVar[str] = f"{{{ETSI_NS}}}qkd_app"

    @property
    def operation(self) -> str:
        # The entry is stated whole: a reroute must replace backing_qkdl_id, not add to it.
        return "remove" if self.delete else "replace"

    def target(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [("etsi-qkd-sdn-node:qkd_node", ()), ("qkd_applications", ()), ("qkd_app", (self.app_id,))]

    def content(self) -> dict[str, Any]:
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
        return {"etsi-qkd-sdn-node:qkd_node": {"qkd_applications": {"qkd_app": [app]}}}


@dataclass
class CrossConnectEdit(Edit):
    switch: str
    port_a: int
    port_b: int = 0
    delete: bool = False

    @property
    def key(self) -> Key:
        return ("xc", f"{self.switch}/{self.port_a}")

    def matches(self, found: dict[str, Any]) -> bool:
        return found.get("port-b") == self.port_b

    ENTRY: ClassVar[str] = f"{{{OSW_NS}}}cross-connect"

    def target(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [("sdqkd-optical-switch:optical-switches", ()), ("switch", (self.switch,)), ("cross-connect", (self.port_a,))]

    def content(self) -> dict[str, Any]:
        xc: dict[str, Any] = {"port-a": self.port_a}
        if not self.delete:
            xc["port-b"] = self.port_b
        return {"sdqkd-optical-switch:optical-switches": {"switch": [{"name": self.switch, "cross-connect": [xc]}]}}


def removal(key: Key) -> Edit:
    """The edit that removes one entry, from its key alone (an orphan has no other record)."""
    kind, ident = key
    if kind == "app":
        return AppEdit(ident, delete=True)
    if kind == "link":
        return LinkEdit(ident, "VIRT", "", "", delete=True)
    switch, _, port = ident.rpartition("/")
    return CrossConnectEdit(switch, int(port), delete=True)


def present(config: etree._Element | None) -> dict[Key, dict[str, Any]]:
    """The entries an agent's configuration (<data> of a get-config) holds, by key, with
    what Edit.matches compares."""
    out: dict[Key, dict[str, Any]] = {}
    if config is None:
        return out
    q = f"{{{ETSI_NS}}}"
    for lk in config.iter(f"{q}qkd_link"):
        lid = (lk.findtext(f"{q}qkdl_id") or "").strip().lower()
        if lid:
            out[("link", lid)] = {"type": (lk.findtext(f"{q}qkdl_type") or "").rsplit(":", 1)[-1]}
    for app in config.iter(f"{q}qkd_app"):
        aid = (app.findtext(f"{q}app_id") or "").strip().lower()
        if aid:
            out[("app", aid)] = {
                "backing": sorted((e.text or "").strip().lower() for e in app.findall(f"{q}backing_qkdl_id")),
                "server": (app.findtext(f"{q}server_app_id") or "").strip(),
                "clients": sorted((e.text or "").strip() for e in app.findall(f"{q}client_app_id")),
            }
    o = f"{{{OSW_NS}}}"
    for sw in config.iter(f"{o}switch"):
        name = (sw.findtext(f"{o}name") or "").strip()
        for xc in sw.findall(f"{o}cross-connect"):
            a, b = xc.findtext(f"{o}port-a"), xc.findtext(f"{o}port-b")
            if a is not None:
                out[("xc", f"{name}/{int(a)}")] = {"port-b": int(b) if b is not None else None}
    return out


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

    def stale_views(self) -> list[str]:
        """The agents whose part of the topology view this transaction changes: re-read them
        after it, and no others (a <get> on every hop after each application collided with the
        next one's transaction: most of the create p99)."""
        return [n for n in self.nodes() if any(e.in_view for e in self.edits[n])]
