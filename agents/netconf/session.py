"""One NETCONF session (RFC 6241, framing of RFC 6242) on top of the `netconf` package.

We keep the package's SSH plumbing and framing, and replace what it gets wrong for
operators' clients: the hello carries our capabilities and a session-id; replies and
errors use the base namespace as default namespace (no 'nc:' prefix — ONOS's
QKD driver matches text), echo every <rpc> attribute; malformed XML and bad
requests get an rpc-error and the session goes on; and notifications (RFC 5277)
can be sent from any thread without interleaving with replies.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from lxml import etree
from netconf.server import NetconfServerSession

from sdqkd.agents.netconf import errors
from sdqkd.agents.netconf import notifications

log = logging.getLogger(__name__)

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
# No entity expansion, no network, no DTD: requests come from the network.
PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True)

Handler = Callable[["AgentSession", etree._Element], Any]


class AgentSession(NetconfServerSession):
    """A client's session. The server's `server_methods` is an sdqkd.agents.netconf.rpcs.Rpcs."""

    def __init__(self, channel: Any, server: Any, extra_args: Any, debug: bool) -> None:
        self._send_lock = threading.Lock()
        self.after_reply: list[Callable[[], None]] = []
        self.counters = {"in-rpcs": 0, "in-bad-rpcs": 0, "out-rpc-errors": 0, "out-notifications": 0}
        self.login_time = notifications.now()
        peer = channel.get_transport().getpeername()
        self.source_host = peer[0] if isinstance(peer, tuple) else None
        self.username = getattr(channel.get_transport(), "get_username", lambda: None)()
        super().__init__(channel, server, extra_args, debug)
        log.info("session %s opened for %s", self.session_id, self.username)

    # --- output ---------------------------------------------------------------

    def send_message(self, msg: str) -> None:
        with self._send_lock:
            super().send_message(msg)

    def send_hello(self, caplist: Any, session_id: int | None = None) -> None:
        hello = etree.Element(f"{{{NC_NS}}}hello", nsmap={None: NC_NS})
        caps = etree.SubElement(hello, f"{{{NC_NS}}}capabilities")
        for cap in self.methods.capabilities():
            etree.SubElement(caps, f"{{{NC_NS}}}capability").text = cap
        etree.SubElement(hello, f"{{{NC_NS}}}session-id").text = str(session_id if session_id is not None else self.session_id)
        self.send_message(etree.tostring(hello, encoding="unicode"))

    def _reply(self, rpc: etree._Element | None, body: list[etree._Element]) -> None:
        reply = etree.Element(f"{{{NC_NS}}}rpc-reply", nsmap={None: NC_NS})
        if rpc is not None:
            for name, value in rpc.attrib.items():
                reply.set(name, value)
        reply.extend(body)
        self.send_message(etree.tostring(reply, encoding="unicode"))

    def send_errors(self, rpc: etree._Element | None, errs: list[errors.RpcError]) -> None:
        self.counters["out-rpc-errors"] += 1
        if rpc is None or any(e.error_type in ("rpc", "protocol") for e in errs):
            self.counters["in-bad-rpcs"] += 1
        prefixes = self.methods.models.prefixes
        self._reply(rpc, [e.element(prefixes) for e in errs])

    def send_notification(self, notification: etree._Element) -> None:
        """Called from driver threads; a closed session drops it."""
        if self.session_open:
            self.send_message(etree.tostring(notification, encoding="unicode"))
            self.counters["out-notifications"] += 1

    # --- input ----------------------------------------------------------------

    def _reader_handle_message(self, msg: str) -> None:
        if not self.session_open:
            return
        try:
            root = etree.fromstring(msg.lstrip().encode("utf-8"), parser=PARSER)
        except etree.XMLSyntaxError as exc:
            log.info("session %s: malformed message: %s", self.session_id, exc)
            self.send_errors(None, [errors.MalformedMessage("the message is not well-formed XML")])
            return
        if root.tag != f"{{{NC_NS}}}rpc":
            self.send_errors(None, [errors.MalformedMessage(f"expected <rpc>, got <{etree.QName(root).localname}>")])
            return
        if root.get("message-id") is None:
            self.send_errors(root, [errors.MissingAttribute("<rpc> has no message-id attribute", info={"bad-attribute": "message-id", "bad-element": "rpc"})])
            return
        ops = [c for c in root if isinstance(c.tag, str)]
        if len(ops) != 1:
            self.send_errors(root, [errors.MalformedMessage("an <rpc> holds exactly one operation")])
            return
        self._dispatch(root, ops[0])

    def _dispatch(self, rpc: etree._Element, op: etree._Element) -> None:
        q = etree.QName(op)
        self.counters["in-rpcs"] += 1
        self.after_reply = []
        handler = self.methods.handler(q.namespace or "", q.localname)
        if handler is None:
            self.send_errors(rpc, [errors.OperationNotSupported(f"operation <{q.localname}> is not supported")])
            return
        try:
            body = handler(self, op)
        except errors.RpcErrors as many:
            self.send_errors(rpc, many.errors)
            return
        except errors.RpcError as err:
            self.send_errors(rpc, [err])
            return
        except Exception:  # noqa: BLE001 - one bad request never ends the session
            log.exception("session %s: <%s> failed", self.session_id, q.localname)
            self.send_errors(rpc, [errors.OperationFailed("internal error while processing the request")])
            return
        if body is None:
            body = [etree.Element(f"{{{NC_NS}}}ok")]
        self._reply(rpc, body)
        pending, self.after_reply = self.after_reply, []
        for task in pending:
            task()
        if q.localname in ("close-session",) and q.namespace == NC_NS:
            self.close()

    # --- end ------------------------------------------------------------------

    def close(self) -> None:
        sid = self.session_id
        was_open = self.session_open
        super().close()
        if was_open and sid is not None:
            try:
                self.methods.session_ended(sid)
            except Exception:  # noqa: BLE001
                log.exception("cleanup of session %s failed", sid)
            log.info("session %s closed", sid)

