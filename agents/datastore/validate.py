"""Semantic checks that YANG types cannot express, as an ordered list of small named
checks. Each collects every failure with its error-path, so one reply carries them all
(pyang's err_add style). Everything YANG says was already checked by libyang
(ModelSet.check); the checks read the config's RFC 7951 JSON as libyang prints it, which
holds set leaves only (none of the leaves read here has a YANG default).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sdqkd.agents.netconf import errors

QKDN = "/etsi-qkdn:qkd_node"


@dataclass(frozen=True)
class NodeFacts:
    """What the agent knows about its own node, independent of configuration."""

    qkdn_id: str


Check = Callable[[dict[str, Any], NodeFacts], Iterator[errors.RpcError]]
Config = dict[str, dict[str, Any]]  # module -> RFC 7951 JSON of its top-level nodes


def _node(cfg: Config) -> dict[str, Any]:
    return cfg.get("etsi-qkd-sdn-node", {}).get("etsi-qkd-sdn-node:qkd_node", {})


def _entries(obj: dict[str, Any], container: str, lst: str) -> list[dict[str, Any]]:
    return obj.get(container, {}).get(lst, [])


def _link_path(link: dict[str, Any]) -> str:
    return f"{QKDN}/etsi-qkdn:qkd_links/etsi-qkdn:qkd_link[etsi-qkdn:qkdl_id='{link['qkdl_id']}']"


def _ident(value: Any) -> str:
    return str(value).rsplit(":", 1)[-1] if value is not None else ""


def _channels(rng: str) -> set[int]:
    """'1,12-20,40' -> channel numbers."""
    out: set[int] = set()
    for part in rng.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def node_identity(cfg: Config, facts: NodeFacts) -> Iterator[errors.RpcError]:
    qid = _node(cfg).get("qkdn_id")
    if qid is None or str(qid) == "":
        yield errors.MissingElement("qkd_node needs its qkdn_id", path=f"{QKDN}/etsi-qkdn:qkdn_id", info={"bad-element": "qkdn_id"})
    elif str(qid).lower() != facts.qkdn_id.lower():
        yield errors.InvalidValue(f"this node is {facts.qkdn_id}; qkdn_id cannot be changed", path=f"{QKDN}/etsi-qkdn:qkdn_id")


def link_endpoints(cfg: Config, facts: NodeFacts) -> Iterator[errors.RpcError]:
    node = _node(cfg)
    ifaces = {int(i["qkdi_id"]): i for i in _entries(node, "qkd_interfaces", "qkd_interface")}
    for link in _entries(node, "qkd_links", "qkd_link"):
        path = _link_path(link)
        local_end = link.get("qkdl_local", {})
        local = local_end.get("qkdn_id")
        if local and str(local).lower() != facts.qkdn_id.lower():
            yield errors.InvalidValue("qkdl_local/qkdn_id must be this node", path=f"{path}/etsi-qkdn:qkdl_local/etsi-qkdn:qkdn_id")
        kind = _ident(link.get("qkdl_type"))
        if kind == "PHYS":
            qkdi = local_end.get("qkdi_id")
            if qkdi is None:
                yield errors.MissingElement("a PHYS link needs qkdl_local/qkdi_id", path=f"{path}/etsi-qkdn:qkdl_local/etsi-qkdn:qkdi_id", info={"bad-element": "qkdi_id"})
            elif int(qkdi) not in ifaces:
                yield errors.InvalidValue(f"no qkd_interface {qkdi} on this node", path=f"{path}/etsi-qkdn:qkdl_local/etsi-qkdn:qkdi_id")
            else:
                rng = ifaces[int(qkdi)].get("qkdi_capabilities", {}).get("wavelength_range")
                wl = link.get("phys_wavelength")
                if rng and wl and int(wl) not in _channels(str(rng)):
                    yield errors.InvalidValue(f"channel {wl} is outside interface {qkdi}'s range {rng}", path=f"{path}/etsi-qkdn:phys_wavelength")
        if kind in ("PHYS", "VIRT") and not link.get("qkdl_remote", {}).get("qkdn_id"):
            yield errors.MissingElement("the link needs qkdl_remote/qkdn_id", path=f"{path}/etsi-qkdn:qkdl_remote/etsi-qkdn:qkdn_id", info={"bad-element": "qkdn_id"})


def app_links(cfg: Config, facts: NodeFacts) -> Iterator[errors.RpcError]:
    node = _node(cfg)
    links = {str(lk["qkdl_id"]).lower() for lk in _entries(node, "qkd_links", "qkd_link")}
    for app in _entries(node, "qkd_applications", "qkd_app"):
        for lid in app.get("backing_qkdl_id", []):
            if str(lid).lower() not in links:
                yield errors.InvalidValue(
                    f"backing link {lid} does not exist",
                    path=f"{QKDN}/etsi-qkdn:qkd_applications/etsi-qkdn:qkd_app[etsi-qkdn:app_id='{app['app_id']}']/etsi-qkdn:backing_qkdl_id[.='{lid}']",
                )


def cross_connect_ports(cfg: Config, facts: NodeFacts) -> Iterator[errors.RpcError]:
    """A port takes part in one cross-connect at most (port-a and port-b alike)."""
    osw = cfg.get("sdqkd-optical-switch", {}).get("sdqkd-optical-switch:optical-switches", {})
    for sw in osw.get("switch", []):
        used: dict[int, int] = {}
        for xc in sw.get("cross-connect", []):
            a, b = int(xc["port-a"]), int(xc.get("port-b", 0))
            path = f"/sdqkd-osw:optical-switches/sdqkd-osw:switch[sdqkd-osw:name='{sw['name']}']/sdqkd-osw:cross-connect[sdqkd-osw:port-a='{a}']"
            if a == b:
                yield errors.InvalidValue("a port cannot be cross-connected to itself", path=path)
            for p in (a, b):
                if p in used and used[p] != a:
                    yield errors.InvalidValue(f"port {p} is already in the cross-connect of port {used[p]}", path=path)
                used.setdefault(p, a)


CHECKS: tuple[Check, ...] = (node_identity, link_endpoints, app_links, cross_connect_ports)


def validate(cfg: Config, facts: NodeFacts) -> list[errors.RpcError]:
    """Every failure of every check."""
    return [err for check in CHECKS for err in check(cfg, facts)]
