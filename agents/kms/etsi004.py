"""ETSI GS QKD 004 V2.1.1 (OPEN_CONNECT, GET_KEY, CLOSE) as REST/JSON, the way the MadQCI
cloud scenario exposes it, translated to KeyService calls.

    POST /api/open_connect  {source, destination, qos?, key_stream_id?}
                            -> {status, key_stream_id, qos}
    GET  /api/get_key?key_stream_id=KSID[&index=N][&metadata_size=N]
                            -> {status, index, key_buffer (base64), metadata {size, buffer}}
    POST /api/close         {key_stream_id} -> {status}

HTTP status: every ETSI 004 outcome (agents/kms/keystream.py decides them all: 1 peer not
connected, 2 insufficient key, ... 4 no such open stream, ... 8 metadata size
insufficient) is 200 with that `status` (and a human `message`); a malformed request is
400, a caller that is not a party of the stream 401 (both JSON {"message"}). Field names are matched without regard
to case, since the standard writes them Key_stream_ID, Key_chunk_size, TTL; unknown
fields are ignored. The caller is the SAE named by its client certificate.
"""
from __future__ import annotations

import logging
from typing import Any

from sdqkd.agents.kms import web

from . import keystream as ks
from .https import ApiError, call, json_object, openapi_error, sae_of
from .interface import KeyService

log = logging.getLogger(__name__)

_UINT32_MAX = ks.UINT32_MAX


def add_routes(app: web.Application, service: KeyService, nodes: dict[str, set[str]] | None = None) -> None:
    """Serve ETSI 004 on `app` (made by https.make_app) for `service`."""
    app.add_routes(routes(service, nodes))


def routes(service: KeyService, nodes: dict[str, set[str]] | None = None) -> list[web.RouteDef]:
    """The three ETSI 004 routes; HEAD is not served (it would use up a key chunk)."""
    api = _Api(ks.KeyStreams(service, nodes))
    return [
        web.post("/api/open_connect", api.open_connect),
        web.get("/api/get_key", api.get_key, allow_head=False),
        web.post("/api/close", api.close),
    ]


async def _bad(request: web.Request, fn: Any, *args: Any) -> Any:
    try:
        return await call(request, fn, *args)
    except ks.BadRequest as exc:
        raise ApiError(400, exc.message) from None


def _checked(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ks.BadRequest as exc:
        raise ApiError(400, exc.message) from None


class _Api:
    def __init__(self, streams: ks.KeyStreams) -> None:
        self.streams = streams

    async def open_connect(self, request: web.Request) -> web.Response:
        body = {k.lower(): v for k, v in (await json_object(request)).items()}
        source = _checked(self.streams.endpoint, body.get("source"), "source")
        destination = _checked(self.streams.endpoint, body.get("destination"), "destination")
        qos = _checked(ks.parse_qos, body.get("qos"))
        ksid = _checked(ks.parse_ksid, body.get("key_stream_id"))
        got = await _bad(request, self.streams.open_connect, sae_of(request), source, destination, qos, ksid)
        if got.status in (ks.SUCCESSFUL, ks.PEER_NOT_CONNECTED):
            log.info("open_connect %s: %s -> %s, stream %s", sae_of(request), source, destination, got.key_stream_id)
        return _answer({"status": got.status, "key_stream_id": got.key_stream_id, "qos": ks.qos_dict(got.qos)}, got.message)

    async def get_key(self, request: web.Request) -> web.Response:
        query = {k.lower(): v for k, v in request.query.items()}
        if "key_stream_id" not in query:
            raise ApiError(400, "key_stream_id is required")
        ksid = _checked(ks.parse_ksid, query["key_stream_id"])
        if ksid is None:
            raise ApiError(400, "key_stream_id must name an open stream, not the null one")
        index = _checked(ks.parse_index, query.get("index"))
        size = _checked(ks.parse_index, query.get("metadata_size"))
        got = await _bad(request, self.streams.get_key, sae_of(request), ksid, index, size)
        metadata = {"size": got.metadata_size, "buffer": got.metadata.decode("utf-8", "replace")}
        return _answer({"status": got.status, "index": got.index, "key_buffer": got.key_b64, "metadata": metadata},
                       got.message)

    async def close(self, request: web.Request) -> web.Response:
        body = {k.lower(): v for k, v in (await json_object(request)).items()}
        if body.get("key_stream_id") is None:
            raise ApiError(400, "key_stream_id is required")
        ksid = _checked(ks.parse_ksid, body["key_stream_id"])
        if ksid is None:
            raise ApiError(400, "key_stream_id must name an open stream, not the null one")
        got = await _bad(request, self.streams.close, sae_of(request), ksid)
        if got.status == ks.SUCCESSFUL:
            log.info("close %s: stream %s", sae_of(request), ksid)
        return _answer({"status": got.status}, got.message)


def _answer(body: dict[str, Any], message: str) -> web.Response:
    """Every ETSI 004 outcome is 200 with its `status` (and a human `message` when not 0)."""
    return web.json_response({**body, "message": message} if message else body)


# Part of /openapi.json (agents/qaas/api.py assembles it). Outcomes the standard gives a
# status code are 200 with that `status` and a `message`; field names of requests are
# matched without regard to case, which the document cannot say, so it names the
# lower-case spelling; other fields are ignored, so request schemas stay open.
_JSON = "application/json"
_U32 = {"type": "integer", "minimum": 0, "maximum": _UINT32_MAX}
_STATUS = {"type": "integer", "minimum": 0, "maximum": 8,
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
                    {"name": "metadata_size", "in": "query", "required": False, "schema": _U32,
                     "description": "Bytes the caller can take of metadata; less than the metadata needs: status 8 "
                                    "with the size needed. Default: no limit."},
                ],
                "responses": _answers("Etsi004GetKeyResult", "A malformed or null key_stream_id, index or metadata_size"),
            }
        },
        "/api/close": {
            "post": {
                "operationId": "etsi004Close", "tags": ["ETSI GS QKD 004"],
                "summary": "CLOSE: end a key stream (clause 6.5)",
                "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Etsi004Close")}}},
                "responses": _answers("Etsi004CloseResult", "A missing, malformed or null key_stream_id"),
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
                    "source": {"type": "string", "pattern": "\\S",
                               "description": "The source application: its SAE ID or qkd://SAE_ID@node."},
                    "destination": {"type": "string", "pattern": "\\S",
                                    "description": "URI of the destination application."},
                    "qos": _ref("Etsi004Qos"),
                    "key_stream_id": {"anyOf": [_KSID, {"type": "null"}],
                                      "description": "The stream to join; null or all-zero: assign one (or pair with "
                                                     "the stream the other application opened alone)."},
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
