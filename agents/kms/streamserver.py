"""A TCP/TLS server for request/answer key-delivery protocols that are not HTTP.

ETSI GS QKD 004 has wire forms of its own besides REST: the JSON command form MadQCI
nodes and UPM's hybridization module speak (etsi004_json.py), and the ETSI binary form
(8-byte header + payload). Each is a `Handler`: a coroutine given one `Connection`,
which reads its requests through it and writes its answers; this module owns everything
else, once for all of them:

- one thread with its own asyncio loop (the agent is thread-based, as for HttpsServer),
  no thread per connection;
- mutual TLS: the caller is the SAE ID of the verified client certificate
  (pki.sae_id_of); plain TCP only when the operator asks for it and the address is
  loopback, where the caller is None (trusted: the request names its party);
- bounds a client cannot stretch: the TLS handshake, the time a whole request may take
  to arrive (a silent or trickling client is closed), the size of a request, the number
  of connections (one more is closed at once, before its handshake);
- blocking LKMS calls (`Connection.call`) on a bounded thread pool, never on the loop.

A protocol with a length header reads like this (the binary form's shape):

    async def serve(conn: Connection) -> None:
        while True:
            try:
                header = await conn.readexactly(8)
            except PeerClosed:
                return  # the client is done (or left mid-header)
            payload = await conn.readexactly(struct.unpack("!I", header[4:])[0])  # RequestTooLarge past max_request
            answer = await conn.call(streams.get_key, conn.caller, ...)
            await conn.send(encode(answer))
            conn.next_request()  # the next request gets the full time and size again

`StreamServer(serve, host, port, ssl_ctx, limits=..., role="ETSI 004 binary").start()`;
`stop()` closes every connection and joins the thread.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sdqkd.agents.kms.loopthread import LoopThread
from sdqkd.listen import binding, is_loopback
from sdqkd.pki import sae_id_of

log = logging.getLogger(__name__)
T = TypeVar("T")


class StreamError(Exception):
    """The connection cannot go on (the server closes it); a handler may catch it to answer first."""


class RequestTimeout(StreamError):
    """The request did not arrive in full within Limits.read_timeout."""


class RequestTooLarge(StreamError):
    """The request is longer than Limits.max_request."""


class PeerClosed(StreamError):
    """The client closed the connection before readexactly() had its bytes (between
    requests when nothing of the current one had come)."""


@dataclass(frozen=True)
class Limits:
    """What one client may take of the server."""

    read_timeout: float = 10.0  # s for a whole request to arrive, counted from when the server waits for it
    handshake_timeout: float = 10.0  # s for the TLS handshake
    max_request: int = 64 * 1024  # bytes of one request
    max_connections: int = 64  # open at once; one more is closed at once
    workers: int = 8  # LKMS calls running at once


def limits_of(conf: Any) -> Limits:
    """The Limits a server's config section gives (fields named as in Limits)."""
    return Limits(**{f: getattr(conf, f) for f in Limits.__dataclass_fields__ if hasattr(conf, f)})


class Connection:
    """One client's connection as a handler sees it: reads bounded by the request's
    deadline and size, answers, and LKMS calls off the loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: str | None,
                 peer: str, limits: Limits, executor: ThreadPoolExecutor,
                 observe: Callable[[str, int], None] | None = None) -> None:
        self.caller = caller  # SAE ID from the client certificate; None on trusted plain TCP
        self.peer = peer  # host:port, for logs
        self._reader, self._writer = reader, writer
        self._limits, self._executor = limits, executor
        self._observe = observe
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + limits.read_timeout
        self._size = 0

    def next_request(self) -> None:
        """The current request is answered: the next one gets the full time and size."""
        self._deadline = self._loop.time() + self._limits.read_timeout
        self._size = 0

    async def read(self, n: int) -> bytes:
        """Up to n bytes of the request (at least one); b"" when the client closed."""
        data = await self._timed(self._reader.read(max(1, min(n, self._limits.max_request - self._size + 1))))
        return self._count(data)

    async def readexactly(self, n: int) -> bytes:
        """Exactly n bytes of the request, or PeerClosed / RequestTimeout / RequestTooLarge."""
        if self._size + n > self._limits.max_request:
            raise RequestTooLarge(f"request longer than {self._limits.max_request} bytes")
        try:
            data = await self._timed(self._reader.readexactly(n))
        except asyncio.IncompleteReadError as exc:
            self._count(exc.partial)
            where = " in the middle of a request" if self._size else ""
            raise PeerClosed(f"the client closed the connection{where}") from None
        return self._count(data)

    async def send(self, data: bytes) -> None:
        """Write an answer, waiting at most read_timeout for a client that does not read."""
        self._writer.write(data)
        try:
            await asyncio.wait_for(self._writer.drain(), self._limits.read_timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout("the client does not read its answer") from None

    async def linger(self, seconds: float = 1.0, limit: int = 1 << 20) -> None:
        """Read and drop what the client still sends, until it closes (at most `seconds`,
        `limit` bytes): closing a socket with unread input resets the connection, and the
        reset can destroy an answer (a refusal of a too-long request) before it is read."""
        loop = self._loop
        end, dropped = loop.time() + seconds, 0
        while dropped < limit:
            try:
                data = await asyncio.wait_for(self._reader.read(65536), max(end - loop.time(), 0))
            except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError):
                return
            if not data:
                return
            dropped += len(data)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (the LKMS may wait on a relay or a peer) on the server's pool."""
        if self._observe is None:
            return await self._loop.run_in_executor(self._executor, functools.partial(fn, *args))
        code = 500
        try:
            result = await self._loop.run_in_executor(self._executor, functools.partial(fn, *args))
            code = 200
            return result
        except Exception as exc:
            code = getattr(exc, "http_status", 500)  # a KmsError: what ETSI 014 would answer
            raise
        finally:
            self._observe(getattr(fn, "__name__", "call"), code)

    async def _timed(self, aw: Awaitable[bytes]) -> bytes:
        left = self._deadline - self._loop.time()
        try:
            return await asyncio.wait_for(aw, max(left, 0))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no complete request within {self._limits.read_timeout} s") from None

    def _count(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self._limits.max_request:
            raise RequestTooLarge(f"request longer than {self._limits.max_request} bytes")
        return data


Handler = Callable[[Connection], Awaitable[None]]


class StreamServer(LoopThread):
    """Serves `handler` on host:port from a thread of its own (port 0: any free one).

    `ssl_ctx` None means plain TCP, allowed on a loopback address only: there the
    operator trusts every local process, elsewhere anyone on the network could claim
    any SAE.
    """

    thread_prefix = "stream"

    def __init__(self, handler: Handler, host: str, port: int, ssl_ctx: ssl.SSLContext | None, *,
                 limits: Limits = Limits(), role: str = "key delivery") -> None:
        if ssl_ctx is None and not is_loopback(host):
            raise ValueError(f"{role}: plain TCP is only served on a loopback address, not {host}")
        if ssl_ctx is not None and ssl_ctx.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError(f"{role}: the TLS context must require a client certificate")
        self.handler, self.host, self._port, self.ssl_ctx = handler, host, port, ssl_ctx
        self.limits, self.role = limits, role
        self._init_thread()
        self._stopping: asyncio.Event | None = None
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}  # open connections
        self._executor: ThreadPoolExecutor | None = None
        # Told of every LKMS call a request made (role, the call's name, the HTTP status
        # ETSI 014 would answer): the agent's metrics (agents/metrics.py).
        self.observe: Callable[[str, str, int], None] | None = None

    @property
    def connections(self) -> int:
        """Connections open now (for tests and health)."""
        return len(self._tasks)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, close every connection, join the thread. LKMS calls already
        running finish in their pool threads; their answers are dropped."""
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is not None and thread is not None and stopping is not None and thread.is_alive():
            loop.call_soon_threadsafe(stopping.set)
            thread.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()'s caller when it happens before listening
            if not self._ready.is_set():
                self._failed(exc)
            else:
                log.error("%s server stopped on %s", self.role, type(exc).__name__)
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix=f"kms-{self.role}")
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            reader = asyncio.StreamReader(limit=min(self.limits.max_request + 1, 1 << 20), loop=loop)
            return _Paused(reader, self._accept, loop=loop)

        with binding(self.role, self.host, self._port):
            server = await loop.create_server(protocol, self.host, self._port, reuse_address=True)
        self._port = server.sockets[0].getsockname()[1]
        self._listening(loop)
        log.info("%s listening on %s://%s:%d", self.role, "tls" if self.ssl_ctx else "tcp", self.host, self._port)
        try:
            await self._stopping.wait()
        finally:
            server.close()
            # The socket first: a cancellation can be lost in 3.11's asyncio.wait_for (when the
            # awaited read completes at the same time), a stream at EOF ends any handler.
            for task, writer in list(self._tasks.items()):
                writer.transport.abort()
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2.0)
            await server.wait_closed()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _address(writer.get_extra_info("peername"))
        if len(self._tasks) >= self.limits.max_connections:
            log.warning("%s: %d connections open, closing one more from %s", self.role, len(self._tasks), peer)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        try:
            caller = await self._secure(writer)
            assert self._executor is not None
            observe = functools.partial(self.observe, self.role) if self.observe is not None else None
            await self.handler(Connection(reader, writer, caller, peer, self.limits, self._executor, observe))
        except StreamError as exc:
            log.info("%s: closing the connection from %s: %s", self.role, peer, exc)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.info("%s: connection from %s lost: %s", self.role, peer, type(exc).__name__)
        except asyncio.CancelledError:
            pass  # stop()
        except Exception as exc:  # a handler's bug: its traceback, never its message (it might quote keys)
            tb = "".join(traceback.format_tb(exc.__traceback__))
            log.error("%s: unexpected %s serving %s\n%s", self.role, type(exc).__name__, peer, tb)
        finally:
            self._tasks.pop(task, None)
            await _close(writer)

    async def _secure(self, writer: asyncio.StreamWriter) -> str | None:
        """TLS handshake and the caller's SAE ID (None on plain TCP); StreamError to close."""
        if self.ssl_ctx is None:
            writer.transport.resume_reading()  # type: ignore[attr-defined]
            return None
        try:
            await asyncio.wait_for(writer.start_tls(self.ssl_ctx, ssl_handshake_timeout=self.limits.handshake_timeout),
                                   self.limits.handshake_timeout + 1)
        except (asyncio.TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
            raise StreamError(f"TLS handshake failed: {type(exc).__name__}") from None
        try:
            return sae_id_of(writer.get_extra_info("peercert") or {})
        except ValueError as exc:
            raise StreamError(str(exc)) from None


class _Paused(asyncio.StreamReaderProtocol):
    """Reads nothing until the handler starts: the client's first bytes (its TLS
    ClientHello) must reach the TLS layer, not the plain stream's buffer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close so that an answer already written still reaches the client (TLS close_notify
    included), but never wait long: a client that stopped reading loses the socket."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError, ssl.SSLError, OSError):
        writer.transport.abort()


def _address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return str(peername)
