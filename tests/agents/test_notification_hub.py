"""The notification hub on its own (no SSH): /netconf/streams as libyang encodes it, the
replay log's aged time, create-subscription's input as clients send it, and the clock that
ends subscriptions at their stopTime (one thread, gone when no subscription needs it)."""
from __future__ import annotations

import datetime as dt
import threading
import time

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import notifications

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NOTIF = notifications.NOTIF_NS
NETMOD = notifications.NETMOD_NOTIF_NS


def _when(el: etree._Element, leaf: str) -> dt.datetime:
    return dt.datetime.fromisoformat(el.findtext(f"{{{NETMOD}}}{leaf}").replace("Z", "+00:00"))


def _stream(hub: notifications.NotificationHub) -> etree._Element:
    [netconf] = yangdata.encode_json(hub.streams()).elements()
    [stream] = netconf.iter(f"{{{NETMOD}}}stream")
    return stream


def test_streams_encode_through_libyang_with_the_aged_time() -> None:
    hub = notifications.NotificationHub(replay_size=2)
    stream = _stream(hub)
    assert stream.findtext(f"{{{NETMOD}}}name") == "NETCONF"
    assert stream.findtext(f"{{{NETMOD}}}replaySupport") == "true"
    assert stream.find(f"{{{NETMOD}}}replayLogAgedTime") is None  # nothing dropped yet
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for i in range(3):
        hub.publish(etree.Element("{urn:x}e"), t0 + dt.timedelta(seconds=i))
    assert _when(stream, "replayLogCreationTime") == hub.created
    assert _when(_stream(hub), "replayLogAgedTime") == t0


def test_ncclient_filter_is_taken_into_the_notification_namespace() -> None:
    op = etree.fromstring(
        f'<create-subscription xmlns="{NOTIF}"><filter xmlns="{NC}" xmlns:t="urn:types" type="subtree">'
        '<event xmlns="urn:x"><kind>t:A</kind></event></filter><stream>NETCONF</stream></create-subscription>')
    fixed = notifications.subscription_input(op)
    assert [etree.QName(c).localname for c in fixed] == ["filter", "stream"]
    filt = fixed.find(f"{{{NOTIF}}}filter")
    assert filt is not None and filt.get("type") == "subtree"
    kind = filt.find("{urn:x}event/{urn:x}kind")
    assert kind.text == "t:A" and kind.nsmap.get("t") == "urn:types"  # the prefix stays declared
    yangdata.check_rpc(fixed)  # what libyang accepts
    assert op.find(f"{{{NC}}}filter") is not None  # the request itself is left alone
    right = etree.fromstring(f'<create-subscription xmlns="{NOTIF}"><filter type="subtree"/></create-subscription>')
    assert notifications.subscription_input(right) is right


class _Session:
    """What the hub needs of a session: an id and send_notification from any thread."""

    def __init__(self, sid: int) -> None:
        self.session_id = sid
        self.sent: list[etree._Element] = []

    def send_notification(self, n: etree._Element) -> None:
        self.sent.append(n)

    def names(self) -> list[str]:
        return [etree.QName(n[1]).localname for n in self.sent]


def _clocks() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "notification-stop-time"]


def _wait(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_stop_time_ends_a_quiet_subscription_after_its_replay() -> None:
    hub = notifications.NotificationHub()
    t0 = notifications.now()
    hub.publish(etree.Element("{urn:x}e"), t0 - dt.timedelta(seconds=1))
    late, quiet = _Session(1), _Session(2)
    replay_late = hub.subscribe(late, "NETCONF", None, t0 - dt.timedelta(seconds=5), t0 + dt.timedelta(seconds=0.3))
    hub.subscribe(quiet, "NETCONF", None, t0 - dt.timedelta(seconds=5), t0 + dt.timedelta(seconds=0.3))()
    assert quiet.names() == ["e", "replayComplete"]
    # both stopTimes pass and no event comes; one replay has not been sent yet
    assert _wait(lambda: quiet.names() == ["e", "replayComplete", "notificationComplete"]), quiet.names()
    time.sleep(0.1)
    assert late.names() == []  # its replay comes first
    replay_late()
    assert _wait(lambda: late.names() == ["e", "replayComplete", "notificationComplete"]), late.names()
    hub.publish(etree.Element("{urn:x}late"))
    assert quiet.names()[-1] == late.names()[-1] == "notificationComplete"  # nothing after it
    assert hub.subscribe(quiet, "NETCONF", None, None, None) is None  # the session may subscribe again
    hub.publish(etree.Element("{urn:x}again"))
    assert quiet.names()[-1] == "again"


def test_one_clock_for_every_stop_time_gone_when_they_are() -> None:
    before = len(_clocks())
    hub = notifications.NotificationHub()
    start, far = notifications.now(), notifications.now() + dt.timedelta(hours=1)
    sessions = [_Session(i) for i in range(50)]
    for s in sessions:
        hub.subscribe(s, "NETCONF", None, start, far)()
    assert len(_clocks()) == before + 1
    for s in sessions:
        hub.unsubscribe(s.session_id)  # the sessions end
    assert _wait(lambda: len(_clocks()) == before)
    assert all(s.names() == ["replayComplete"] for s in sessions)


def test_events_published_during_a_replay_follow_replay_complete() -> None:
    hub = notifications.NotificationHub()
    t0 = notifications.now() - dt.timedelta(seconds=10)
    for i in range(3):
        hub.publish(etree.Element(f"{{urn:x}}old{i}"), t0 + dt.timedelta(seconds=i))
    session = _Session(1)
    replay = hub.subscribe(session, "NETCONF", None, t0, None)
    hub.publish(etree.Element("{urn:x}live"))  # the reply has not gone out: the replay has not started
    replay()
    assert session.names() == ["old0", "old1", "old2", "replayComplete", "live"]
