"""`GET /api/v1/links`: the ETSI GS QKD 014 key links this node takes part in, as its
LKMS sees them (the route table built from the ETSI 015 running datastore, and the key
store).

A key link is an SAE pair keys can be had for (a qkd_app the controller configured):
direct when a PHYS link joins the two nodes, relayed when a VIRT link carries the keys
through other nodes. At an end node the entry names both SAEs; at a node in the middle
of a relay it is a transit entry (the VIRT link's previous and next hop and its far
end; which SAEs use it is known only at the ends).
"""
from __future__ import annotations

from typing import Any

from sdqkd.agents.kms import web

from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms.https import call
from sdqkd.agents.kms.routes import AppRoute, LinkRoute
from sdqkd.agents.kms.interface import KmsError

from . import openapi
from .context import Context
from .directory import Directory

PATH = "/api/v1/links"


def add_routes(app: web.Application, ctx: Context) -> None:
    listing = _Listing(ctx)

    async def get(request: web.Request) -> web.Response:
        return web.json_response(await call(request, listing.snapshot))

    app.add_routes([web.get(PATH, get, allow_head=False)])


class _Listing:
    def __init__(self, ctx: Context) -> None:
        self.lkms = ctx.lkms
        self.dir = Directory(ctx.cfg)

    def _node(self, qkdn_id: str | None) -> dict[str, Any] | None:
        return {"node": self.dir.node_name(qkdn_id), "qkdn_id": qkdn_id} if qkdn_id else None

    def snapshot(self) -> dict[str, Any]:
        """Runs on the LKMS pool: it counts keys in the store."""
        routes = self.lkms.routes
        entries: list[dict[str, Any]] = []
        backing_here: set[str] = set()
        for app in routes.apps:
            backing_here.update(app.backing)
            entries.extend(self._ends(app))
        for lk in routes.links.values():
            if lk.kind == "VIRT" and lk.qkdl_id not in backing_here:
                entries.append(self._transit(lk))
        return {**self._node(self.dir.own), "links": entries}  # type: ignore[dict-item]

    def _ends(self, app: AppRoute) -> list[dict[str, Any]]:
        local = sorted(s for s in app.saes if self.dir.saes.get(s) == self.dir.own)
        remote = sorted(s for s in app.saes if s not in local)
        if not local:
            return []
        backing = [self._backing(b) for b in app.backing]
        via = sorted({b["hop"]["node"] or b["hop"]["qkdn_id"] for b in backing if b["type"] == "VIRT" and b["hop"]})
        out = []
        for far in remote:
            try:
                stored = self.lkms.status(local[0], far).stored_key_count
            except KmsError:  # an SAE missing from the directory: listed, with nothing to serve
                stored = 0
            remote_qid = self.dir.saes.get(far) or app.remote
            out.append({
                "app_id": app.app_id,
                "role": "end",
                "local": {"SAE_ID": local[0], **self._node(self.dir.own)},  # type: ignore[dict-item]
                "remote": {"SAE_ID": far, "node": self.dir.node_name(remote_qid), "qkdn_id": remote_qid},
                "relayed": bool(via),
                "via": via,
                "direction": _direction([self.lkms.routes.links.get(b) for b in app.backing]),
                "backing": backing,
                "key_size": self.lkms.cfg.key_size,
                "stored_key_count": stored,
            })
        return out

    def _backing(self, qkdl_id: str) -> dict[str, Any]:
        lk = self.lkms.routes.links.get(qkdl_id)
        if lk is None:  # configured on the app but not (or no longer) a link here
            return {"qkdl_id": qkdl_id, "type": None, "enabled": False, "hop": None, "hop_links": []}
        hop = lk.first_neighbour
        return {"qkdl_id": lk.qkdl_id, "type": lk.kind, "enabled": lk.enabled, "hop": self._node(hop),
                "hop_links": self._phys(hop) if lk.kind == "VIRT" else [self._phys_entry(lk)]}

    def _phys(self, peer: str | None) -> list[dict[str, Any]]:
        return [self._phys_entry(p) for p in self.lkms.routes.phys_to(peer)] if peer else []

    def _phys_entry(self, lk: LinkRoute) -> dict[str, Any]:
        return {"qkdl_id": lk.qkdl_id, "stored_link_keys": self.lkms.store.count(lk.qkdl_id)}

    def _transit(self, lk: LinkRoute) -> dict[str, Any]:
        nxt = lk.next_hops[0] if lk.next_hops else None
        return {
            "qkdl_id": lk.qkdl_id,
            "role": "relay" if lk.prev_hop and nxt else "end",
            "prev_hop": self._node(lk.prev_hop),
            "next_hop": self._node(nxt),
            "remote": self._node(lk.remote),
            "enabled": lk.enabled,
            "hop_links": self._phys(lk.prev_hop) + self._phys(nxt),
        }


def _direction(links: list[LinkRoute | None]) -> str:
    """Which way keys can go: a PHYS link and a relayed (VIRT) link alike serve either end
    as master (a VIRT link relays along its next hops from one end, its previous hops from
    the other)."""
    return "both" if any(lk is not None for lk in links) else "none"


_NODE = {
    "type": ["object", "null"],
    "required": ["node", "qkdn_id"],
    "properties": {"node": {"type": ["string", "null"]}, "qkdn_id": {"type": "string", "format": "uuid"}},
}
_HOP_LINK = {
    "type": "object",
    "required": ["qkdl_id", "stored_link_keys"],
    "properties": {
        "qkdl_id": {"type": "string", "format": "uuid"},
        "stored_link_keys": {"type": "integer", "minimum": 0,
                             "description": f"Link keys ({8 * fm.LINK_KEY_BYTES} bits each) this end may use now."},
    },
}

OPENAPI: dict[str, Any] = {
    "paths": {
        PATH: {
            "get": {
                "operationId": "listKeyLinks",
                "summary": "The ETSI 014 key links (SAE pairs) this node serves or relays",
                "responses": {
                    "200": {"description": "This node and its key links",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/KeyLinks"}}}},
                    "401": openapi.error("No valid client certificate"),
                    "503": openapi.error("The node is overloaded: retry"),
                },
            }
        }
    },
    "components": {
        "schemas": {
            "KeyLinks": {
                "type": "object",
                "required": ["node", "qkdn_id", "links"],
                "properties": {
                    "node": {"type": "string"},
                    "qkdn_id": {"type": "string", "format": "uuid"},
                    "links": {"type": "array", "items": {"oneOf": [{"$ref": "#/components/schemas/KeyLinkEnd"},
                                                                   {"$ref": "#/components/schemas/KeyLinkTransit"}]}},
                },
            },
            "KeyLinkEnd": {
                "type": "object",
                "description": "A key link with an SAE on this node (an ETSI 015 qkd_app).",
                "required": ["app_id", "role", "local", "remote", "relayed", "via", "direction", "backing", "key_size",
                             "stored_key_count"],
                "properties": {
                    "app_id": {"type": "string", "format": "uuid"},
                    "role": {"const": "end"},
                    "local": {"$ref": "#/components/schemas/KeyParty"},
                    "remote": {"$ref": "#/components/schemas/KeyParty"},
                    "relayed": {"type": "boolean"},
                    "via": {"type": "array", "items": {"type": "string"},
                            "description": "Adjacent nodes keys are relayed through (empty when direct)."},
                    "direction": {"enum": ["both", "none"],
                                  "description": "Which end may be master: either (both), over a direct or a "
                                  "relayed link alike; none while no backing link is configured here."},
                    "backing": {"type": "array", "items": {
                        "type": "object",
                        "required": ["qkdl_id", "type", "enabled", "hop", "hop_links"],
                        "properties": {
                            "qkdl_id": {"type": "string", "format": "uuid"},
                            "type": {"enum": ["PHYS", "VIRT", None]},
                            "enabled": {"type": "boolean"},
                            "hop": _NODE,
                            "hop_links": {"type": "array", "items": _HOP_LINK},
                        },
                    }},
                    "key_size": {"type": "integer"},
                    "stored_key_count": {"type": "integer", "minimum": 0,
                                         "description": "As ETSI 014 Status: keys of key_size bits this node's SAE "
                                         "could get as master now."},
                },
            },
            "KeyLinkTransit": {
                "type": "object",
                "description": "A virtual link this node relays keys over, or one whose application is elsewhere.",
                "required": ["qkdl_id", "role", "prev_hop", "next_hop", "remote", "enabled", "hop_links"],
                "properties": {
                    "qkdl_id": {"type": "string", "format": "uuid"},
                    "role": {"enum": ["relay", "end"]},
                    "prev_hop": _NODE,
                    "next_hop": _NODE,
                    "remote": _NODE,
                    "enabled": {"type": "boolean"},
                    "hop_links": {"type": "array", "items": _HOP_LINK},
                },
            },
        }
    },
}
