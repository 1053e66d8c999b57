"""The notification hub on its own (no session, no SSH): /netconf/streams as libyang
encodes it, the replay log's aged time, and create-subscription's input as clients send it."""
from __future__ import annotations

import datetime as dt

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
