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

from sdqkd.agents.kms import web


from .coalesce import Coalescer
from .https import ApiError, call, canonical_uuid, json_object, openapi_error, query_one, sae_of, use_group_commit
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
        master, slave = sae_of(request), request.match_info["slave_SAE_ID"]
        _distinct(master, slave)  # no link "to itself" to report on
        st = await call(request, self.service.status, master, slave, inline=True)
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


def _query_int(query: web.Query, name: str) -> int | None:
    value = query_one(query, name)
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii() or len(text) > 10:  # int() of 5,000 digits is a ValueError
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


# Part of /openapi.json (agents/qaas/api.py assembles it): the five routes and the
# standard's data formats (clause 6), as this KME serves them. The Error schema is the
# shared one, `message` only. A request may carry fields the standard does not name
# (they are ignored), so request schemas stay open; answers are closed, so a check
# against the document catches a field we add by mistake.
_SAE = {"type": "string", "minLength": 1}
_NAMED_OBJECTS = {"type": "array", "items": {"type": "object"},
                  "description": "Name/value objects, one parameter each (clause 6.2)."}
_JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _sae_param(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _SAE, "description": what}


def _answers(ok: str, ok_schema: str, bad: str) -> dict[str, Any]:
    return {
        "200": {"description": ok, "content": {_JSON: {"schema": _ref(ok_schema)}}},
        "400": openapi_error(bad),
        "401": openapi_error("The client certificate's SAE is not attached to this KME"),
        "503": openapi_error("No key (path) available now, a relay failed, or the KME is overloaded: retry"),
    }


_ENC_BAD = ("Bad number or size, an unknown slave or one that is the caller, an empty or malformed "
            "additional_slave_SAE_IDs, an unsupported extension_mandatory parameter")
_DEC_BAD = "Malformed or repeated key_IDs, a key not found for this pair, or a master that is the caller"
_KEY_ID_PARAM = {"name": "key_ID", "in": "query", "required": True, "schema": {"type": "string", "format": "uuid"},
                 "description": "The one key to get (POST takes several)."}

OPENAPI: dict[str, Any] = {
    "paths": {
        BASE + "/{slave_SAE_ID}/status": {
            "get": {
                "operationId": "etsi014GetStatus", "tags": ["ETSI GS QKD 014"],
                "summary": "Status of the keys between the caller (master) and slave_SAE_ID (clause 5.1)",
                "parameters": [_sae_param("slave_SAE_ID", "The slave SAE.")],
                "responses": _answers("Status", "Etsi014Status", "An unknown slave SAE"),
            }
        },
        BASE + "/{slave_SAE_ID}/enc_keys": {
            "get": {
                "operationId": "etsi014GetKeySimple", "tags": ["ETSI GS QKD 014"],
                "summary": "New keys shared with slave_SAE_ID, the caller being the master (clause 5.2, GET form)",
                "parameters": [
                    _sae_param("slave_SAE_ID", "The slave SAE; not the caller."),
                    {"name": "number", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": _UINT32_MAX, "default": 1}},
                    {"name": "size", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 8, "maximum": _UINT32_MAX, "multipleOf": 8},
                     "description": "Key size in bits; default: the status key_size."},
                ],
                "responses": _answers("Key container", "Etsi014KeyContainer", _ENC_BAD),
            },
            "post": {
                "operationId": "etsi014GetKey", "tags": ["ETSI GS QKD 014"],
                "summary": "New keys shared with slave_SAE_ID and any additional slaves (clause 5.2, POST form)",
                "parameters": [_sae_param("slave_SAE_ID", "The slave SAE; not the caller.")],
                "requestBody": {"required": False, "content": {_JSON: {"schema": _ref("Etsi014KeyRequest")}}},
                "responses": _answers("Key container", "Etsi014KeyContainer", _ENC_BAD),
            },
        },
        BASE + "/{master_SAE_ID}/dec_keys": {
            "get": {
                "operationId": "etsi014GetKeyWithKeyIdsSimple", "tags": ["ETSI GS QKD 014"],
                "summary": "The key master_SAE_ID got with this key_ID, the caller being the slave (clause 5.3, GET form)",
                "parameters": [_sae_param("master_SAE_ID", "The master SAE; not the caller."), _KEY_ID_PARAM],
                "responses": _answers("Key container", "Etsi014KeyContainer", _DEC_BAD),
            },
            "post": {
                "operationId": "etsi014GetKeyWithKeyIds", "tags": ["ETSI GS QKD 014"],
                "summary": "The keys master_SAE_ID got with these key_IDs, each delivered once (clause 5.3, POST form)",
                "parameters": [_sae_param("master_SAE_ID", "The master SAE; not the caller.")],
                "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Etsi014KeyIds")}}},
                "responses": _answers("Key container", "Etsi014KeyContainer", _DEC_BAD),
            },
        },
    },
    "components": {
        "schemas": {
            "Etsi014Status": {
                "type": "object", "description": "ETSI GS QKD 014 Status (clause 6.1).",
                "required": ["source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
                             "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                             "min_key_size", "max_SAE_ID_count"],
                "additionalProperties": False,
                "properties": {
                    **{k: {"type": "string"} for k in ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")},
                    **{k: {"type": "integer", "minimum": 0} for k in (
                        "key_size", "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                        "min_key_size", "max_SAE_ID_count")},
                    "status_extension": {"type": "object"},
                },
            },
            "Etsi014KeyRequest": {
                "type": "object", "description": "ETSI GS QKD 014 Key request (clause 6.2); other fields are ignored.",
                "properties": {
                    "number": {"type": "integer", "minimum": 1, "maximum": _UINT32_MAX, "default": 1},
                    "size": {"type": "integer", "minimum": 8, "maximum": _UINT32_MAX, "multipleOf": 8,
                             "description": "Key size in bits; default: the status key_size."},
                    "additional_slave_SAE_IDs": {"type": "array", "minItems": 1, "items": _SAE,
                                                 "description": "Further slaves; leave out when there are none."},
                    "extension_mandatory": {**_NAMED_OBJECTS, "description": "Refused with 400 (none is supported)."},
                    "extension_optional": _NAMED_OBJECTS,
                },
            },
            "Etsi014KeyIds": {
                "type": "object", "description": "ETSI GS QKD 014 Key IDs (clause 6.4); other fields are ignored.",
                "required": ["key_IDs"],
                "properties": {
                    "key_IDs": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {
                        "type": "object", "required": ["key_ID"],
                        "properties": {"key_ID": {"type": "string", "format": "uuid"},
                                       "key_ID_extension": {"type": "object"}}}},
                    "key_IDs_extension": {"type": "object"},
                },
            },
            "Etsi014KeyContainer": {
                "type": "object", "description": "ETSI GS QKD 014 Key container (clause 6.3).",
                "required": ["keys"],
                "additionalProperties": False,
                "properties": {
                    "keys": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["key_ID", "key"], "additionalProperties": False,
                        "properties": {"key_ID": {"type": "string", "format": "uuid"},
                                       "key": {"type": "string", "contentEncoding": "base64"}}}},
                },
            },
        }
    },
}
