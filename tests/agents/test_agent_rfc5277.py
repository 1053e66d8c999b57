"""RFC 5277 against a real agent process, the way clients drive it: ncclient's
create-subscription (its filter in the base namespace), the RFC's own example request,
subscriptions that end at their stopTime on a quiet node, /netconf/streams in <get>, the
notification modules advertised and served, and content matches on identities written
with other prefixes (subtree filters of <get> and of subscriptions alike)."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from agentproc import PASSWORD

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NOTIF = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NETMOD = "urn:ietf:params:xml:ns:netmod:notification"
NCM = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"
APP_ID = "c0ffee00-1234-4abc-8def-0123456789ab"


def _time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _take(m, until: set[str] | None = None, timeout: float = 5.0) -> list[etree._Element]:
    """Notifications (whole <notification> elements) until one named in `until` or the timeout."""
    out: list[etree._Element] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = m.take_notification(block=True, timeout=0.2)
        if n is None:
            continue
        el = etree.fromstring(n.notification_xml.encode())
        out.append(el)
        if until and etree.QName(el[1]).localname in until:
            break
    return out


def _names(notifs: list[etree._Element]) -> list[str]:
    return [etree.QName(n[1]).localname for n in notifs]


def _app(op: str = "") -> str:
    attr = f' xmlns:nc="{NC}" nc:operation="{op}"' if op else ""
    body = f"<qkd_app{attr}><app_id>{APP_ID}</app_id>"
    if not op:
        body += "<server_app_id>sae://alice/enc1</server_app_id>"
    return f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}"><qkd_applications>{body}</qkd_app></qkd_applications></qkd_node></config>'


def test_stop_time_ends_the_subscription_on_a_quiet_node(agent) -> None:
    """RFC 5277 2.1.1: the subscription ends at stopTime with notificationComplete, though
    no event comes; the session may then subscribe again."""
    m = agent.connect()
    try:
        start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        stop = _time(start + dt.timedelta(seconds=2.5))
        m.create_subscription(start_time=_time(start), stop_time=stop)
        got = _take(m, until={"notificationComplete"}, timeout=8.0)
        assert _names(got)[-2:] == ["replayComplete", "notificationComplete"], _names(got)
        done = got[-1]
        assert done[1].tag == f"{{{NETMOD}}}notificationComplete"
        assert _parse(done.findtext(f"{{{NOTIF}}}eventTime")) >= _parse(stop)
        # the subscription is over: the same session may create another
        m.create_subscription()
        m.edit_config(target="running", config=_app())
        m.edit_config(target="running", config=_app("delete"))
        assert "sdqkdn_application_disconnected" in _names(_take(m, until={"sdqkdn_application_disconnected"}))
    finally:
        m.close_session()


def test_netconf_stream_is_listed(nc) -> None:
    """RFC 5277 3.2.5.1: /netconf/streams names the NETCONF stream and its replay log."""
    reply = nc.get(filter=("subtree", f'<netconf xmlns="{NETMOD}"><streams/></netconf>')).data
    streams = reply.findall(f"{{{NETMOD}}}netconf/{{{NETMOD}}}streams/{{{NETMOD}}}stream")
    assert [s.findtext(f"{{{NETMOD}}}name") for s in streams] == ["NETCONF"]
    s = streams[0]
    assert s.findtext(f"{{{NETMOD}}}description")
    assert s.findtext(f"{{{NETMOD}}}replaySupport") == "true"
    created = _parse(s.findtext(f"{{{NETMOD}}}replayLogCreationTime"))
    assert created <= dt.datetime.now(dt.timezone.utc)


def test_notification_modules_are_advertised_and_served(nc) -> None:
    caps = set(nc.server_capabilities)
    assert f"{NOTIF}?module=notifications&revision=2008-07-14" in caps
    assert f"{NETMOD}?module=nc-notifications&revision=2008-07-14" in caps
    assert "rpc create-subscription" in nc.get_schema("notifications").data
    assert "list stream" in nc.get_schema("nc-notifications", version="2008-07-14").data
    reply = nc.get(filter=("subtree", f'<netconf-state xmlns="{NCM}"><schemas/></netconf-state>')).data
    listed = {s.findtext(f"{{{NCM}}}identifier"): s.findtext(f"{{{NCM}}}namespace") for s in reply.iter(f"{{{NCM}}}schema")}
    assert listed.get("notifications") == NOTIF and listed.get("nc-notifications") == NETMOD


def _watch_minor_events(agent, prefix_ns: str):
    """A subscription through ncclient (filter in the base namespace) that selects
    'event' notifications of MINOR severity, the identity written with prefix s bound
    to `prefix_ns`; an application is created and deleted meanwhile."""
    watcher, nc = agent.connect(), agent.connect()
    try:
        watcher.create_subscription(filter=("subtree", (
            f'<event xmlns="{ETSI}"><application><severity xmlns:s="{prefix_ns}">s:MINOR</severity>'
            "</application></event>")))
        nc.edit_config(target="running", config=_app())
        nc.edit_config(target="running", config=_app("delete"))
        return _take(watcher, timeout=2.0)
    finally:
        watcher.close_session()
        nc.close_session()


def test_subscription_filter_from_ncclient_matches_identities_by_namespace(agent) -> None:
    """ncclient puts create-subscription's filter in the base namespace: it is taken as the
    RFC's, checked by libyang, and applied; its identityref content match compares the
    identity (namespace and name), not the prefix text (the data says etsi-qkdn-types:MINOR)."""
    got = _watch_minor_events(agent, TYPES)
    assert _names(got) == ["event"], _names(got)  # the app's creation; not its deletion
    sev = got[0].find(f".//{{{ETSI}}}severity")
    assert sev.text.split(":")[0] != "s"  # written by the server with its own prefix
    assert _names(_watch_minor_events(agent, "urn:example:not-the-etsi-types")) == []


def test_rfc5277_example_request_and_bad_parameters(nc) -> None:
    """The RFC's own form (filter in the notification namespace, netconf:type attribute),
    and create-subscription's input checked against the notifications module."""
    good = etree.fromstring(
        f'<create-subscription xmlns="{NOTIF}" xmlns:netconf="{NC}"><stream>NETCONF</stream>'
        f'<filter netconf:type="subtree"><event xmlns="{ETSI}"/></filter></create-subscription>')
    nc.dispatch(good)
    with pytest.raises(RPCError) as err:
        nc.dispatch(good)
    assert err.value.tag == "in-use"  # one subscription per session


@pytest.mark.parametrize("body, tag", [
    ("<startTime>yesterday</startTime>", "invalid-value"),
    ("<stream>NETCONF</stream><bogus/>", "unknown-element"),
    (f"<stopTime>{_time(dt.datetime.now(dt.timezone.utc))}</stopTime>", "missing-element"),
    ("<stream>nope</stream>", "invalid-value"),
])
def test_bad_create_subscription_is_refused(agent, body, tag) -> None:
    m = agent.connect()
    try:
        with pytest.raises(RPCError) as err:
            m.dispatch(etree.fromstring(f'<create-subscription xmlns="{NOTIF}">{body}</create-subscription>'))
        assert err.value.tag == tag
    finally:
        m.close_session()


def test_yangcli_creates_a_subscription(agent, tmp_path) -> None:
    """yangcli learns create-subscription from the advertised notifications module."""
    yangcli = shutil.which("yangcli")
    if yangcli is None:
        pytest.fail("yangcli is not installed (make test installs Debian's yangcli)")
    script = tmp_path / "sub.yc"
    script.write_text("create-subscription\n")
    out = subprocess.run(
        [yangcli, "--server=127.0.0.1", f"--ncport={agent.port}", "--user=admin", f"--password={PASSWORD}",
         "--batch-mode", f"--run-script={script}"],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    text = out.stdout + out.stderr
    assert "RPC OK Reply" in text, text[-3000:]
