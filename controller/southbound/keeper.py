"""The session life both southbound transports share (southbound/agent.py over NETCONF,
southbound/restconf.py over RESTCONF): one thread keeps the agent's session up with
doubling backoff; after each (re)connect the agent is read in full, then `on_up`; the
notifications are pumped until the session ends, then `on_lost` and a reconnect.

A transport says how to open a session (its `_session()` context: connected, subscribed
and resynced when it yields), how to pump it, and what to drop when it ends.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from lxml import etree

from sdqkd.controller.southbound.interface import AgentAddress

log = logging.getLogger(__name__)

# Reconnect delays, doubling from the first to the cap. The cap bounds how long a restarted
# agent waits to be reconnected, and so reconciled and used again (with 10 s, a restart after
# ~10 s down waited up to 6.4 s more); a refused connect every 2 s per dead agent costs nothing.
BACKOFF = (0.2, 2.0)


class SessionKeeper:
    """Keeps one session up; `on_state(conn)` after each resync, `on_up(conn)` once per
    (re)connection after its first resync (where the controller reconciles the agent),
    `on_lost(conn)` when a session that was up ends, `on_notification(conn, element)`."""

    closed_reason = "session closed"  # last_error when the agent ends the session

    def __init__(self, addr: AgentAddress, on_state: Callable[[Any], None],
                 on_notification: Callable[[Any, etree._Element], None],
                 backoff: tuple[float, float] = BACKOFF,
                 on_lost: Callable[[Any], None] | None = None,
                 on_up: Callable[[Any], None] | None = None) -> None:
        self.addr = addr
        self.on_state, self.on_notification, self.on_lost, self.on_up = on_state, on_notification, on_lost, on_up
        self.backoff = backoff
        self.data: etree._Element | None = None  # the last full read, as NETCONF's <data>
        self.connected = threading.Event()  # up: the session open and the agent read
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._read_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"agent-{addr.name}", daemon=True)

    @property
    def qkdn_id(self) -> str:
        return self.addr.qkdn_id

    def start(self) -> None:
        self._thread.start()

    def is_up(self) -> bool:
        return self.connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def _join(self) -> None:
        if self._thread.ident is not None:
            self._thread.join(5)

    # --- what a transport provides -----------------------------------------------------------

    def _session(self) -> contextlib.AbstractContextManager[Any]:
        """Open the session, subscribe to the agent's notifications and read it in full;
        yields what `_pump` reads; leaving it closes what it opened."""
        raise NotImplementedError

    def _pump(self, session: Any) -> None:
        """Hand the session's notifications to on_notification until it ends or stop()."""
        raise NotImplementedError

    def _describe(self, session: Any) -> str:
        return ""

    def _dropped(self) -> None:
        """Forget the ended session (requests fail as AgentUnavailable from now on)."""

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                with self._session() as session:
                    self.connected.set()
                    self.last_error = None
                    delay = self.backoff[0]
                    log.info("agent %s connected%s", self.addr.name, self._describe(session))
                    self._handle(self.on_up, "on_up")
                    self._pump(session)
                if not self._stop.is_set():
                    self.last_error = self.closed_reason
                    log.info("agent %s: %s", self.addr.name, self.closed_reason)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect later
                if not self._stop.is_set():
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.info("agent %s unavailable: %s", self.addr.name, self.last_error)
            self._dropped()
            was_up = self.connected.is_set()
            self.connected.clear()
            if was_up and not self._stop.is_set() and self.on_lost is not None:
                self.on_lost(self)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.backoff[1])

    def _handle(self, handler: Callable[[Any], None] | None, what: str) -> None:
        if handler is None:
            return
        try:
            handler(self)
        except Exception:  # noqa: BLE001 - the session stays up whatever the handler does
            log.exception("%s handler failed for %s", what, self.addr.name)

