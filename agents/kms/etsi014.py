"""ETSI GS QKD 014 V1.1.1 key delivery (REST) on /api/v1/keys, translated to KeyService calls.

Only translation and request validation live here. The caller is the SAE named by its
client certificate (https.sae_of): for status and enc_keys it is the master and the URL
names the slave; for dec_keys it is the slave and the URL names the master. Both the
GET and the POST forms are served, as clients in the wild use both; unknown fields are
ignored, and error messages are the standard's own wording where it gives one. Error
bodies carry `message` only (https.error). A caller naming itself as its peer is 400.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from .coalesce import Coalescer
from .https import ApiError, call, canonical_uuid, json_object, query_one, sae_of, use_group_commit
from .interface import Key, KeyService

log = logging.getLogger(__name__)

BASE = "/api/v1/keys"
# extension_mandatory names this KME handles (clause 6.2): none yet, so any is refused.
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset()
_UINT32_MAX = 2**32 - 1


def add_routes(app: web.Application, service: KeyService) -> None:
    """Serve ETSI 014 on `app` (made by https.make_app) for `service`."""
    use_group_commit(app, service.batch)
    app.add_routes(routes(service))


def routes(service: KeyService) -> list[web.RouteDef]:
    """The five ETSI 014 routes; HEAD is not served (it would use up keys for nobody)."""
    api = _Api(service)
    slave, master = BASE + "/{slave_SAE_ID}", BASE + "/{master_SAE_ID}"
    return [
        web.get(slave + "/status", api.status, allow_head=False),
        web.get(slave + "/enc_keys", api.enc_keys_get, allow_head=False),
        web.post(slave + "/enc_keys", api.enc_keys_post),
        web.get(master + "/dec_keys", api.dec_keys_get, allow_head=False),
        web.post(master + "/dec_keys", api.dec_keys_post),
    ]


class _Api:
    def __init__(self, service: KeyService) -> None:
        self.service = service
        self.coalescer = Coalescer()

    async def status(self, request: web.Request) -> web.Response:
        st = await call(request, self.service.status, sae_of(request), request.match_info["slave_SAE_ID"], inline=True)
        return web.json_response(dataclasses.asdict(st))

    async def enc_keys_get(self, request: web.Request) -> web.Response:
        number = _query_int(request.query, "number")
        size = _query_int(request.query, "size")
        return await self._enc_keys(request, 1 if number is None else number, size, [])

    async def enc_keys_post(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        number = _json_int(body, "number")
        size = _json_int(body, "size")
        slaves = _json_strings(body, "additional_slave_SAE_IDs")
        _check_extensions(body)
        _extension_objects(body, "extension_optional")  # may be ignored, but must be well formed
        return await self._enc_keys(request, 1 if number is None else number, size, slaves)

    async def _enc_keys(self, request: web.Request, number: int, size: int | None, slaves: list[str]) -> web.Response:
        if size is not None and size % 8:
            raise ApiError(400, "size shall be a multiple of 8")
        master, slave = sae_of(request), request.match_info["slave_SAE_ID"]
        _distinct(master, slave)
        if self.service.serves_locally([slave, *slaves]):  # end keys for this node's SAEs: store only
            keys = await call(request, self.service.enc_keys, master, slave, number, size, slaves, inline=True)
        elif slaves:
            keys = await call(request, self.service.enc_keys, master, slave, number, size, slaves)
        else:  # over the network: concurrent requests for the pair share one relay
            keys = await self.coalescer.enc_keys(
                lambda m, s, n, z: call(request, self.service.enc_keys, m, s, n, z, []), master, slave, number, size)
        log.debug("enc_keys %s -> %s: %d key(s), size %s", master, slave, len(keys), size)
        return _container(keys)

    async def dec_keys_get(self, request: web.Request) -> web.Response:
        ids = request.query.getall("key_ID", [])
        if len(ids) != 1:
            raise ApiError(400, "the GET form of dec_keys takes exactly one key_ID (use POST for several)")
        return await self._dec_keys(request, [canonical_uuid(ids[0], "key_ID")])

    async def dec_keys_post(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        items = body.get("key_IDs")
        if not isinstance(items, list) or not items:
            raise ApiError(400, "key_IDs must be a non-empty array of objects with a key_ID")
        ids = []
        for item in items:
            if not isinstance(item, dict) or "key_ID" not in item:
                raise ApiError(400, "each element of key_IDs must be an object with a key_ID")
            ids.append(canonical_uuid(item["key_ID"], "key_ID"))
        if len(set(ids)) != len(ids):
            raise ApiError(400, "key_IDs names the same key_ID more than once")
        return await self._dec_keys(request, ids)

    async def _dec_keys(self, request: web.Request, ids: list[str]) -> web.Response:
        slave, master = sae_of(request), request.match_info["master_SAE_ID"]
        _distinct(master, slave)
        keys = await call(request, self.service.dec_keys, slave, master, ids, inline=True)  # store only
        log.debug("dec_keys %s <- %s: %s", slave, master, ", ".join(ids))
        return _container(keys)


def _distinct(master: str, slave: str) -> None:
    """400 when the caller names itself as its peer. A key shared by an SAE with itself
    protects nothing, and serving it would let an SAE make keys and then read them back
    through dec_keys as its own slave, which the standard's master/slave split rules out."""
    if master == slave:
        raise ApiError(400, f"master and slave are the same SAE ('{master[:64]}'): a key is shared by two different SAEs")


def _container(keys: list[Key]) -> web.Response:
    """Key container (clause 6.3): key_ID (UUID) and key (base64) per key."""
    return web.json_response(
        {"keys": [{"key_ID": k.key_id, "key": base64.b64encode(k.key).decode("ascii")} for k in keys]}
    )


def _query_int(query: MultiMapping[str], name: str) -> int | None:
    value = query_one(query, name)
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise ApiError(400, f"{name} must be a positive integer")
    return _positive(int(text), name)


def _json_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{name} must be a positive integer")
    return _positive(value, name)


def _positive(value: int, name: str) -> int:
    if not 1 <= value <= _UINT32_MAX:
        raise ApiError(400, f"{name} must be a positive integer (1 to {_UINT32_MAX})")
    return value


def _json_strings(body: dict[str, Any], name: str) -> list[str]:
    """A list of SAE IDs; absent or null is none. An empty array is 400: the field is there
    to name additional slaves (clause 6.2), so `[]` is a client that meant something else."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ApiError(400, f"{name} must be an array of SAE IDs (strings)")
    if not value:
        raise ApiError(400, f"{name} must not be empty (leave it out when there is no additional slave)")
    return value


def _extension_objects(body: dict[str, Any], name: str) -> list[str]:
    """Names in an array of name/value objects (a lone object is taken as one)."""
    value = body.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ApiError(400, f"{name} must be an array of objects (name/value pairs)")
    return [k for i in items for k in i]


def _check_extensions(body: dict[str, Any]) -> None:
    unsupported = [n for n in _extension_objects(body, "extension_mandatory") if n not in SUPPORTED_EXTENSIONS]
    if unsupported:
        raise ApiError(400, "not all extension_mandatory parameters are supported")  # the standard's wording
