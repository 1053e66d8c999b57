"""ETSI GS QKD 004 V2.1.1 (OPEN_CONNECT, GET_KEY, CLOSE) as REST/JSON, the way the MadQCI
cloud scenario exposes it, translated to KeyService calls.

    POST /api/open_connect  {source, destination, qos?, key_stream_id?}
                            -> {status, key_stream_id, qos}
    GET  /api/get_key?key_stream_id=KSID[&index=N]
                            -> {status, index, key_buffer (base64), metadata {size, buffer}}
    POST /api/close         {key_stream_id} -> {status}

HTTP status: outcomes the standard models as status codes (clause 6.2 table: 1 peer not
connected, 2 insufficient key, ... 8 metadata size insufficient) are 200 with that
`status` (and a human `message`); a malformed request is 400, a caller that is not a
party of the stream 401 (both JSON {"message"}). Field names are matched without regard
to case, since the standard writes them Key_stream_ID, Key_chunk_size, TTL; unknown
fields are ignored. The caller is the SAE named by its client certificate.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
from typing import Any

from aiohttp import web

from .https import ApiError, call, canonical_uuid, json_object, openapi_error, sae_of
from .interface import KeyService, KmsError, Qos

log = logging.getLogger(__name__)

SUCCESS, PEER_NOT_CONNECTED = 0, 1  # OPEN_CONNECT: 1 = connected, peer not yet
_QOS_INTS = ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority", "timeout", "ttl")
_UINT32_MAX = 2**32 - 1
_NO_METADATA = {"size": 0, "buffer": ""}  # the LKMS attaches no metadata to key chunks


def add_routes(app: web.Application, service: KeyService) -> None:
    """Serve ETSI 004 on `app` (made by https.make_app) for `service`."""
    app.add_routes(routes(service))


def routes(service: KeyService) -> list[web.RouteDef]:
    """The three ETSI 004 routes; HEAD is not served (it would use up a key chunk)."""
    api = _Api(service)
    return [
        web.post("/api/open_connect", api.open_connect),
        web.get("/api/get_key", api.get_key, allow_head=False),
        web.post("/api/close", api.close),
    ]


class _Api:
    def __init__(self, service: KeyService) -> None:
        self.service = service

    async def open_connect(self, request: web.Request) -> web.Response:
        body = _lower(await json_object(request))
        source, destination = _uri(body, "source"), _uri(body, "destination")
        qos = _qos(body.get("qos"))
        ksid = None if body.get("key_stream_id") is None else canonical_uuid(body["key_stream_id"], "key_stream_id")
        try:
            stream = await call(request, self.service.open_connect, sae_of(request), source, destination, qos, ksid)
        except KmsError as exc:
            counter = next((d["qos"] for d in exc.details if isinstance(d.get("qos"), dict)), None)
            return _outcome(exc, key_stream_id=ksid, qos=counter or dataclasses.asdict(qos))
        log.info("open_connect %s: %s -> %s, stream %s", sae_of(request), source, destination, stream.key_stream_id)
        return web.json_response({
            "status": SUCCESS if stream.peer_connected else PEER_NOT_CONNECTED,
            "key_stream_id": stream.key_stream_id,
            "qos": dataclasses.asdict(stream.qos),
        })

    async def get_key(self, request: web.Request) -> web.Response:
        query = {k.lower(): v for k, v in request.query.items()}
        if "key_stream_id" not in query:
            raise ApiError(400, "key_stream_id is required")
        ksid = canonical_uuid(query["key_stream_id"], "key_stream_id")
        index = _index(query.get("index"))
        try:
            got, key = await call(request, self.service.get_key, sae_of(request), ksid, index)
        except KmsError as exc:
            return _outcome(exc, index=index, key_buffer="", metadata=_NO_METADATA)
        return web.json_response({
            "status": SUCCESS, "index": got, "key_buffer": base64.b64encode(key).decode("ascii"), "metadata": _NO_METADATA,
        })

    async def close(self, request: web.Request) -> web.Response:
        body = _lower(await json_object(request))
        if body.get("key_stream_id") is None:
            raise ApiError(400, "key_stream_id is required")
        ksid = canonical_uuid(body["key_stream_id"], "key_stream_id")
        try:
            await call(request, self.service.close, sae_of(request), ksid)
        except KmsError as exc:
            return _outcome(exc)
        log.info("close %s: stream %s", sae_of(request), ksid)
        return web.json_response({"status": SUCCESS})


def _outcome(exc: KmsError, **fields: Any) -> web.Response:
    """A refusal the standard has a status code for: 200 with it; any other goes to the middleware."""
    if exc.status004 is None:
        raise exc
    return web.json_response({"status": exc.status004, **fields, "message": exc.message})


def _lower(body: dict[str, Any]) -> dict[str, Any]:
    return {k.lower(): v for k, v in body.items()}


def _uri(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{name} is required (the URI of the application)")
    return value


def _qos(value: Any) -> Qos:
    """QoS (clause 6.1.1) from JSON; a field that is absent or null keeps the LKMS default."""
    if value is None:
        return Qos()
    if not isinstance(value, dict):
        raise ApiError(400, "qos must be an object")
    given = {k.lower(): v for k, v in value.items() if v is not None}
    fields: dict[str, Any] = {}
    for name in _QOS_INTS:
        if name in given:
            v = given[name]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _UINT32_MAX:
                raise ApiError(400, f"qos.{name} must be an integer from 0 to {_UINT32_MAX}")
            fields[name] = v
    if fields.get("key_chunk_size") == 0:
        raise ApiError(400, "qos.key_chunk_size must be at least 1 (bytes)")
    if fields.get("max_bps") and fields.get("min_bps", 0) > fields["max_bps"]:
        raise ApiError(400, "qos.min_bps must not exceed qos.max_bps")
    if "metadata_mimetype" in given:
        if not isinstance(given["metadata_mimetype"], str) or "/" not in given["metadata_mimetype"]:
            raise ApiError(400, "qos.metadata_mimetype must be a MIME type such as application/json")
        fields["metadata_mimetype"] = given["metadata_mimetype"]
    return Qos(**fields)


def _index(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if not text.isascii() or not text.isdigit() or int(text) > _UINT32_MAX:
        raise ApiError(400, f"index must be an integer from 0 to {_UINT32_MAX}")
    return int(text)


# Part of /openapi.json (agents/qaas/api.py assembles it). Outcomes the standard gives a
# status code are 200 with that `status` and a `message`; field names of requests are
# matched without regard to case, which the document cannot say, so it names the
# lower-case spelling; other fields are ignored, so request schemas stay open.
_JSON = "application/json"
_U32 = {"type": "integer", "minimum": 0, "maximum": _UINT32_MAX}
_STATUS = {"type": "integer", "minimum": 0,
           "description": "ETSI GS QKD 004 status (clause 6.2): 0 success, 1 peer not connected, 2 insufficient "
           "key, 3 peer not connected (GET_KEY), 4 no QKD connection, 5 key_stream_id in use, 6 timeout, "
           "7 QoS not met, 8 metadata size insufficient."}
_KSID = {"type": "string", "format": "uuid"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _answers(schema: str, bad: str) -> dict[str, Any]:
    return {
        "200": {"description": "Done (status 0), or an outcome the standard has a status code for",
                "content": {_JSON: {"schema": _ref(schema)}}},
        "400": openapi_error(bad),
        "401": openapi_error("The caller is not attached to this KME, or not a party of the stream"),
        "503": openapi_error("No key path or link now, or the KME is overloaded: retry"),
    }


OPENAPI: dict[str, Any] = {
    "paths": {
        "/api/open_connect": {
            "post": {
                "operationId": "etsi004OpenConnect", "tags": ["ETSI GS QKD 004"],
                "summary": "OPEN_CONNECT: reserve a key stream between source and destination (clause 6.3)",
                "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Etsi004OpenConnect")}}},
                "responses": _answers("Etsi004OpenConnectResult",
                                      "Missing source or destination, bad QoS, a malformed key_stream_id"),
            }
        },
        "/api/get_key": {
            "get": {
                "operationId": "etsi004GetKey", "tags": ["ETSI GS QKD 004"],
                "summary": "GET_KEY: the key chunk at index of an open stream (clause 6.4)",
                "parameters": [
                    {"name": "key_stream_id", "in": "query", "required": True, "schema": _KSID},
                    {"name": "index", "in": "query", "required": False, "schema": _U32,
                     "description": "Chunk index; default: the next one."},
                ],
                "responses": _answers("Etsi004GetKeyResult",
                                      "A malformed key_stream_id or index, no such open stream, a chunk already delivered"),
            }
        },
        "/api/close": {
            "post": {
                "operationId": "etsi004Close", "tags": ["ETSI GS QKD 004"],
                "summary": "CLOSE: end a key stream (clause 6.5)",
                "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Etsi004Close")}}},
                "responses": _answers("Etsi004CloseResult", "A missing or malformed key_stream_id, no such open stream"),
            }
        },
    },
    "components": {
        "schemas": {
            "Etsi004Qos": {
                "type": "object", "description": "ETSI GS QKD 004 QoS (clause 6.1.1); absent fields take the KME's default.",
                "properties": {
                    "key_chunk_size": {**_U32, "minimum": 1, "description": "Bytes per chunk."},
                    **{k: _U32 for k in ("max_bps", "min_bps", "jitter", "priority", "timeout", "ttl")},
                    "metadata_mimetype": {"type": "string", "pattern": "/"},
                },
            },
            "Etsi004OpenConnect": {
                "type": "object", "required": ["source", "destination"],
                "properties": {
                    "source": {"type": "string", "pattern": "\\S", "description": "URI of the source application."},
                    "destination": {"type": "string", "pattern": "\\S",
                                    "description": "URI of the destination application."},
                    "qos": _ref("Etsi004Qos"),
                    "key_stream_id": {**_KSID, "description": "Given by the second party to join the first's stream."},
                },
            },
            "Etsi004OpenConnectResult": {
                "type": "object", "required": ["status", "key_stream_id", "qos"], "additionalProperties": False,
                "properties": {"status": _STATUS, "key_stream_id": {"anyOf": [_KSID, {"type": "null"}]},
                               "qos": {"type": "object"}, "message": {"type": "string"}},
            },
            "Etsi004GetKeyResult": {
                "type": "object", "required": ["status", "index", "key_buffer", "metadata"], "additionalProperties": False,
                "properties": {
                    "status": _STATUS, "index": {"anyOf": [_U32, {"type": "null"}]},
                    "key_buffer": {"type": "string", "contentEncoding": "base64", "description": "Empty unless status is 0."},
                    "metadata": {"type": "object", "required": ["size", "buffer"],
                                 "properties": {"size": {"type": "integer", "minimum": 0}, "buffer": {"type": "string"}}},
                    "message": {"type": "string"},
                },
            },
            "Etsi004Close": {"type": "object", "required": ["key_stream_id"], "properties": {"key_stream_id": _KSID}},
            "Etsi004CloseResult": {
                "type": "object", "required": ["status"], "additionalProperties": False,
                "properties": {"status": _STATUS, "message": {"type": "string"}},
            },
        }
    },
}
