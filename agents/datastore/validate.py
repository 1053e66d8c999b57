"""Semantic checks that YANG types cannot express, as an ordered list of small named
checks. Each collects every failure with its error-path, so one reply carries them all
(pyang's err_add style). Types, patterns and ranges were already checked when the
config was decoded into the bindings.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sdqkd.agents import errors
from sdqkd.yangcodec import leaf_value, list_entries

QKDN = "/etsi-qkdn:qkd_node"


@dataclass(frozen=True)
class NodeFacts:
    """What the agent knows about its own node, independent of configuration."""

    qkdn_id: str


Check = Callable[[dict[str, Any], NodeFacts], Iterator[errors.RpcError]]


def _v(leaf: Any) -> Any:
    val = leaf_value(leaf)
    return None if val is None else val


def _link_path(link: Any) -> str:
    return f"{QKDN}/etsi-qkdn:qkd_links/etsi-qkdn:qkd_link[etsi-qkdn:qkdl_id='{link.qkdl_id}']"


def _ident(value: Any) -> str:
    return str(value).rsplit(":", 1)[-1] if value is not None else ""


def _channels(rng: str) -> set[int]:
    """'1,12-20,40' -> channel numbers."""
    out: set[int] = set()
    for part in rng.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def node_identity(roots: dict[str, Any], facts: NodeFacts) -> Iterator[errors.RpcError]:
    node = roots["etsi-qkd-sdn-node"].qkd_node
    qid = _v(node.qkdn_id)
    if qid is None or str(qid) == "":
        yield errors.MissingElement("qkd_node needs its qkdn_id", path=f"{QKDN}/etsi-qkdn:qkdn_id", info={"bad-element": "qkdn_id"})
    elif str(qid).lower() != facts.qkdn_id.lower():
        yield errors.InvalidValue(f"this node is {facts.qkdn_id}; qkdn_id cannot be changed", path=f"{QKDN}/etsi-qkdn:qkdn_id")


def link_endpoints(roots: dict[str, Any], facts: NodeFacts) -> Iterator[errors.RpcError]:
    node = roots["etsi-qkd-sdn-node"].qkd_node
    ifaces = {int(k): v for k, v in node.qkd_interfaces.qkd_interface.items()}
    for link in list_entries(node.qkd_links.qkd_link):
        path = _link_path(link)
        local = _v(link.qkdl_local.qkdn_id)
        if local and str(local).lower() != facts.qkdn_id.lower():
            yield errors.InvalidValue("qkdl_local/qkdn_id must be this node", path=f"{path}/etsi-qkdn:qkdl_local/etsi-qkdn:qkdn_id")
        kind = _ident(_v(link.qkdl_type))
        if kind == "PHYS":
            qkdi = _v(link.qkdl_local.qkdi_id)
            if not link.qkdl_local.qkdi_id._changed():
                yield errors.MissingElement("a PHYS link needs qkdl_local/qkdi_id", path=f"{path}/etsi-qkdn:qkdl_local/etsi-qkdn:qkdi_id", info={"bad-element": "qkdi_id"})
            elif int(qkdi) not in ifaces:
                yield errors.InvalidValue(f"no qkd_interface {qkdi} on this node", path=f"{path}/etsi-qkdn:qkdl_local/etsi-qkdn:qkdi_id")
            else:
                rng = _v(ifaces[int(qkdi)].qkdi_capabilities.wavelength_range)
                wl = _v(link.phys_wavelength)
                if rng and wl and int(wl) not in _channels(str(rng)):
                    yield errors.InvalidValue(f"channel {wl} is outside interface {qkdi}'s range {rng}", path=f"{path}/etsi-qkdn:phys_wavelength")
        if kind in ("PHYS", "VIRT") and not _v(link.qkdl_remote.qkdn_id):
            yield errors.MissingElement("the link needs qkdl_remote/qkdn_id", path=f"{path}/etsi-qkdn:qkdl_remote/etsi-qkdn:qkdn_id", info={"bad-element": "qkdn_id"})


def app_links(roots: dict[str, Any], facts: NodeFacts) -> Iterator[errors.RpcError]:
    node = roots["etsi-qkd-sdn-node"].qkd_node
    links = {str(k).lower() for k in node.qkd_links.qkd_link.keys()}
    for app in list_entries(node.qkd_applications.qkd_app):
        for lid in app.backing_qkdl_id:
            if str(lid).lower() not in links:
                yield errors.InvalidValue(
                    f"backing link {lid} does not exist",
                    path=f"{QKDN}/etsi-qkdn:qkd_applications/etsi-qkdn:qkd_app[etsi-qkdn:app_id='{app.app_id}']/etsi-qkdn:backing_qkdl_id[.='{lid}']",
                )


def cross_connect_ports(roots: dict[str, Any], facts: NodeFacts) -> Iterator[errors.RpcError]:
    """A port takes part in one cross-connect at most (port-a and port-b alike)."""
    for sw in list_entries(roots["sdqkd-optical-switch"].optical_switches.switch):
        used: dict[int, int] = {}
        for xc in list_entries(sw.cross_connect):
            a, b = int(xc.port_a), int(xc.port_b)
            path = f"/sdqkd-osw:optical-switches/sdqkd-osw:switch[sdqkd-osw:name='{sw.name}']/sdqkd-osw:cross-connect[sdqkd-osw:port-a='{a}']"
            if a == b:
                yield errors.InvalidValue("a port cannot be cross-connected to itself", path=path)
            for p in (a, b):
                if p in used and used[p] != a:
                    yield errors.InvalidValue(f"port {p} is already in the cross-connect of port {used[p]}", path=path)
                used.setdefault(p, a)


CHECKS: tuple[Check, ...] = (node_identity, link_endpoints, app_links, cross_connect_ports)


def validate(roots: dict[str, Any], facts: NodeFacts) -> list[errors.RpcError]:
    """Every failure of every check."""
    return [err for check in CHECKS for err in check(roots, facts)]
