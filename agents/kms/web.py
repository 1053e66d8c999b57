"""The HTTP/1.1 layer of the key-delivery front ends: h11 for the protocol, asyncio for
the sockets, and the little routing the ETSI 014/004 and QaaS handlers need.

Why not aiohttp (used before): importing aiohttp.web costs ~16 MB of an agent's resident
memory (its HTTP stack, multidict, yarl and their caches), a third of the idle agent's
budget, for six route shapes; and it offered no bound on how long a connection may
take to send its first request head (200 half-open TLS connections stayed open over
130 s). h11 (the HTTP/1.1 state machine httpx and Hypercorn are built on) does the
parsing and framing; what is left here is dispatch and timeouts:

- a request head must arrive within `head_timeout` of the connection (or of the
  previous answer, on a kept-alive connection), else the connection is closed; a body
  within `body_timeout`, else 408 and the connection is closed;
- at most `max_connections` connections; one more is closed at once;
- bodies over `max_body` are 413, malformed requests 400, unknown paths 404, other
  methods 405 with Allow; HEAD is answered for GET routes that allow it.

The API is the subset of aiohttp.web the handlers used (Request.query/match_info/app/
transport/read(), json_response, get/post route definitions, middlewares), so a handler
reads the same as before.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, unquote

import h11

log = logging.getLogger(__name__)
T = TypeVar("T")


class AppKey(Generic[T]):
    """A typed key of Application (and Request) storage."""

    def __init__(self, name: str, t: type[T] | Any = None) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<AppKey {self.name}>"


RequestKey = AppKey


class HTTPException(Exception):
    """An HTTP error answer raised by the routing (404, 405, 413...)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


class Query:
    """A query string's parameters in order, a name possibly repeated."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def getall(self, name: str, default: Any = None) -> list[str]:
        got = [v for k, v in self._pairs if k == name]
        if not got and default is not None:
            return default
        return got

    def get(self, name: str, default: str | None = None) -> str | None:
        return next((v for k, v in self._pairs if k == name), default)

    def __getitem__(self, name: str) -> str:
        for k, v in self._pairs:
            if k == name:
                return v
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(k == name for k, _ in self._pairs)

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def keys(self) -> list[str]:
        return [k for k, _ in self._pairs]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._pairs)


class Request:
    """One HTTP request as the handlers see it."""

    def __init__(self, app: Application, method: str, target: str, headers: dict[str, str], body: bytes,
                 transport: asyncio.BaseTransport | None) -> None:
        self.app, self.method, self.headers, self.transport = app, method, headers, transport
        path, _, qs = target.partition("?")
        self.raw_path = path
        self.path = unquote(path)
        self.query = Query(parse_qsl(qs, keep_blank_values=True))
        self.match_info: dict[str, str] = {}
        self.route: str | None = None  # the matched route's pattern ("/api/v1/keys/{slave_SAE_ID}/status"), once resolved
        self._body = body
        self._store: dict[Any, Any] = {}

    async def read(self) -> bytes:
        return self._body

    def __getitem__(self, key: Any) -> Any:
        return self._store[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._store[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._store.get(key, default)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    # A body sent as it is produced (chunked; server-sent events): `body` is then unused.
    stream: AsyncIterator[bytes] | None = None


StreamResponse = Response


def json_response(data: Any, *, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(), {}, "application/json; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]
Middleware = Callable[[Request, Handler], Awaitable[Response]]


def middleware(fn: Middleware) -> Middleware:
    """Marks an aiohttp-style middleware (request, handler) -> response."""
    return fn


@dataclass(frozen=True)
class RouteDef:
    method: str
    path: str
    handler: Handler
    allow_head: bool = True

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))


def get(path: str, handler: Handler, *, allow_head: bool = True) -> RouteDef:
    return RouteDef("GET", path, handler, allow_head)


def post(path: str, handler: Handler) -> RouteDef:
    return RouteDef("POST", path, handler, False)


def delete(path: str, handler: Handler) -> RouteDef:
    return RouteDef("DELETE", path, handler, False)


def put(path: str, handler: Handler) -> RouteDef:
    return RouteDef("PUT", path, handler, False)


def any_method(path: str, handler: Handler) -> RouteDef:
    """Every method (the handler answers 405 itself); a last path part "{name*}" takes
    the rest of the path, possibly empty (RESTCONF's api-paths)."""
    return RouteDef("*", path, handler, False)


class Application:
    """Routes, middlewares, shared objects (by AppKey) and cleanup hooks."""

    def __init__(self, *, middlewares: Iterable[Middleware] = (), client_max_size: int = 1024**2) -> None:
        self.middlewares = list(middlewares)
        self.client_max_size = client_max_size
        self.on_cleanup: list[Callable[[Application], Awaitable[None]]] = []
        self._routes: list[RouteDef] = []
        self._store: dict[Any, Any] = {}

    def add_routes(self, routes: Iterable[RouteDef]) -> None:
        self._routes.extend(routes)

    def __getitem__(self, key: Any) -> Any:
        return self._store[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._store[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._store

    def get(self, key: Any, default: Any = None) -> Any:
        return self._store.get(key, default)

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler for (method, decoded path) and its path parameters; 404/405 if none."""
        route, params = self.route_of(method, path)
        return route.handler, params

    def route_of(self, method: str, path: str) -> tuple[RouteDef, dict[str, str]]:
        """The route for (method, decoded path) and its path parameters; 404/405 if none."""
        parts = tuple(path.strip("/").split("/"))
        allowed: list[str] = []
        for route in self._routes:
            params = _match(route.parts, parts)
            if params is None:
                continue
            if route.method in (method, "*") or (method == "HEAD" and route.method == "GET" and route.allow_head):
                return route, params
            allowed.append(route.method)
            if route.method == "GET" and route.allow_head:
                allowed.append("HEAD")
        if allowed:
            raise HTTPException(405, "Method Not Allowed", {"Allow": ",".join(sorted(set(allowed)))})
        raise HTTPException(404, "Not Found")

    async def handle(self, request: Request) -> Response:
        async def endpoint(req: Request) -> Response:
            route, req.match_info = self.route_of(req.method, req.path)
            req.route = route.path
            return await route.handler(req)

        chain: Handler = endpoint
        for mw in reversed(self.middlewares):
            chain = _bind(mw, chain)
        return await chain(request)

    async def cleanup(self) -> None:
        for hook in self.on_cleanup:
            try:
                await hook(self)
            except Exception:  # noqa: BLE001 - one hook's failure does not keep the others from running
                log.exception("cleanup hook failed")


def _bind(mw: Middleware, inner: Handler) -> Handler:
    async def run(request: Request) -> Response:
        return await mw(request, inner)
    return run


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> dict[str, str] | None:
    if pattern and pattern[-1].startswith("{") and pattern[-1].endswith("*}"):
        head = len(pattern) - 1
        fixed = _match(pattern[:head], parts[:head]) if len(parts) >= head else None
        if fixed is None:
            return None
        return {**fixed, pattern[-1][1:-2]: "/".join(parts[head:])}
    if len(pattern) != len(parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, parts):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


@dataclass(frozen=True)
class Limits:
    """How long and how much one client may take (see the module docstring)."""

    head_timeout: float = 10.0
    body_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_connections: int = 512
    max_head: int = 16 * 1024


_REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
            403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
            413: b"Request Entity Too Large", 503: b"Service Unavailable", 304: b"Not Modified",
            406: b"Not Acceptable", 409: b"Conflict", 412: b"Precondition Failed", 415: b"Unsupported Media Type",
            500: b"Internal Server Error", 501: b"Not Implemented"}


class Server:
    """Serves an Application on an asyncio server; one task per connection, no thread."""

    def __init__(self, app: Application, limits: Limits = Limits(), access_log: logging.Logger | None = None) -> None:
        self.app, self.limits, self.access_log = app, limits, access_log
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()  # waiting for a request head
        self._closing = False
        self._full = False  # at max_connections (logged once until under 90 % again)
        self.ssl_ctx: ssl.SSLContext | None = None
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> int:
        """Listen; the bound port. TLS starts per connection (`_Gate`), so the connection
        limit counts connections still in their handshake too."""
        self.ssl_ctx = ssl_ctx
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Gate(self), host, port, backlog=256)
        return self.server.sockets[0].getsockname()[1]

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def stop(self, grace: float) -> None:
        """Stop accepting; idle connections are closed at once (a kept-alive client opens a
        new one to whoever listens next), the others get `grace` seconds to finish their
        request and are closed after its answer."""
        self._closing = True
        if self.server is not None:
            self.server.close()
        for t in list(self._idle):
            t.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    def _admit(self, transport: asyncio.Transport) -> None:
        """A TCP connection came in: over the limit it is closed at once (no TLS work),
        else its TLS handshake and then its requests run in a task of its own."""
        if len(self._tasks) >= self.limits.max_connections or self._closing:
            if not self._full and not self._closing:
                self._full = True
                log.warning("%d connections open, the limit: refusing new ones", len(self._tasks))
            transport.abort()
            return
        if self._full and len(self._tasks) < self.limits.max_connections * 9 // 10:
            self._full = False
            log.warning("%d connections open: accepting connections again", len(self._tasks))
        transport.pause_reading()  # nothing is read before TLS takes the connection over
        task = asyncio.get_running_loop().create_task(self._connection(transport))
        self._tasks.add(task)

    async def _connection(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        transport: asyncio.BaseTransport = raw
        reader = asyncio.StreamReader(limit=self.limits.max_head, loop=loop)
        proto = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            if self.ssl_ctx is not None:
                transport = await loop.start_tls(raw, proto, self.ssl_ctx, server_side=True,
                                                 ssl_handshake_timeout=self.limits.handshake_timeout,
                                                 ssl_shutdown_timeout=min(5.0, self.limits.handshake_timeout))
            else:
                raw.set_protocol(proto)
                raw.resume_reading()
            proto.connection_made(transport)
            writer = asyncio.StreamWriter(transport, proto, reader, loop)  # type: ignore[arg-type]
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            self._idle.discard(task)  # type: ignore[arg-type]
            if self._closing or transport.is_closing() or transport is raw:
                raw.abort()
                if transport is not raw:
                    transport.abort()  # type: ignore[attr-defined]
            else:
                transport.close()  # a FIN after the TLS close_notify: the client can tell it from a reset

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        task = asyncio.current_task()
        while True:
            if self._closing:
                return
            if task is not None:
                self._idle.add(task)
            try:
                head = await self._next(conn, reader, self.limits.head_timeout, idle=task)
            except h11.RemoteProtocolError as exc:
                await self._error(conn, writer, exc.error_status_hint or 400, "malformed HTTP request")
                return
            self._idle.discard(task)  # type: ignore[arg-type]
            if head is None or isinstance(head, h11.ConnectionClosed):
                return
            assert isinstance(head, h11.Request)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            try:
                body = await self._body(conn, reader, writer, headers)
            except h11.RemoteProtocolError:
                await self._error(conn, writer, 400, "malformed HTTP request body")
                return
            except HTTPException as exc:
                await self._error(conn, writer, exc.status, exc.reason)
                return
            request = Request(self.app, head.method.decode("ascii", "replace"), head.target.decode("latin-1"),
                              headers, body, writer.transport)
            try:
                response = await self.app.handle(request)
            except HTTPException as exc:  # an app without the error middleware
                response = json_response({"message": exc.reason}, status=exc.status)
                response.headers.update(exc.headers)
            await self._send(conn, writer, response, head_only=request.method == "HEAD")
            if self.access_log is not None:
                peer = writer.get_extra_info("peername") or ("?", 0)
                self.access_log.info('%s "%s %s" %d %d', peer[0], request.method, head.target.decode("latin-1")[:512],
                                     response.status, len(response.body))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader, timeout: float,
                    idle: asyncio.Task[None] | None = None, deadline: float | None = None) -> Any:
        """The next h11 event, reading as needed; None when the client took too long
        (`timeout` from now, or the loop time `deadline`). `idle`: the connection's task,
        no longer idle once a byte arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if deadline is None else deadline
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                return None
            if idle is not None:
                self._idle.discard(idle)
            conn.receive_data(data)  # b"" is the end of the stream

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    headers: dict[str, str]) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.app.client_max_size:
            raise HTTPException(413, "Request Entity Too Large")
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout  # for the whole body
        while True:
            event = await self._next(conn, reader, self.limits.body_timeout, deadline=deadline)
            if event is None:  # trickled or stalled: said, then the connection ends
                raise HTTPException(408, f"request body not received within {self.limits.body_timeout:g} s")
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("request body not received")
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.app.client_max_size:
                    raise HTTPException(413, "Request Entity Too Large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, resp: Response, *, head_only: bool = False) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
        if resp.content_type and "content-type" not in {k.lower() for k in resp.headers}:
            headers.append((b"Content-Type", resp.content_type.encode("latin-1")))
        if resp.stream is not None and not head_only:
            await self._send_stream(conn, writer, resp, headers)
            return
        if resp.status not in (204, 304):
            headers.append((b"Content-Length", str(len(resp.body)).encode()))
        out = conn.send(h11.Response(status_code=resp.status, headers=headers, reason=_REASONS.get(resp.status, b"")))
        if resp.body and not head_only and resp.status not in (204, 304):
            out += conn.send(h11.Data(data=resp.body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()

    async def _send_stream(self, conn: h11.Connection, writer: asyncio.StreamWriter, resp: Response,
                           headers: list[tuple[bytes, bytes]]) -> None:
        """A body of unknown length, chunk by chunk as the stream yields it (h11 frames it
        chunked); the connection closes after it. Ends when the stream does, or when the
        client goes (the next write fails), or at server stop (the task is cancelled)."""
        assert resp.stream is not None
        headers.append((b"Connection", b"close"))
        writer.write(conn.send(h11.Response(status_code=resp.status, headers=headers, reason=_REASONS.get(resp.status, b""))) or b"")
        await writer.drain()
        try:
            async for chunk in resp.stream:
                if chunk:
                    writer.write(conn.send(h11.Data(data=chunk)) or b"")
                    await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        finally:
            close = getattr(resp.stream, "aclose", None)
            if close is not None:
                await close()

    async def _error(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        """Answer a request the server could not read as JSON {"message"}, then close."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        resp = json_response({"message": message}, status=status)
        resp.headers["Connection"] = "close"
        try:
            await self._send(conn, writer, resp)
        except (h11.LocalProtocolError, ConnectionError):
            pass


class _Gate(asyncio.Protocol):
    """A TCP connection's protocol until Server._admit has decided about it."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server._admit(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:  # reading is paused at once; nothing comes here
        pass
