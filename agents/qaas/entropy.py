"""Entropy as a service: GET /api/v1/entropy?bytes=N on a node with a QRNG.

The bytes come from the node's QRNG driver (the emulated device at its modelled rate,
whose raw samples pass the SP 800-90B health tests of agents/emulation/health.py, or the
OS source). A source that failed its health tests delivers nothing: 503 until it is
repaired and its start-up tests pass; the alarm itself is the driver's qrng-status
event, sent as an sdqkd-qrng notification. No entropy byte is ever logged.
Only the node's own SAEs (kms.saes entries naming this node) get entropy: a caller that
is not an SAE (a KME certificate) is 401, an SAE of another node 403.
"""
from __future__ import annotations

import base64
import math
import re
import time
from typing import Any

from sdqkd.agents.kms import web

from sdqkd.agents.config import MAX_ENTROPY_REQUEST
from sdqkd.agents.drivers.qrng import QrngFailure
from sdqkd.agents.kms import https

from . import openapi
from .context import Context

PATH = "/api/v1/entropy"
DEFAULT_BYTES = 32
INTERMITTENT_GRACE = 0.25  # seconds a request waits for the start-up rerun after a failure
_INTEGER = re.compile(r"-?[0-9]{1,20}")


def openapi_part(max_bytes: int) -> dict[str, Any]:
    """This service's part of the OpenAPI document, for a node serving up to max_bytes."""
    return {
        "paths": {PATH: {"get": {
            "operationId": "getEntropy",
            "summary": "Random bytes from the node's quantum random number generator",
            "description": "Bytes from the QRNG, whose raw noise samples pass the continuous health tests "
            "of NIST SP 800-90B (repetition count, adaptive proportion) before conditioning.",
            "parameters": [{
                "name": "bytes", "in": "query", "required": False,
                "description": "How many bytes.",
                "schema": {"type": "integer", "minimum": 1, "maximum": max_bytes, "default": DEFAULT_BYTES},
            }],
            "responses": {
                "200": {"description": "The random bytes.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Entropy"}}}},
                "400": openapi.error("Bad query: bytes not an integer, out of range, given twice, "
                                     "or an unknown parameter."),
                "401": openapi.error("The caller's certificate is not an SAE's."),
                "403": openapi.error("The caller is not an SAE of this node."),
                "404": openapi.error("This node has no QRNG."),
                "503": openapi.error("The source failed its health tests (no bytes until it is repaired), "
                                     "or could not produce the bytes in time.",
                                     headers={"Retry-After": {"description": "Seconds until the bytes can be produced "
                                                              "(rate limit only).",
                                                              "schema": {"type": "integer", "minimum": 1}}}),
            },
        }}},
        "components": {"schemas": {"Entropy": {
            "type": "object",
            "required": ["bytes", "entropy", "source"],
            "additionalProperties": False,
            "properties": {
                "bytes": {"type": "integer", "minimum": 1, "maximum": max_bytes},
                "entropy": {"type": "string", "contentEncoding": "base64",
                            "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
                            "minLength": 4, "maxLength": 4 * math.ceil(max_bytes / 3)},
                "source": {"type": "string", "enum": ["emulated", "os"],
                           "description": "emulated QRNG device or the operating system's source"},
            },
        }}},
    }


OPENAPI = openapi_part(MAX_ENTROPY_REQUEST)


def openapi_for(ctx: Context) -> dict[str, Any]:
    """The part with this node's limit."""
    return openapi_part(_limit(ctx))


def _limit(ctx: Context) -> int:
    return ctx.cfg.qrng.max_request_bytes if ctx.cfg.qrng is not None else MAX_ENTROPY_REQUEST


def requested_bytes(query: Any, limit: int) -> int:
    """N from the query string, or 400 with why not."""
    unknown = sorted(set(query) - {"bytes"})
    if unknown:
        raise https.ApiError(400, f"unknown query parameter(s): {', '.join(n[:40] for n in unknown[:5])}")
    value = https.query_one(query, "bytes", quote=True)
    if value is None:
        return DEFAULT_BYTES
    if not _INTEGER.fullmatch(value):
        raise https.ApiError(400, f"'bytes' must be an integer from 1 to {limit}")
    n = int(value)
    if not 1 <= n <= limit:
        raise https.ApiError(400, f"'bytes' must be from 1 to {limit}, got {n}")
    return n


def read(qrng: Any, n: int, timeout: float) -> bytes:
    """n bytes from the QRNG. A health-test failure that the start-up rerun clears within
    INTERMITTENT_GRACE (a false alarm, which alpha = 2^-20 per sample makes about one in
    a few million samples) costs the request a short wait, not a 503; a persistent one
    raises QrngFailure. The alarm and the recovery are notified either way."""
    deadline = time.monotonic() + timeout
    try:
        return qrng.read(n, timeout)
    except QrngFailure:
        grace = time.monotonic() + INTERMITTENT_GRACE
        while time.monotonic() < grace:
            time.sleep(0.01)
            if qrng.state()["qrng"]["status"] == "ENABLED":
                return qrng.read(n, max(0.1, deadline - time.monotonic()))
        raise


def add_routes(app: web.Application, ctx: Context) -> None:
    limit = _limit(ctx)

    k = ctx.cfg.kms
    own = frozenset(sae for sae, qid in (k.saes.items() if k is not None else ()) if qid.lower() == ctx.cfg.node.qkdn_id.lower())

    async def get_entropy(request: web.Request) -> web.Response:
        sae = https.sae_of(request)
        if sae not in own:
            raise https.ApiError(403, f"SAE '{sae[:64]}' is not an application of this node")
        n = requested_bytes(request.query, limit)
        qrng = ctx.qrng
        if qrng is None:
            raise https.ApiError(404, "this node has no QRNG")
        rate = getattr(qrng, "rate", None)
        try:
            data = await https.call(request, read, qrng, n, 2.0 + (8 * n / rate if rate else 0.0))
        except QrngFailure as exc:
            raise https.ApiError(503, f"entropy source unavailable: {exc}") from None
        except TimeoutError:
            resp = https.error(503, f"the QRNG did not produce {n} bytes in time, try again")
            resp.headers["Retry-After"] = str(max(1, math.ceil(8 * n / rate))) if rate else "1"
            return resp
        return web.json_response({"bytes": n, "entropy": base64.b64encode(data).decode("ascii"),
                                  "source": qrng.source})

    app.add_routes([web.get(PATH, get_entropy, allow_head=False)])
