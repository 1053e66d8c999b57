"""The HTTPS server the key-delivery front ends (ETSI GS QKD 014, 004) share.

The agent is thread-based (NETCONF server, drivers), so the aiohttp application runs in
its own thread with its own asyncio loop (`HttpsServer`). Every request is
authenticated by its TLS client certificate: the SAE ID is the certificate's subject CN
(pki.sae_id_of), never anything in the URL or body.
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
  default), then send each request head, and each request body, within as long again;
  a connection idle between requests is closed after it too. A closing connection waits
  at most min(5 s, header_timeout) more for the client's TLS close_notify. Nothing else
  holds a connection open: 600 half-open or trickling connections were all closed at
  the bound (tests/agents/test_abuse.py).
- at most `max_connections` (512) TCP connections are open at once, handshakes
  included; past it a new one is closed on accept, before any TLS work. No connection
  has a thread of its own: one event loop serves them all.
- a request body is at most aiohttp's client_max_size (1 MiB); JSON in it nesting deeper
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
import threading
import traceback
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web
from multidict import MultiMapping

from sdqkd.listen import binding

from sdqkd.pki import sae_id_of
from .interface import KmsError
from .keystore import is_store_failure

log = logging.getLogger(__name__)
T = TypeVar("T")

SAE_ID = web.RequestKey("sdqkd.sae_id", str)  # the authenticated caller
_EXECUTOR = web.AppKey("sdqkd.executor", ThreadPoolExecutor)
_LIMIT = web.AppKey("sdqkd.limit", asyncio.Semaphore)
_BODY_TIMEOUT = web.AppKey("sdqkd.body_timeout", float)  # set by HttpsServer
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request the front end refuses before it reaches the LKMS (bad format, auth)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def query_one(query: MultiMapping[str], name: str, quote: bool = False) -> str | None:
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


def sae_of(request: web.Request) -> str:
    """The SAE ID from the caller's verified client certificate."""
    return request[SAE_ID]


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
# aiohttp's client_max_size (1 MiB); within it, nesting deeper than MAX_JSON_DEPTH or a
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
    """The request body as a JSON object; an empty body counts as {}. Else 400.

    The body must arrive within the server's request timeout (HttpsServer): a client
    trickling it byte by byte is answered 408 rather than holding the connection."""
    timeout = request.app.get(_BODY_TIMEOUT)
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s") from None
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
        request[SAE_ID] = _peer_sae(request.transport)
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


def _peer_sae(transport: asyncio.BaseTransport | None) -> str:
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        raise ApiError(401, "a client certificate is required")
    try:
        return sae_id_of(cert)
    except ValueError as exc:
        raise ApiError(401, str(exc)) from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return "not UTF-8" if isinstance(exc, UnicodeDecodeError) else type(exc).__name__


DEFAULT_HEADER_TIMEOUT = 10.0  # s: TLS handshake, request head, request body, idle keep-alive
DEFAULT_MAX_CONNECTIONS = 512  # TCP connections open at once, handshakes included
_MAX_SHUTDOWN = 5.0  # s a closing TLS connection waits for the client's close_notify


class _BoundedSite(web.BaseSite):
    """aiohttp's TCPSite with bounds on what a client may hold without asking anything.

    Every accepted TCP connection first meets `_Gate`: past `max_connections` open ones
    (TLS handshakes included) it is closed at once, before any TLS work (no thread is
    ever spent on a connection: the loop serves them all). Otherwise it is upgraded to
    TLS with asyncio's own handshake timeout (loop.start_tls), which TCPSite does not let
    one set (asyncio's default is 60 s), and handed to aiohttp's request handler, whose
    keepalive_timeout (HttpsServer) then bounds the wait for each request head, the first
    one included (aiohttp arms it at connection_made: a client trickling a head a byte a
    second is closed all the same)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, ssl_ctx: ssl.SSLContext, *,
                 handshake_timeout: float, max_connections: int) -> None:
        super().__init__(runner, ssl_context=ssl_ctx)
        self._host, self._port = host, port
        self._handshake_timeout = handshake_timeout
        self._shutdown_timeout = min(_MAX_SHUTDOWN, handshake_timeout)
        self.max_connections = max_connections
        self._open: set[asyncio.Transport] = set()  # raw TCP transports, pruned when full
        self._pruned = 0.0
        self._handshakes: set[asyncio.Task[None]] = set()
        self.refused = 0  # connections closed at accept, over the limit
        self._refusing = False

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    def open_connections(self) -> int:
        self._open = {t for t in self._open if not t.is_closing()}
        return len(self._open)

    def abort_all(self) -> None:
        """At the very end (after the runner's cleanup): drop every connection still there,
        e.g. TLS closes waiting for the client's close_notify."""
        for raw in self._open:
            raw.abort()  # nothing for one already gone
        self._open.clear()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Gate(self), self._host, self._port, backlog=self._backlog)

    async def stop(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().stop()

    def admit(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        if len(self._open) >= self.max_connections and loop.time() - self._pruned > 0.05:
            self._pruned = loop.time()  # at most 20 scans a second while full
            self.open_connections()
        if len(self._open) >= self.max_connections:
            raw.abort()
            self.refused += 1
            if not self._refusing:
                self._refusing = True
                log.warning("%s: %d connections open, refusing new ones", self.name, len(self._open))
            return
        if self._refusing:
            self._refusing = False
            log.warning("%s: accepting connections again (%d refused so far)", self.name, self.refused)
        self._open.add(raw)
        raw.pause_reading()  # nothing is read before start_tls takes the transport
        task = loop.create_task(self._serve(raw))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _serve(self, raw: asyncio.Transport) -> None:
        first = _Handover()
        try:
            tls = await asyncio.get_running_loop().start_tls(
                raw, first, self._ssl_context, server_side=True,
                ssl_handshake_timeout=self._handshake_timeout, ssl_shutdown_timeout=self._shutdown_timeout)
        except Exception as exc:  # noqa: BLE001 - timed out, bad certificate, reset: start_tls closed it
            log.debug("TLS handshake with %s failed: %s", raw.get_extra_info("peername"), exc)
            return
        server = self._runner.server
        if server is not None:
            first.hand_over(server(), tls)
        else:
            tls.abort()


class _Gate(asyncio.Protocol):
    """The first protocol of an accepted TCP connection: `_BoundedSite.admit` takes it."""

    def __init__(self, site: _BoundedSite) -> None:
        self._site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._site.admit(transport)  # type: ignore[arg-type]


class _Handover(asyncio.Protocol):
    """A TLS connection's protocol from the end of its handshake until aiohttp's handler
    takes it: a request sent along with the client's last handshake message is kept."""

    def __init__(self) -> None:
        self._data: list[bytes] = []
        self._eof = False
        self._lost = False

    def data_received(self, data: bytes) -> None:
        self._data.append(data)

    def eof_received(self) -> None:
        self._eof = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True

    def hand_over(self, handler: asyncio.Protocol, tls: asyncio.Transport) -> None:
        if self._lost:
            return
        tls.set_protocol(handler)
        handler.connection_made(tls)
        for data in self._data:
            handler.data_received(data)
        if self._eof:
            handler.eof_received()


class HttpsServer:
    """Serves `app` over TLS on host:port from a thread of its own (port 0: any free one).

    Bounded under abuse (see the module docstring): a TLS handshake, a request head (the
    first or a later one on a kept-alive connection) and a request body each have
    `header_timeout` s; at most `max_connections` TCP connections are open at once."""

    def __init__(self, app: web.Application, host: str, port: int, ssl_ctx: ssl.SSLContext, *,
                 access_log: bool = False, shutdown_timeout: float = 2.0, role: str = "HTTPS",
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.app, self.host, self._port, self.ssl_ctx = app, host, port, ssl_ctx
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.site: _BoundedSite | None = None
        self.role = role  # what a bind failure calls this server
        self._access_log = access_log
        self._shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        """The bound port (known once start() returned)."""
        return self._port

    def start(self, timeout: float = 10.0) -> HttpsServer:
        """Listen, or raise what stopped it (e.g. port in use); returns self."""
        self._thread = threading.Thread(target=self._run, name=f"https-{self.host}:{self._port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"HTTPS server on {self.host}:{self._port} did not start in {timeout} s")
        if self._failure is not None:
            self._thread.join(timeout)
            raise self._failure
        return self

    def stop(self) -> None:
        """Stop listening, let requests in progress finish (up to shutdown_timeout), join."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self._shutdown_timeout + 5)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        if not self.app.frozen:  # (an app served before keeps the bound it had)
            self.app[_BODY_TIMEOUT] = self.header_timeout
        # keepalive_timeout: aiohttp closes a connection that has not sent a whole request
        # head that long after it came up or after its last answer.
        runner = web.AppRunner(self.app, access_log=log if self._access_log else None,
                               shutdown_timeout=self._shutdown_timeout, keepalive_timeout=self.header_timeout)
        try:
            loop.run_until_complete(runner.setup())
            site = self.site = _BoundedSite(runner, self.host, self._port, self.ssl_ctx,
                                            handshake_timeout=self.header_timeout, max_connections=self.max_connections)
            with binding(self.role, self.host, self._port):
                loop.run_until_complete(site.start())
            self._port = runner.addresses[0][1]
        except BaseException as exc:  # reported to start()'s caller
            self._failure = exc
            loop.run_until_complete(runner.cleanup())
            loop.close()
            self._ready.set()
            return
        self._loop = loop
        self._ready.set()
        log.info("ETSI key delivery listening on https://%s:%d", self.host, self._port)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            site.abort_all()
            loop.run_until_complete(asyncio.sleep(0))  # their connection_lost callbacks
            loop.close()
