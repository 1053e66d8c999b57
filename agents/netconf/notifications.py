"""RFC 5277 event notifications: subscriptions, filtering, and a bounded replay log."""
from __future__ import annotations

import copy
import datetime as dt
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from sdqkd.agents.netconf import errors
from sdqkd.agents.datastore import subtree

log = logging.getLogger(__name__)

BASE_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
NOTIF_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NETMOD_NOTIF_NS = "urn:ietf:params:xml:ns:netmod:notification"
STREAM = "NETCONF"
STREAM_DESCRIPTION = "Default NETCONF event stream: the node's ETSI GS QKD 015 notifications and sdqkd device events"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str, what: str) -> dt.datetime:
    """RFC 3339 date-and-time (yang:date-and-time)."""
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise errors.protocol(errors.InvalidValue, f"{what} '{text}' is not an RFC 3339 date-and-time", info={"bad-element": what}) from None
    if t.tzinfo is None:
        raise errors.protocol(errors.InvalidValue, f"{what} needs a time zone", info={"bad-element": what})
    return t


@dataclass(eq=False)
class _Subscription:
    session: Any
    filter: etree._Element | None
    stop: dt.datetime | None
    replaying: bool = False  # its replay is still being sent: it cannot complete yet
    done: bool = False  # notificationComplete was sent (or is going out): nothing more
    lock: threading.Lock = field(default_factory=threading.Lock)  # one sender at a time
    held: list[tuple[dt.datetime, etree._Element]] = field(default_factory=list)  # live events during the replay


def _wrap(event_time: dt.datetime, content: etree._Element) -> etree._Element:
    n = etree.Element(f"{{{NOTIF_NS}}}notification", nsmap={None: NOTIF_NS})
    etree.SubElement(n, f"{{{NOTIF_NS}}}eventTime").text = format_time(event_time)
    n.append(content)
    return n


def subscription_input(op: etree._Element) -> etree._Element:
    """create-subscription as RFC 5277 writes it, whatever the client sent: its <filter>
    belongs to the notification namespace, but ncclient (and other clients that build
    the filter of <get>) put it in the NETCONF base namespace. Other operations, and
    requests already right, come back unchanged."""
    q = etree.QName(op)
    if (q.namespace, q.localname) != (NOTIF_NS, "create-subscription"):
        return op
    base = op.find(f"{{{BASE_NS}}}filter")
    if base is None:
        return op
    fixed = copy.deepcopy(op)
    old = fixed.find(f"{{{BASE_NS}}}filter")
    # the prefixes declared on the filter stay declared: content matches may use them
    new = etree.Element(f"{{{NOTIF_NS}}}filter", attrib=dict(old.attrib),
                        nsmap={p: ns for p, ns in old.nsmap.items() if p is not None})
    new.text = old.text
    new.extend(list(old))
    old.addprevious(new)
    fixed.remove(old)
    return fixed


class NotificationHub:
    """Fans agent events out to subscribed sessions, and ends the subscriptions that have a
    stopTime when it comes (RFC 5277 2.1.1), events or not: one clock thread, alive only
    while such a subscription exists."""

    def __init__(self, replay_size: int = 1000) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._subs: dict[int, _Subscription] = {}
        self._log: deque[tuple[dt.datetime, etree._Element]] = deque(maxlen=replay_size)
        self.created = now()
        self._aged: dt.datetime | None = None  # the newest event the bounded log dropped
        self._clock: threading.Thread | None = None

    def replay_start(self) -> dt.datetime:
        with self._lock:
            return self._log[0][0] if self._log else self.created

    def streams(self) -> dict[str, Any]:
        """/netconf/streams (RFC 5277 3.2.5.1) as RFC 7951 JSON: <get> encodes it through libyang."""
        with self._lock:
            aged = self._aged
        stream: dict[str, Any] = {"name": STREAM, "description": STREAM_DESCRIPTION, "replaySupport": True,
                                  "replayLogCreationTime": format_time(self.created)}
        if aged is not None:
            stream["replayLogAgedTime"] = format_time(aged)
        return {"nc-notifications:netconf": {"streams": {"stream": [stream]}}}

    def subscribe(
        self, session: Any, stream: str, filt: etree._Element | None, start: dt.datetime | None, stop: dt.datetime | None
    ) -> Callable[[], None] | None:
        """Register; returns the replay to run once the <ok/> reply has gone out."""
        if stream != STREAM:
            raise errors.InvalidValue(f"unknown stream '{stream}' (this server has '{STREAM}')", info={"bad-element": "stream"})
        if stop is not None and start is None:
            raise errors.protocol(errors.MissingElement, "stopTime needs startTime", info={"bad-element": "startTime"})
        if start is not None and start > now():
            raise errors.InvalidValue("startTime is in the future", info={"bad-element": "startTime"})
        if stop is not None and start is not None and stop < start:
            raise errors.InvalidValue("stopTime is before startTime", info={"bad-element": "stopTime"})
        with self._lock:
            if session.session_id in self._subs:
                raise errors.InUse("this session already has a subscription")
            sub = _Subscription(session, filt, stop, replaying=start is not None)
            self._subs[session.session_id] = sub
            replay = [(t, c) for t, c in self._log if start is not None and t >= start and (stop is None or t <= stop)]
            if stop is not None:
                self._arm()
        if start is None:
            return None
        return lambda: self._replay(sub, replay)

    def _replay(self, sub: _Subscription, events: list[tuple[dt.datetime, etree._Element]]) -> None:
        """The replayed events, replayComplete, then the live events published meanwhile
        (RFC 5277 2.1.1: new events follow the replay), in that order."""
        for t, content in events:
            self._deliver(sub, t, content)
        self._send(sub, now(), etree.Element(f"{{{NETMOD_NOTIF_NS}}}replayComplete", nsmap={None: NETMOD_NOTIF_NS}))
        while True:
            with sub.lock:
                held, sub.held = sub.held, []
                if not held:
                    sub.replaying = False
                    break
            for t, content in held:
                self._deliver(sub, t, content)
        with self._lock:
            self._wake.notify()  # the clock may end it now

    def unsubscribe(self, session_id: int) -> None:
        with self._lock:
            if self._subs.pop(session_id, None) is not None:
                self._wake.notify()

    def publish(self, content: etree._Element, event_time: dt.datetime | None = None) -> None:
        """Send one event (the notification's content element) to every subscriber."""
        t = event_time or now()
        with self._lock:
            if self._log.maxlen is not None and len(self._log) == self._log.maxlen:
                self._aged = self._log[0][0]
            self._log.append((t, content))
            subs = list(self._subs.values())
        for sub in subs:
            if sub.stop is not None and t > sub.stop:  # later events: the clock ends the subscription
                continue
            with sub.lock:
                if sub.replaying:
                    sub.held.append((t, content))
                    continue
            self._deliver(sub, t, content)

    def _deliver(self, sub: _Subscription, t: dt.datetime, content: etree._Element) -> None:
        selected = subtree.apply([content], sub.filter) if sub.filter is not None else [content]
        if selected:
            self._send(sub, t, selected[0])

    def _send(self, sub: _Subscription, t: dt.datetime, content: etree._Element, *, last: bool = False) -> None:
        """One notification to the subscriber, unless its subscription has ended; `last`
        ends it (nothing is sent to it after that)."""
        with sub.lock:
            if sub.done:
                return
            sub.done = last
            try:
                sub.session.send_notification(_wrap(t, etree.fromstring(etree.tostring(content))))
            except Exception:  # noqa: BLE001 - a dead session must not stop the others
                log.info("dropping subscription of session %s", getattr(sub.session, "session_id", "?"))
                sub.done = True
        if sub.done:
            self._drop(sub)

    def _drop(self, sub: _Subscription) -> None:
        """Forget `sub` (not a newer subscription of the same session)."""
        with self._lock:
            sid = getattr(sub.session, "session_id", None)
            if self._subs.get(sid) is sub:  # type: ignore[arg-type]
                del self._subs[sid]  # type: ignore[arg-type]
                self._wake.notify()

    def _complete(self, sub: _Subscription) -> None:
        self._send(sub, now(), etree.Element(f"{{{NETMOD_NOTIF_NS}}}notificationComplete",
                                             nsmap={None: NETMOD_NOTIF_NS}), last=True)

    # --- stopTime ---------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure the clock runs and sees the subscriptions as they are now (under the lock)."""
        if self._clock is None:
            self._clock = threading.Thread(target=self._run_clock, name="notification-stop-time", daemon=True)
            self._clock.start()
        else:
            self._wake.notify()

    def _run_clock(self) -> None:
        """End each subscription at its stopTime; return when none is left to end."""
        while True:
            with self._lock:
                due = self._wait_for_due()
                if not due:
                    self._clock = None
                    return
            for sub in due:
                self._complete(sub)

    def _wait_for_due(self) -> list[_Subscription]:
        """Subscriptions past their stopTime with their replay sent, waiting (lock released)
        until there is one; [] when no subscription has a stopTime any more."""
        while True:
            timed = [s for s in self._subs.values() if s.stop is not None and not s.done]
            if not timed:
                return []
            t = now()
            ready = [s for s in timed if not s.replaying]
            due = [s for s in ready if s.stop is not None and s.stop <= t]
            if due:
                return due
            first = min((s.stop for s in ready if s.stop is not None), default=None)
            self._wake.wait(None if first is None else max(0.0, (first - t).total_seconds()))
