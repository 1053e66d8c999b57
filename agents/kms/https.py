"""The HTTPS server the key-delivery front ends (ETSI GS QKD 014, 004) share.

The agent is thread-based (NETCONF server, drivers), so the HTTP server (agents/kms/web.py, on h11) runs in
its own thread with its own asyncio loop (`HttpsServer`). Every request is
authenticated by its TLS client certificate: the SAE ID is the certificate's subject CN
(pki.sae_id_of), never anything in the URL or body. Only an SAE certificate (pki.role_of:
clientAuth, no serverAuth, no KME marker; issued by the SAE CA when `trust` set it) is an
SAE (`sae_of`); a KME certificate (KME marker, issued by the KME CA) is a KME (`kme_of`,
for the agent-to-agent calls of the IPsec service) and fetches no key: 401. The TLS layer
admits only what the server context trusts (node.py: the SAE CA, and the KME CA only on a
node whose IPsec peers call it).
Calls into the synchronous KeyService that may wait on the network (a relay, a peer's
reservation) go through a bounded thread pool (`call`), so they do not stall the loop;
calls that only touch this node's key store run on the loop itself (`inline=True`):
the thread hop and the GIL hand-over cost more than the SQLite transaction they wrap.
Inline calls that arrive in the same loop iteration share one transaction (group
commit, `use_group_commit`), and none of them is answered before it is committed.
Every error is JSON {"message": ...} and nothing else: the ETSI 014 Error object less
its optional `details` (an array of free-form objects that clients parsed in
incompatible ways, so it is not sent; a KmsError may still carry details for the
server's own use, e.g. the ETSI 004 counter-offer). An unexpected exception becomes 503 {"message": "internal error"} with its traceback
logged but never its message (it might quote key bytes).

Bounded under abuse (limits in the agent config's kms section, agents/config.py):
- a TCP connection must finish its TLS handshake within `header_timeout` (10 s by
  default), then send each request head, and each request body, within as long again
  (a trickled body is 408); a connection idle between requests is closed after it too
  (agents/kms/web.py Limits). Nothing else holds a connection open: 600 half-open or
  trickling connections were all closed at the bound (tests/agents/test_abuse.py).
- at most `max_connections` (512) TCP connections are open at once, handshakes
  included; past it a new one is closed on accept, before any TLS work. No connection
  has a thread of its own: one event loop serves them all.
- a request body is at most 1 MiB (413); JSON in it nesting deeper
  than MAX_JSON_DEPTH (32) or with a number longer than MAX_NUMBER_CHARS (64), or NaN,
  Infinity or a float out of range, is 400 before anything is built (parse_json, the one
  place request JSON is parsed).
- a key store that fails (disk full, I/O error, locked too long) is 503
  {"message": "key store unavailable"}, logged once per outage, with no traceback.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import ssl
import traceback
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sdqkd.listen import binding

from sdqkd import pki
from . import web

from sdqkd.pki import sae_id_of
from .interface import KmsError
from .keystore import is_store_failure
from .loopthread import LoopThread

log = logging.getLogger(__name__)
T = TypeVar("T")

SAE_ID = web.RequestKey("sdqkd.sae_id", str)  # the authenticated caller (deprecated: use sae_of)
_PEER = web.RequestKey("sdqkd.peer", tuple)  # (role, id) of the authenticated caller
_TRUST = web.AppKey("sdqkd.trust", dict)  # role -> the CA file that must have issued its certificates
_EXECUTOR = web.AppKey("sdqkd.executor", ThreadPoolExecutor)
_LIMIT = web.AppKey("sdqkd.limit", asyncio.Semaphore)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request the front end refuses before it reaches the LKMS (bad format, auth)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def query_one(query: web.Query, name: str, quote: bool = False) -> str | None:
    """A query parameter given at most once (None when absent), or 400: a repeated
    parameter is ambiguous, and taking the first or the last would hide a client bug."""
    values = query.getall(name, [])
    if len(values) > 1:
        raise ApiError(400, f"{f'{name!r}' if quote else name} is given more than once")
    return values[0] if values else None


def canonical_uuid(value: Any, name: str) -> str:
    """A request's UUID field (key_ID, key_stream_id...) in canonical form, the key
    store's, or 400 naming the field."""
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(400, f"{name} is not a UUID: {value[:64]!r}") from None


def error(status: int, message: str) -> web.Response:
    """ETSI 014 Error object (clause 6.5) with `message` only: its `details` array of
    free-form objects was read differently by each client, so no answer carries it."""
    return web.json_response({"message": message}, status=status)


def openapi_error(description: str) -> dict[str, Any]:
    """An OpenAPI response whose body is the Error schema (`error` above), for the parts of
    /openapi.json the key-delivery front ends contribute (agents/qaas/openapi.py defines it)."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def make_app(*, workers: int = 8, max_pending: int = 256) -> web.Application:
    """An application with the error and client-certificate middlewares and the LKMS pool.

    At most `workers` LKMS calls run at once; past `max_pending` waiting requests the
    server answers 503 at once rather than queueing without bound.
    """
    app = web.Application(middlewares=[_guard])
    app[_EXECUTOR] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kms-api")
    app[_LIMIT] = asyncio.Semaphore(max_pending)

    async def _shutdown(app: web.Application) -> None:
        app[_EXECUTOR].shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(_shutdown)
    return app


class GroupCommit:
    """Runs the inline calls of one loop iteration in one store transaction, then answers them.

    A call that fails gets its own error (its savepoint is undone); if the commit
    fails, every call of the group gets that error and none of their results leaves.
    """

    def __init__(self, group: Callable[[], AbstractContextManager[Any]]) -> None:
        self._group = group
        self._queue: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []

    def submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, args, fut))
        if len(self._queue) == 1:
            loop.call_soon(self._run)
        return fut

    def _run(self) -> None:
        queue, self._queue = self._queue, []
        done: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        try:
            with self._group():
                for fn, args, fut in queue:
                    try:
                        done.append((fut, None, fn(*args)))
                    except Exception as exc:  # noqa: BLE001 - the caller's own error
                        done.append((fut, exc, None))
        except Exception as exc:  # noqa: BLE001 - the commit failed: nothing of the group was stored
            done = [(fut, exc, None) for _, _, fut in queue]
        for fut, exc, result in done:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)


_GROUP = web.AppKey("sdqkd.group_commit", GroupCommit)


def use_group_commit(app: web.Application, group: Callable[[], AbstractContextManager[Any]]) -> None:
    """Commit the app's inline calls in groups (`group()`: one transaction of the store)."""
    if _GROUP not in app:
        app[_GROUP] = GroupCommit(group)


def trust(app: web.Application, *, sae_ca: str | None, kme_ca: str | None) -> None:
    """Callers are SAEs only with a certificate `sae_ca` issued, KMEs only with one `kme_ca`
    issued (on top of the role their extended key usages give, pki.role_of)."""
    app[_TRUST] = {"sae": sae_ca, "kme": kme_ca}


def sae_of(request: web.Request) -> str:
    """The SAE ID from the caller's verified client certificate; 401 if it is not an SAE's."""
    role, ident = request[_PEER]
    if role != "sae":
        raise ApiError(401, "an SAE client certificate is required (a KME certificate gets no key)")
    return ident


def kme_of(request: web.Request) -> str:
    """The KME ID (qkdn_id) from the caller's verified KME certificate; 401 if it is not a KME's."""
    role, ident = request[_PEER]
    if role != "kme":
        raise ApiError(401, "a KME client certificate is required")
    return ident


async def call(request: web.Request, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
    """Run a synchronous KeyService call on the app's bounded pool, or on the loop if `inline`.

    `inline` is for calls that cannot wait long (key store only, no network): the
    loop serves one at a time, so they need no slot in the pool.
    """
    limit = request.app[_LIMIT]
    if limit.locked():
        raise ApiError(503, "too many requests in progress, try again")
    if inline:
        group = request.app.get(_GROUP)
        return fn(*args) if group is None else await group.submit(fn, args)
    async with limit:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(request.app[_EXECUTOR], functools.partial(fn, *args))


# Hostile JSON (see the module docstring): a request body is at most
# 1 MiB (web.Application.client_max_size); within it, nesting deeper than MAX_JSON_DEPTH or a
# number longer than MAX_NUMBER_CHARS is 400 before any of it is built. Python's own
# parser would recurse 100,000 levels deep into a RecursionError (a 503), turn a
# 5,000-digit integer into a ValueError, and a 400-digit float or 1e999 into inf.
MAX_JSON_DEPTH = 32  # no request of these APIs nests more than 4 levels
MAX_NUMBER_CHARS = 64  # a uint32 needs 10; a float with its exponent well under 64
# A JSON string, or an unterminated one to the end of the body: one pass, no backtracking.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.?)*+(?:"|\Z)', re.DOTALL)
_OPEN_CLOSE = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class _Hostile(ValueError):
    """A body refused for its shape, not its syntax."""


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in `raw` nest deeper than `limit`, at the cost of a few
    passes of C over the body (strings are taken out first: a "[" in one is no nesting).

    Each pass deletes the innermost "()" pairs, one level; what is left after `limit`
    passes nests deeper. What does not balance is no JSON (the parser says where), but
    its unclosed brackets nest too: more than `limit` of them is refused here as well, so
    the parser never goes deeper than twice the limit."""
    brackets = _JSON_STRING.sub(b"", raw).translate(_OPEN_CLOSE, _NOT_BRACKET)
    if b"(" * (limit + 1) in brackets:  # the plain attack: [[[[... or {"a":{"a":...
        return True
    for _ in range(limit):
        if not brackets:
            return False
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):  # unbalanced: ")))(((" is left
            return brackets.count(b"(") > limit
        brackets = shorter
    return bool(brackets)


def _number(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise _Hostile(f"a number longer than {MAX_NUMBER_CHARS} characters")
        value = convert(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise _Hostile("a number out of range")
        return value
    return parse


def _constant(name: str) -> Any:
    raise _Hostile(f"{name} is not JSON")  # Python's json takes NaN, Infinity, -Infinity


def parse_json(raw: bytes | str) -> Any:
    """`raw` as JSON, within the limits above; ApiError 400 {"message"} otherwise. The one
    place a JSON request body is parsed (json_object)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw, parse_int=_number(int), parse_float=_number(float), parse_constant=_constant)
    except _Hostile as exc:
        raise ApiError(400, f"request body refused: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"request body is not valid JSON: {_reason(exc)}") from None
    except RecursionError:  # not reached within MAX_JSON_DEPTH; kept so that it never is a 503
        raise ApiError(400, "request body nests too deeply") from None


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; an empty body counts as {}. Else 400. (The
    server read the body within its body timeout before the handler ran: web.Server.)"""
    raw = await request.read()
    if not raw.strip():
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Client-certificate authentication, and every error as a JSON Error object."""
    try:
        role, ident = _peer_sae(request.transport, request.app.get(_TRUST))
        request[_PEER] = (role, ident)
        if role == "sae":
            request[SAE_ID] = ident
        return await handler(request)
    except ApiError as exc:
        return error(exc.status, exc.message)
    except KmsError as exc:
        return error(exc.http_status, exc.message)
    except web.HTTPException as exc:  # unknown path, wrong method, body too large...
        if exc.status < 400:
            raise
        resp = error(exc.status, exc.reason)
        if "Allow" in exc.headers:  # 405 says which methods would do
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except Exception as exc:
        if is_store_failure(exc):  # disk full, I/O error, locked too long: the store logs the outage once
            log.debug("%s %s: key store unavailable (%s)", request.method, request.path, type(exc).__name__)
            return error(503, "key store unavailable")
        tb = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unexpected %s in %s %s\n%s", type(exc).__name__, request.method, request.path, tb)
        return error(503, "internal error")


def _peer_sae(transport: asyncio.BaseTransport | None, trusted: dict[str, str | None] | None = None) -> tuple[str, str]:
    """("sae" | "kme", ID) of the caller's verified certificate, else 401."""
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        raise ApiError(401, "a client certificate is required")
    role, ident = pki.role_of(der)
    if not ident:
        try:
            sae_id_of(der)  # says why
        except ValueError as exc:
            raise ApiError(401, str(exc)) from None
    if role is None:
        raise ApiError(401, "the client certificate is not an SAE's (extended key usage: clientAuth only)")
    ca = (trusted or {}).get(role)
    if trusted is not None and (ca is None or not pki.issued_by(der, ca)):
        raise ApiError(401, f"the client certificate is not from this node's {role.upper()} CA")
    return role, ident.lower() if role == "kme" else ident


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return "not UTF-8" if isinstance(exc, UnicodeDecodeError) else type(exc).__name__


class HttpsServer(LoopThread):
    """Serves `app` over TLS on host:port from a thread of its own (port 0: any free one)."""

    thread_prefix = "https"

    def __init__(self, app: web.Application, host: str, port: int, ssl_ctx: ssl.SSLContext, *,
                 access_log: bool = False, shutdown_timeout: float = 2.0, role: str = "HTTPS",
                 limits: web.Limits = web.Limits()) -> None:
        self.app, self.host, self._port, self.ssl_ctx = app, host, port, ssl_ctx
        self.role = role  # what a bind failure calls this server
        self.limits = limits
        self.server: web.Server | None = None
        self._access_log = access_log
        self._shutdown_timeout = shutdown_timeout
        self._init_thread()

    def stop(self) -> None:
        """Stop listening, let requests in progress finish (up to shutdown_timeout), join."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self._shutdown_timeout + 5)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = web.Server(self.app, self.limits, log if self._access_log else None)
        try:
            with binding(self.role, self.host, self._port):
                self._port = loop.run_until_complete(server.start(self.host, self._port, self.ssl_ctx))
        except BaseException as exc:  # reported to start()'s caller
            loop.run_until_complete(self.app.cleanup())
            loop.close()
            self._failed(exc)
            return
        self.server = server
        self._listening(loop)
        log.info("%s listening on https://%s:%d", "ETSI key delivery" if self.role == "HTTPS" else self.role, self.host, self._port)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(server.stop(self._shutdown_timeout))
            loop.run_until_complete(self.app.cleanup())
            loop.close()
