"""What the controller configured, as the LKMS and forwarding module need it: which
applications exist, which links back them, and for each virtual link the next hop.

Built from the ETSI 015 running datastore after every commit; immutable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any



@dataclass(frozen=True)
class LinkRoute:
    qkdl_id: str
    kind: str  # PHYS or VIRT
    enabled: bool
    remote: str | None  # qkdn_id at the far end of the (virtual) link
    prev_hop: str | None = None
    next_hops: tuple[str, ...] = ()
    bandwidth: int = 0  # VIRT: the path's planned key rate (bit/s) from the controller's plan; 0 if none

    @property
    def first_neighbour(self) -> str | None:
        """The node the first hop of this backing link goes to: from the far end of a
        virtual link (no next hop) keys go back along its previous hops."""
        if self.kind == "PHYS":
            return self.remote
        return self.next_hops[0] if self.next_hops else self.prev_hop


@dataclass(frozen=True)
class AppRoute:
    app_id: str
    saes: frozenset[str]
    backing: tuple[str, ...]
    ttl: int | None = None
    remote: str | None = None


@dataclass(frozen=True)
class RouteTable:
    own: str
    links: dict[str, LinkRoute] = field(default_factory=dict)
    apps: tuple[AppRoute, ...] = ()

    def app_for(self, a: str, b: str) -> AppRoute | None:
        """The application covering SAEs a and b (either may be server or client)."""
        for app in self.apps:
            if {a, b} <= app.saes:
                return app
        return None

    def phys_to(self, peer: str) -> list[LinkRoute]:
        """Enabled PHYS links to an adjacent node."""
        return [lk for lk in self.links.values() if lk.kind == "PHYS" and lk.enabled and lk.remote == peer]

    def next_hop(self, vlink: str) -> str | None:
        lk = self.links.get(vlink)
        if lk is None or not lk.next_hops:
            return None
        return lk.next_hops[0]


def _s(value: Any) -> str | None:
    return str(value).lower() if value not in (None, "") else None


def from_running(module: dict[str, Any], own_qkdn_id: str) -> RouteTable:
    """RouteTable from running's etsi-qkd-sdn-node RFC 7951 JSON (Datastores.running_config)."""
    node = module.get("etsi-qkd-sdn-node:qkd_node", {})
    links = {}
    for lk in node.get("qkd_links", {}).get("qkd_link", []):
        kind = str(lk.get("qkdl_type") or "").rsplit(":", 1)[-1]
        status = str(lk.get("qkdl_status") or "").rsplit(":", 1)[-1]
        links[str(lk["qkdl_id"]).lower()] = LinkRoute(
            qkdl_id=str(lk["qkdl_id"]).lower(),
            kind=kind,
            # as the QKD modules read it (drivers/qkd_link.switched_on): OFF makes no key
            enabled=bool(lk.get("qkdl_enable", True)) and status != "OFF",
            remote=_s(lk.get("qkdl_remote", {}).get("qkdn_id")),
            prev_hop=_s(lk.get("virt_prev_hop")),
            next_hops=tuple(str(h).lower() for h in lk.get("virt_next_hop", [])),
            bandwidth=int(lk.get("virt_bandwidth") or 0),
        )
    apps = []
    for app in node.get("qkd_applications", {}).get("qkd_app", []):
        saes = {str(c) for c in app.get("client_app_id", [])}
        if app.get("server_app_id"):
            saes.add(str(app["server_app_id"]))
        ttl = app.get("app_qos", {}).get("ttl")
        apps.append(
            AppRoute(
                app_id=str(app["app_id"]).lower(),
                saes=frozenset(saes),
                backing=tuple(str(b).lower() for b in app.get("backing_qkdl_id", [])),
                ttl=int(ttl) if ttl else None,
                remote=_s(app.get("remote_qkdn_id")),
            )
        )
    return RouteTable(own_qkdn_id.lower(), links, tuple(apps))
