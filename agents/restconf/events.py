"""The ETSI 015 notifications (the agent's NETCONF stream) as an RFC 8040 section 6 event
stream: text/event-stream, one `data:` event per notification, in XML (RFC 8040 6.4) or
in JSON ({"ietf-restconf:notification": {...}}); a subscription of the same
NotificationHub that NETCONF sessions subscribe to."""
from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import notifications

log = logging.getLogger(__name__)

STREAM = notifications.STREAM
_IDS = itertools.count(1)
KEEPALIVE = 15.0  # s between comment lines on a quiet stream: a gone client is noticed by the write
NOTIF_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
COMPLETE = "{urn:ietf:params:xml:ns:netmod:notification}notificationComplete"


class Subscriber:
    """What the hub sends notifications to (a NETCONF session's seam): hands each one to the
    event loop of the HTTP connection. Ids are negative, apart from NETCONF's session ids."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fmt: str) -> None:
        self.session_id = -next(_IDS)
        self.loop, self.fmt = loop, fmt
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1000)

    def send_notification(self, notification: etree._Element) -> None:
        data = render(notification, self.fmt)
        last = any(c.tag == COMPLETE for c in notification)
        self.loop.call_soon_threadsafe(self._put, data, last)

    def _put(self, data: bytes, last: bool) -> None:
        try:
            self.queue.put_nowait(data)
            if last:
                self.queue.put_nowait(None)
        except asyncio.QueueFull:  # a reader this slow loses its subscription, as a NETCONF one would
            log.info("event stream subscriber %d too slow: ending it", self.session_id)
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


def render(notification: etree._Element, fmt: str) -> bytes:
    """One SSE event: each line of the notification prefixed `data: ` (RFC 8040 6.4)."""
    if fmt == "json":
        when = notification.findtext(f"{{{NOTIF_NS}}}eventTime")
        body: dict[str, Any] = {"eventTime": when}
        for c in notification:
            if isinstance(c.tag, str) and c.tag != f"{{{NOTIF_NS}}}eventTime":
                try:
                    body.update(yangdata.notification_json(c))
                except yangdata.YangError:  # not of a module (RFC 5277's own): its name only
                    body[etree.QName(c).localname] = {}
        text = json.dumps({"ietf-restconf:notification": body}, indent=2)
    else:
        text = etree.tostring(notification, pretty_print=True).decode()
    return "".join(f"data: {line}\n" for line in text.strip().splitlines()).encode() + b"\n"


async def stream(hub: notifications.NotificationHub, sub: Subscriber, start: dt.datetime | None,
                 stop: dt.datetime | None) -> AsyncIterator[bytes]:
    """The events until the client goes, or stop-time has passed (then notificationComplete)."""
    replay = hub.subscribe(sub, STREAM, None, start, stop)
    try:
        yield b": " + f"subscribed to {STREAM}".encode() + b"\n\n"
        if replay is not None:
            await asyncio.get_running_loop().run_in_executor(None, replay)
        while True:
            try:
                data = await asyncio.wait_for(sub.queue.get(), KEEPALIVE)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if data is None:
                return
            yield data
    finally:
        hub.unsubscribe(sub.session_id)
