"""The OpenAPI 3.1 document of the node's HTTPS APIs (ETSI 014, the ETSI 004 REST form and
the quantum-as-a-service APIs), assembled from each service's part ({"paths": {...},
"components": {"schemas": {...}}}).

Served on the same mutual-TLS server as everything else (the TLS layer asks every
client for a certificate of the node's CA before any HTTP is read).
"""
from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

from sdqkd.agents.kms import web

PATH = "/openapi.json"

_ERROR = {
    "type": "object",
    "required": ["message"],
    "additionalProperties": False,
    "properties": {"message": {"type": "string"}},
    "description": "The ETSI GS QKD 014 Error object (clause 6.5) less its optional `details`, which "
    "no answer of this node carries (clients parsed its free-form objects in incompatible ways).",
}


def error(description: str, **extra: Any) -> dict[str, Any]:
    """A response whose body is the shared Error schema (an ETSI 014-style {"message"})."""
    return {"description": description, **extra,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def document(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One document from the services' parts; a path or schema defined twice is a bug."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {"Error": _ERROR}
    for part in parts:
        for key, value in part.get("paths", {}).items():
            if key in paths:
                raise ValueError(f"OpenAPI path {key} defined twice")
            paths[key] = value
        for key, value in part.get("components", {}).get("schemas", {}).items():
            if key in schemas and schemas[key] != value:
                raise ValueError(f"OpenAPI schema {key} defined twice")
            schemas[key] = value
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sdqkd key delivery and quantum as a service",
            "version": "1.0.0",
            "description": "Services of one sdqkd node. Every operation authenticates the caller by its "
            "TLS client certificate (the subject CN is the SAE ID), as ETSI GS QKD 014 does.",
        },
        "paths": copy.deepcopy(paths),
        "components": {
            "schemas": copy.deepcopy(schemas),
            "securitySchemes": {"mutualTLS": {"type": "mutualTLS"}},
        },
        "security": [{"mutualTLS": []}],
    }


def handler(doc: dict[str, Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.json_response(doc)

    return serve
