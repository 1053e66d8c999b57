"""One-call keys, as MadQCI offers them: `GET /api/v1/keys?to=<peer>` on the local node
returns a fresh key and its key ID for a peer named by node name, qkdn_id or SAE ID;
the peer gets the same key with `GET /api/v1/keys?from=<caller>&key_ID=<uuid>` on its
own node.

Both are the ETSI GS QKD 014 enc_keys / dec_keys of the LKMS underneath (so the key is
relayed through intermediate nodes exactly as for 014); what this adds is naming by
node and the wait: when no application covers the pair yet, the LKMS has asked the
controller for a path (ETSI 015 sdqkdn_application_new) and answers 503, and this call
keeps retrying until the path is provisioned, up to `kms.path_wait` seconds (or the
caller's shorter `wait`). A relayed key link works from either end. ETSI 015 gives the controller no way to tell a node that it
found no path, so a pair still without an application at the deadline gets 404 "no key
path"; a node without any QKD link gets that 404 at once. ETSI 014's own routes live
below /api/v1/keys/{SAE_ID}/, so this exact path is free.
"""
from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from sdqkd.agents.kms import web

from sdqkd.agents.kms.https import ApiError, call, canonical_uuid, query_one, sae_of
from sdqkd.agents.kms.interface import Key, KmsError

from . import openapi
from .context import Context
from .directory import Directory, Party

log = logging.getLogger(__name__)

PATH = "/api/v1/keys"
_RETRY = 0.2  # s between attempts while the controller provisions the path


def add_routes(app: web.Application, ctx: Context) -> None:
    app.add_routes([web.get(PATH, _Keys(ctx).get, allow_head=False)])


class _Keys:
    def __init__(self, ctx: Context) -> None:
        self.lkms = ctx.lkms
        self.dir = Directory(ctx.cfg)
        self.max_wait = ctx.cfg.kms.path_wait if ctx.cfg.kms else 0.0

    async def get(self, request: web.Request) -> web.Response:
        q = request.query
        to, frm, key_id, wait = (query_one(q, n) for n in ("to", "from", "key_ID", "wait"))
        if (to is None) == (frm is None):
            raise ApiError(400, "give exactly one of 'to' (get a new key for a peer) and 'from' (get a peer's key by key_ID)")
        caller = self._caller(request)
        if to is not None:
            if key_id is not None:
                raise ApiError(400, "key_ID goes with 'from', not with 'to'")
            slave = self._peer(to, "to", caller)
            key = await self._new_key(request, caller, slave, self._wait(wait))
            return _answer(key, caller, slave, 8 * len(key.key))
        if key_id is None:
            raise ApiError(400, "'from' needs the key_ID the peer got")
        if wait is not None:
            raise ApiError(400, "wait goes with 'to'")
        master = self._peer(frm or "", "from", caller)
        kid = canonical_uuid(key_id, "key_ID")
        try:
            keys = await call(request, self.lkms.dec_keys, caller.sae, master.sae, [kid])
        except KmsError as exc:
            if any("key_IDs_not_found" in d for d in exc.details):
                raise ApiError(404, f"no key {kid} from {master.sae} for {caller.sae} here "
                                    "(never made for this pair, already delivered, or expired)") from None
            raise
        log.info("one-call key %s delivered to %s (from %s)", kid, caller.sae, master.sae)
        return _answer(keys[0], master, caller, 8 * len(keys[0].key))

    def _caller(self, request: web.Request) -> Party:
        sae = sae_of(request)
        if self.dir.saes.get(sae) != self.dir.own:
            raise ApiError(401, f"SAE '{sae}' is not attached to this KME")
        return self.dir.party(sae)

    def _peer(self, text: str, what: str, caller: Party) -> Party:
        if not text:
            raise ApiError(400, f"{what} is empty")
        peer = self.dir.resolve(text, what)
        if peer.sae == caller.sae:
            raise ApiError(400, f"{what} names the caller itself ({caller.sae})")
        return peer

    def _wait(self, text: str | None) -> float:
        if text is None:
            return self.max_wait
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= self.max_wait:  # also refuses nan and inf
            raise ApiError(400, f"wait must be a number of seconds from 0 to {self.max_wait:g}")
        return value

    async def _new_key(self, request: web.Request, master: Party, slave: Party, wait: float) -> Key:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                keys = await call(request, self.lkms.enc_keys, master.sae, slave.sae, 1, None, [])
                log.info("one-call key %s for %s -> %s", keys[0].key_id, master.sae, slave.sae)
                return keys[0]
            except KmsError as exc:
                if exc.http_status != 503:
                    raise
                routes = self.lkms.routes
                app = routes.app_for(master.sae, slave.sae)
                no_app = slave.qkdn_id != self.dir.own and app is None
                if no_app and not any(lk.kind == "PHYS" and lk.enabled for lk in routes.links.values()):
                    raise ApiError(404, f"no key path from {master.node} to {slave.node}: "
                                        f"{master.node} has no QKD link") from None
                left = deadline - loop.time()
                if left <= 0:
                    if no_app:
                        raise ApiError(404, f"no key path from {master.node} to {slave.node}: the controller "
                                            f"provisioned none within {wait:g} s") from None
                    raise
                await asyncio.sleep(min(_RETRY, left))


def _answer(key: Key, master: Party, slave: Party, size: int) -> web.Response:
    """The same body at both ends: the key, and who made and who gets it."""
    body: dict[str, Any] = {"key_ID": key.key_id, "key": base64.b64encode(key.key).decode("ascii"), "size": size,
                            "master": master.as_json(), "slave": slave.as_json()}
    return web.json_response(body)


_PARTY = {
    "type": "object",
    "required": ["SAE_ID", "node", "qkdn_id"],
    "properties": {
        "SAE_ID": {"type": "string"},
        "node": {"type": ["string", "null"], "description": "Node name; null for a node outside the directory."},
        "qkdn_id": {"type": "string", "format": "uuid"},
    },
}


OPENAPI: dict[str, Any] = {
    "paths": {
        PATH: {
            "get": {
                "operationId": "getOneCallKey",
                "summary": "A new key for a peer (to), or a peer's key by its ID (from + key_ID)",
                "description": "With `to`, the caller (the SAE of the client certificate) is the master: the "
                "node makes a 256-bit key, relays it to the peer's node when there is no direct link, and "
                "returns it. If no key path exists yet, the call waits (up to `wait`, at most the node's "
                "path_wait) for the controller to provision one. With `from` and `key_ID`, the caller is the "
                "slave and gets the same key, once. Exactly one of `to` and `from`.",
                # Two forms of one query: an exploded form-style object whose schema is oneOf
                # the two (OpenAPI 3.1, section 4.8.12.4), so a tool knows `to` and `from`
                # never go together.
                "parameters": [
                    {"name": "query", "in": "query", "required": True, "style": "form", "explode": True,
                     "schema": {"oneOf": [{"$ref": "#/components/schemas/OneCallKeyNew"},
                                          {"$ref": "#/components/schemas/OneCallKeyById"}]}},
                ],
                "responses": {
                    "200": {"description": "The key", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OneCallKey"}}}},
                    "400": openapi.error("Missing or conflicting parameters, a malformed key_ID or wait, a peer that is the caller, "
                                  "a node with several SAEs"),
                    "401": openapi.error("The client certificate's SAE is not attached to this node"),
                    "404": openapi.error("No such node or SAE; no key path to the peer; no such key for this pair"),
                    "503": openapi.error("A key path exists but holds no key now, or the node is overloaded: retry"),
                },
            }
        }
    },
    "components": {
        "schemas": {
            "OneCallKey": {
                "type": "object",
                "required": ["key_ID", "key", "size", "master", "slave"],
                "properties": {
                    "key_ID": {"type": "string", "format": "uuid"},
                    "key": {"type": "string", "contentEncoding": "base64"},
                    "size": {"type": "integer", "description": "Key length in bits."},
                    "master": {"$ref": "#/components/schemas/KeyParty"},
                    "slave": {"$ref": "#/components/schemas/KeyParty"},
                },
            },
            "KeyParty": {**_PARTY, "description": "An SAE and its node."},
            "OneCallKeyNew": {
                "type": "object",
                "description": "A new key for a peer.",
                "required": ["to"],
                "additionalProperties": False,
                "properties": {
                    "to": {"type": "string", "minLength": 1,
                           "description": "Peer node name, qkdn_id or SAE ID to make a key for."},
                    "wait": {"type": "number", "minimum": 0,
                             "description": "Seconds to wait for a key path; default and maximum: the node's path_wait."},
                },
            },
            "OneCallKeyById": {
                "type": "object",
                "description": "The key a peer made, by its ID.",
                "required": ["from", "key_ID"],
                "additionalProperties": False,
                "properties": {
                    "from": {"type": "string", "minLength": 1,
                             "description": "Peer node name, qkdn_id or SAE ID that made the key."},
                    "key_ID": {"type": "string", "format": "uuid", "description": "The key ID the master got."},
                },
            },
        }
    },
}
