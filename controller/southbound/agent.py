"""One agent as the controller sees it: a NETCONF session kept up with backoff, the
node's last known datastore, and its notifications handed to the controller.

After every (re)connect the agent is read in full (resync), so a restarted agent
or a missed notification never leaves the controller with a stale view. Later
re-reads (refresh) go over a second, read-only session: an agent answers one
session's RPCs in order, so a <get> on the provisioning session would hold up the
next transaction's lock or edit behind it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from lxml import etree
from ncclient.manager import Manager
from ncclient.operations.errors import TimeoutExpiredError
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele

from sdqkd.controller.southbound.errors import AgentUnavailable
from sdqkd.controller.southbound.interface import AgentAddress
from sdqkd.controller.southbound.keeper import BACKOFF, SessionKeeper
from sdqkd.controller.southbound.netconf_txn import NetconfHop
from sdqkd.controller.southbound.ops import Edit
from sdqkd.controller.southbound.session import connect

log = logging.getLogger(__name__)

ETSI_NS = "urn:etsi:qkd:yang:etsi-qkd-node"
OSW_NS = "urn:sdqkd:yang:sdqkd-optical-switch"
KS_NS = "urn:sdqkd:yang:sdqkd-key-stock"
QRNG_NS = "urn:sdqkd:yang:sdqkd-qrng"
# prefixes of the paths text() and the topology builder use
NSMAP = {"q": ETSI_NS, "o": OSW_NS, "ks": KS_NS, "qr": QRNG_NS}
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


class AgentConnection(SessionKeeper):
    """An agent over NETCONF: the provisioning session (subscribed to the agent's
    notifications) and a second, read-only one for refreshes."""

    def __init__(self, addr: AgentAddress, on_state: Callable[["AgentConnection"], None],
                 on_notification: Callable[["AgentConnection", etree._Element], None],
                 backoff: tuple[float, float] = BACKOFF,
                 on_lost: Callable[["AgentConnection"], None] | None = None,
                 on_up: Callable[["AgentConnection"], None] | None = None) -> None:
        super().__init__(addr, on_state, on_notification, backoff, on_lost, on_up)
        self.lock = threading.RLock()  # one RPC conversation at a time on the session
        self.manager: Manager | None = None
        self._reader: Manager | None = None  # the refresh session, opened on first use

    def stop(self) -> None:
        self._stop.set()
        with self._read_lock:
            self._close_reader()
        m = self.manager
        if m is not None:
            try:
                m.close_session()
            except Exception:  # noqa: BLE001
                pass
        self._join()

    # --- session life ---------------------------------------------------------------------

    def _connect(self) -> Manager:
        a = self.addr
        kw: dict[str, Any] = dict(host=a.host, port=a.port, username=a.username, timeout=30, allow_agent=False, look_for_keys=False)
        if a.password:
            kw["password"] = a.password
        if a.key_filename:
            kw["key_filename"] = a.key_filename
        if a.hostkey_b64:
            kw["hostkey_b64"] = a.hostkey_b64
            kw["hostkey_verify"] = True
        else:
            kw["hostkey_verify"] = False
        return connect(**kw)

    @contextlib.contextmanager
    def _session(self) -> Iterator[Manager]:
        m = self._connect()
        try:
            m.create_subscription()
            with self.lock:
                self.manager = m
                self.resync()
            yield m
        finally:
            if m.connected and not self._stop.is_set():  # a failed subscribe or resync: not left open
                try:
                    m.close_session()
                except Exception:  # noqa: BLE001 - it may be going already
                    pass

    def _describe(self, m: Manager) -> str:
        return f" (session {m.session_id})"

    def _dropped(self) -> None:
        with self.lock:
            self.manager = None

    def _pump(self, m: Manager) -> None:
        while not self._stop.is_set() and m.connected:
            n = m.take_notification(block=True, timeout=0.5)
            if n is None:
                continue
            try:
                root = etree.fromstring(n.notification_xml.encode())
                content = next((c for c in root if etree.QName(c).localname != "eventTime"), None)
                if content is not None:
                    self.on_notification(self, content)
            except Exception:  # noqa: BLE001 - a failing handler is contained
                log.exception("notification handler failed for %s", self.addr.name)

    def resync(self) -> None:
        """Read the whole operational datastore of the agent."""
        m = self._manager()
        self.data = m.get().data
        self.on_state(self)

    def refresh(self) -> None:
        """Re-read the agent over the read-only session (the provisioning session
        when that one cannot be had)."""
        with self._read_lock:
            data = None
            if not self._stop.is_set() and self.connected.is_set():
                try:
                    if self._reader is None or not self._reader.connected:
                        self._close_reader()
                        self._reader = self._connect()
                    data = self._reader.get().data
                except Exception as exc:  # noqa: BLE001 - fall back to the main session below
                    log.debug("refresh session to %s failed: %s", self.addr.name, exc)
                    self._close_reader()
            if data is not None:
                self.data = data
                self.on_state(self)
                return
        with self.lock:
            self.resync()

    def _close_reader(self) -> None:
        r, self._reader = self._reader, None
        if r is not None:
            try:
                r.close_session()
            except Exception:  # noqa: BLE001 - it may be gone already
                pass

    def _manager(self) -> Manager:
        m = self.manager
        if m is None or not m.connected:
            raise AgentUnavailable(f"agent {self.addr.name} is not connected")
        return m

    # --- RPCs for provisioning ---------------------------------------------------------------

    def call(self, fn: Callable[[Manager], Any]) -> Any:
        with self.lock:
            return fn(self._manager())

    def pipeline(self, fns: list[Callable[[Manager], Any]]) -> list[Any]:
        """Send several RPCs without waiting in between (RFC 6241 allows pipelining; the
        agent answers them in order), then wait for every reply: one round trip
        instead of len(fns). Returns each reply, or the RPCError or transport error
        that took its place; nothing is raised for an <rpc-error>."""
        with self.lock:
            m = self._manager()
            m.async_mode = True
            try:
                sent = [fn(m) for fn in fns]
            finally:
                m.async_mode = False
            out: list[Any] = []
            for rpc in sent:
                if not rpc.event.wait(m.timeout):
                    out.append(TimeoutExpiredError("ncclient timed out while waiting for an rpc reply."))
                elif rpc.error is not None:
                    out.append(rpc.error)
                elif rpc.reply.error is not None:
                    errs = rpc.reply.errors
                    out.append(RPCError(to_ele(rpc.reply._raw), errs=errs) if len(errs) > 1 else rpc.reply.error)
                else:
                    out.append(rpc.reply)
            return out

    def get_config(self) -> etree._Element:
        return self.call(lambda m: m.get_config(source="running").data)

    def begin(self, txn_id: str, edits: list[Edit]) -> NetconfHop:
        return NetconfHop(self, txn_id, edits)

    def is_up(self) -> bool:
        """Connected, and the session not seen dropped: ncclient marks a session closed the
        moment its reader hits EOF (an agent killed), up to half a second before the pump
        loop notices and on_lost runs; path computation must not wait for that."""
        m = self.manager
        return self.connected.is_set() and m is not None and m.connected


def qkd_node(data: etree._Element | None) -> etree._Element | None:
    return None if data is None else data.find(f"{{{ETSI_NS}}}qkd_node")


def text(el: etree._Element | None, path: str) -> str | None:
    if el is None:
        return None
    found = el.find(path, namespaces=NSMAP)
    return None if found is None or found.text is None else found.text.strip()


def ident(value: str | None) -> str | None:
    return None if value is None else value.rsplit(":", 1)[-1]


__all__ = ["AgentAddress", "AgentConnection", "AgentUnavailable", "RPCError", "qkd_node", "text", "ident"]
