"""One NETCONF session (RFC 6241) on one SSH channel (RFC 6242), on the server's event loop.

Reading, framing and writing happen on the loop; each request is handled on the
server's worker threads, one at a time per session and in order, so a slow commit
never stalls another session's I/O. Every way a session can end (close-session,
kill-session, a dropped TCP connection, a framing error, a message over the size
limit, no hello in time, a client that stops reading) goes through connection_lost,
which releases the session's locks once its request in progress has finished.

Replies and errors use the base namespace as default namespace (no 'nc:' prefix —
ONOS's QKD driver matches text) and echo every <rpc> attribute. Notifications may
be sent from any thread; they are held while a request is in progress, so none
goes out between a request and its reply (RFC 5277 §2.1.1: after the reply to
create-subscription).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncssh
from lxml import etree

from sdqkd.agents.netconf import errors
from sdqkd.agents.netconf import framing
from sdqkd.agents.netconf import notifications

if TYPE_CHECKING:
    from sdqkd.agents.netconf.server import NetconfServer

log = logging.getLogger(__name__)

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
BASE_10 = "urn:ietf:params:netconf:base:1.0"
BASE_11 = "urn:ietf:params:netconf:base:1.1"
# No entity expansion, no network, no DTD: requests come from the network.
PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True)


@dataclass
class SessionLimits:
    """What one session may hold (all configurable in the agent's netconf config)."""

    max_message_size: int = 32 * 1024 * 1024  # a larger request: rpc-error too-big, then the session ends
    hello_timeout: float = 30.0  # seconds from channel open to the client's hello
    max_pending: int = 16  # requests read ahead of the one in progress; then reading pauses
    max_output_buffer: int = 16 * 1024 * 1024  # unsent bytes to a client that stopped reading; then it is dropped
    max_sessions: int = 64  # NETCONF sessions open at once; more channels are refused (resource shortage)
    max_sessions_per_connection: int = 4  # channels one SSH connection may hold


class NetconfSession(asyncssh.SSHServerSession):
    """A client's session; `server` owns the loop, the worker threads and the RPC table."""

    def __init__(self, server: NetconfServer, username: str | None, source_host: str | None) -> None:
        self.server = server
        self.limits = server.limits
        self.username = username
        self.source_host = source_host
        self.session_id = 0  # given when the subsystem starts
        self.login_time = notifications.now()
        self.counters = {"in-rpcs": 0, "in-bad-rpcs": 0, "out-rpc-errors": 0, "out-notifications": 0}
        self.after_reply: list[Callable[[], None]] = []
        self.base11 = False
        self.session_open = False  # between our hello and the end
        self._chan: asyncssh.SSHServerChannel | None = None
        self._deframer = framing.Deframer(self.limits.max_message_size)
        self._hello_seen = False
        self._hello_timer: asyncio.TimerHandle | None = None
        self._inbox: collections.deque[bytes] = collections.deque()
        self._worker: asyncio.Task | None = None
        self._busy = False
        self._held: list[bytes] = []
        self._closing = False
        self.ended = False  # connection_lost seen
        self._by_request = False  # ended by close-session or kill-session, not dropped
        self._eof = False
        self._released = threading.Lock()

    # --- SSH channel events (loop thread) ----------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "netconf"

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def session_started(self) -> None:
        self.session_id = self.server.register(self)
        self.session_open = True
        self._write(self._hello())
        self._hello_timer = asyncio.get_running_loop().call_later(self.limits.hello_timeout, self._no_hello)
        log.info("session %s opened for %s from %s", self.session_id, self.username, self.source_host)

    def data_received(self, data: bytes, datatype: Any) -> None:
        if datatype is not None or self._closing:
            return  # extended data (stderr) carries no NETCONF
        self._deframer.feed(data)
        try:
            while (message := self._deframer.next_message()) is not None:
                if not self._hello_seen:
                    if not self._client_hello(message):
                        return
                    continue
                self._inbox.append(message)
        except framing.TooBig as exc:
            self._fail_framing(errors.TooBig(str(exc)))
            return
        except framing.FramingError as exc:
            self._fail_framing(self._malformed(str(exc)))
            return
        if self._inbox and (self._worker is None or self._worker.done()):
            self._worker = asyncio.get_running_loop().create_task(self._work())
        if len(self._inbox) >= self.limits.max_pending and self._chan is not None:
            self._chan.pause_reading()

    def eof_received(self) -> bool:
        """The client is done sending (`ssh -s netconf < requests`): answer what it sent,
        then close. True keeps our side of the channel open meanwhile."""
        self._eof = True
        if self._worker is None or self._worker.done():
            self._close_channel()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        was_open, self.session_open, self._closing = self.session_open, False, True
        self._inbox.clear()
        self._held.clear()
        self._chan = None
        self.server.unregister(self, dropped=not self._by_request)
        if was_open:
            log.info("session %s closed%s", self.session_id, f" ({exc})" if exc else "")
        if self._worker is None or self._worker.done():
            self.server.in_background(self.release)
        # else: _work releases once the request in progress has finished

    # --- hello ------------------------------------------------------------------

    def _hello(self) -> bytes:
        hello = etree.Element(f"{{{NC_NS}}}hello", nsmap={None: NC_NS})
        caps = etree.SubElement(hello, f"{{{NC_NS}}}capabilities")
        for cap in self.server.rpcs.capabilities():
            etree.SubElement(caps, f"{{{NC_NS}}}capability").text = cap
        etree.SubElement(hello, f"{{{NC_NS}}}session-id").text = str(self.session_id)
        return etree.tostring(hello, encoding="utf-8")

    def _client_hello(self, message: bytes) -> bool:
        """RFC 6241 §8.1: a <hello> with the base capabilities and no session-id."""
        try:
            root = etree.fromstring(message.lstrip(), parser=PARSER)  # scrapli starts with a newline
        except etree.XMLSyntaxError:
            return self._bad_hello("not well-formed XML")
        if root.tag != f"{{{NC_NS}}}hello":
            return self._bad_hello(f"expected <hello>, got <{etree.QName(root).localname}>")
        if root.find(f"{{{NC_NS}}}session-id") is not None:
            return self._bad_hello("a client's hello carries no session-id")
        caps = {(c.text or "").strip() for c in root.iterfind(f"{{{NC_NS}}}capabilities/{{{NC_NS}}}capability")}
        if BASE_10 not in caps and BASE_11 not in caps:
            return self._bad_hello("no base capability")
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._hello_seen = True
        self.base11 = BASE_11 in caps
        self._deframer.chunked = self.base11
        return True

    def _bad_hello(self, why: str) -> bool:
        log.info("session %s: bad hello from %s: %s", self.session_id, self.source_host, why)
        self.server.stats["in-bad-hellos"] += 1
        self._close_channel()
        return False

    def _no_hello(self) -> None:
        log.info("session %s: no hello within %s s", self.session_id, self.limits.hello_timeout)
        self.server.stats["in-bad-hellos"] += 1
        self._close_channel()

    # --- requests ---------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._inbox and not self._closing:
                message = self._inbox.popleft()
                if self._chan is not None and len(self._inbox) < self.limits.max_pending // 2:
                    self._chan.resume_reading()
                self._busy = True
                try:
                    reply, after, close = await loop.run_in_executor(self.server.workers, self._handle, message)
                finally:
                    self._busy = False
                if self._closing:
                    break
                self._write(reply)
                for data in self._held:
                    self._write(data)
                self._held.clear()
                if after:
                    await loop.run_in_executor(self.server.workers, _run_all, after)
                if close:
                    self._by_request = True
                    self._close_channel()
            if self._eof:
                self._close_channel()
        finally:
            if self._closing:
                await loop.run_in_executor(self.server.workers, self.release)

    def _handle(self, message: bytes) -> tuple[bytes, list[Callable[[], None]], bool]:
        """One request, on a worker thread: (reply, what to run after it, whether to close)."""
        self.after_reply = []
        try:
            root = etree.fromstring(message.lstrip(), parser=PARSER)
        except etree.XMLSyntaxError as exc:
            log.info("session %s: malformed message: %s", self.session_id, exc)
            return self._errors(None, [self._malformed("the message is not well-formed XML")]), [], False
        if root.tag != f"{{{NC_NS}}}rpc":
            return self._errors(None, [self._malformed(f"expected <rpc>, got <{etree.QName(root).localname}>")]), [], False
        if root.get("message-id") is None:
            err = errors.MissingAttribute("<rpc> has no message-id attribute", info={"bad-attribute": "message-id", "bad-element": "rpc"})
            return self._errors(root, [err]), [], False
        ops = [c for c in root if isinstance(c.tag, str)]
        if len(ops) != 1:
            return self._errors(root, [self._malformed("an <rpc> holds exactly one operation")]), [], False
        op = ops[0]
        q = etree.QName(op)
        self.counters["in-rpcs"] += 1
        handler = self.server.rpcs.handler(q.namespace or "", q.localname)
        if handler is None:
            return self._errors(root, [errors.OperationNotSupported(f"operation <{q.localname}> is not supported")]), [], False
        try:
            body = handler(self, op)
        except errors.RpcErrors as many:
            return self._errors(root, many.errors), [], False
        except errors.RpcError as err:
            return self._errors(root, [err]), [], False
        except Exception:  # noqa: BLE001 - one bad request never ends the session
            log.exception("session %s: <%s> failed", self.session_id, q.localname)
            return self._errors(root, [errors.OperationFailed("internal error while processing the request")]), [], False
        if body is None:
            body = [etree.Element(f"{{{NC_NS}}}ok")]
        closing = q.namespace == NC_NS and q.localname == "close-session"
        return _reply(root, body), self.after_reply, closing

    def _malformed(self, message: str) -> errors.RpcError:
        return errors.malformed(self.base11, message)

    def _errors(self, rpc: etree._Element | None, errs: list[errors.RpcError]) -> bytes:
        self.counters["out-rpc-errors"] += 1
        if rpc is None or any(e.error_type in ("rpc", "protocol") for e in errs):
            self.counters["in-bad-rpcs"] += 1
        prefixes = self.server.rpcs.models.prefixes
        return _reply(rpc, [e.element(prefixes) for e in errs])

    def _fail_framing(self, err: errors.RpcError) -> None:
        """The stream cannot be read any further: say why, then end the session."""
        log.info("session %s: %s; closing", self.session_id, err.message)
        self.counters["in-bad-rpcs"] += 1
        self.counters["out-rpc-errors"] += 1
        if self._hello_seen:
            self._write(_reply(None, [err.element()]))
        self._close_channel()

    # --- output -----------------------------------------------------------------

    def _write(self, message: bytes) -> None:
        chan = self._chan
        if chan is None or self._closing:
            return
        if chan.get_write_buffer_size() > self.limits.max_output_buffer:
            log.warning("session %s: client is not reading (%d bytes unsent); closing", self.session_id, chan.get_write_buffer_size())
            chan.abort()
            return
        try:
            chan.write(framing.frame(message, self.base11 and self._hello_seen))
        except (BrokenPipeError, ConnectionError):  # closing under us: connection_lost follows
            self._closing = True

    def send_notification(self, notification: etree._Element) -> None:
        """From any thread. A closed session drops it."""
        if not self.session_open:
            return
        data = etree.tostring(notification, encoding="utf-8")
        self.counters["out-notifications"] += 1
        self.server.loop.call_soon_threadsafe(self._notify, data)

    def _notify(self, data: bytes) -> None:
        if self._busy:
            self._held.append(data)
        else:
            self._write(data)

    # --- end ----------------------------------------------------------------------

    def _close_channel(self) -> None:
        self._closing = True
        if self._chan is not None:
            self._chan.close()

    def close(self) -> None:
        """End the session (kill-session, server stop), from any thread. Locks are released
        before this returns when called off the loop (RFC 6241 §7.9), and again once the
        request in progress, if any, has finished."""
        self._by_request = True
        self.server.loop.call_soon_threadsafe(self._close_channel)
        if threading.get_ident() != self.server.loop_thread_id:
            self.release()

    def release(self) -> None:
        """Locks, an unconfirmed commit, the subscription: what the session held. Idempotent."""
        if not self.session_id:
            return
        with self._released:
            try:
                self.server.rpcs.session_ended(self.session_id)
            except Exception:  # noqa: BLE001
                log.exception("cleanup of session %s failed", self.session_id)


def _run_all(tasks: list[Callable[[], None]]) -> None:
    for task in tasks:
        task()


def _reply(rpc: etree._Element | None, body: list[etree._Element]) -> bytes:
    reply = etree.Element(f"{{{NC_NS}}}rpc-reply", nsmap={None: NC_NS})
    if rpc is not None:
        for name, value in rpc.attrib.items():
            reply.set(name, value)
    reply.extend(body)
    return etree.tostring(reply, encoding="utf-8")
