"""RESTCONF (RFC 8040) on a real agent process over HTTPS: the API root, every data
method and query parameter, errors, entity-tags, authentication, the NETCONF lock, libyang
validation and the event stream."""
from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from lxml import etree

from restconfproc import RestconfAgent, start

JSON = "application/yang-data+json"
XML = "application/yang-data+xml"
NODE = "/restconf/data/etsi-qkd-sdn-node:qkd_node"
LINK = "11111111-2222-4333-8444-555555555555"
PEER = "3b1e7c22-5d4f-4a9b-9e0c-6a7b8c9d0e1f"
APP = "c0ffee00-1234-4abc-8def-0123456789ab"


@pytest.fixture(scope="module")
def rc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestconfAgent]:
    a = start(tmp_path_factory.mktemp("restconf"))
    yield a
    a.stop()


@pytest.fixture
def c(rc: RestconfAgent) -> Iterator[httpx.Client]:
    with rc.client() as client:
        yield client


def link(bw: int = 1000, qkdl_id: str = LINK) -> dict[str, Any]:
    return {"qkdl_id": qkdl_id, "qkdl_type": "etsi-qkd-node-types:VIRT", "qkdl_remote": {"qkdn_id": PEER},
            "virt_bandwidth": bw}


def send(c: httpx.Client, method: str, url: str, body: Any = None, **headers: str) -> httpx.Response:
    hdrs = {"Content-Type": JSON, **headers}
    return c.request(method, url, content=None if body is None else json.dumps(body), headers=hdrs)


def error(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"] == JSON
    errs = r.json()["ietf-restconf:errors"]["error"]
    return errs[0]


def test_discovery_and_api_root(c: httpx.Client) -> None:
    r = c.get("/.well-known/host-meta")
    assert r.status_code == 200
    link_el = etree.fromstring(r.content).find("{http://docs.oasis-open.org/ns/xri/xrd-1.0}Link")
    assert link_el.get("rel") == "restconf" and link_el.get("href") == "/restconf"
    root = c.get("/restconf").json()["ietf-restconf:restconf"]
    assert root["yang-library-version"] == "2019-01-04"
    assert c.get("/restconf/yang-library-version").json() == {"ietf-restconf:yang-library-version": "2019-01-04"}
    xml = c.get("/restconf", headers={"Accept": XML})
    assert xml.headers["content-type"] == XML and etree.QName(etree.fromstring(xml.content)).localname == "restconf"
    lib = c.get("/restconf/data/ietf-yang-library:yang-library").json()["ietf-yang-library:yang-library"]
    names = {m["name"] for ms in lib["module-set"] for m in ms.get("module", [])}
    assert {"etsi-qkd-sdn-node", "ietf-restconf", "ietf-yang-library"} <= names
    opts = c.options(NODE)
    assert set(opts.headers["allow"].split(",")) == {"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"}
    assert JSON in opts.headers["accept-patch"]


def test_get_json_xml_and_head(rc: RestconfAgent, c: httpx.Client) -> None:
    r = c.get(NODE)
    assert r.status_code == 200 and r.headers["content-type"] == JSON
    node = r.json()["etsi-qkd-sdn-node:qkd_node"]
    assert node["qkdn_id"] == rc.agent.qkdn_id and node["qkdn_status"].startswith("etsi-qkd-node-types:")
    x = c.get(NODE, headers={"Accept": XML})
    el = etree.fromstring(x.content)
    assert el.tag == "{urn:etsi:qkd:yang:etsi-qkd-node}qkd_node"
    assert el.findtext("{urn:etsi:qkd:yang:etsi-qkd-node}qkdn_id") == rc.agent.qkdn_id
    h = c.head(NODE)
    assert h.status_code == 200 and h.content == b"" and h.headers["etag"] == r.headers["etag"]
    leaf = c.get(f"{NODE}/qkdn_id").json()
    assert leaf == {"etsi-qkd-sdn-node:qkdn_id": rc.agent.qkdn_id}
    whole = c.get("/restconf/data").json()["ietf-restconf:data"]
    assert "etsi-qkd-sdn-node:qkd_node" in whole
    assert c.get(NODE, headers={"Accept": "text/html"}).status_code == 406


def test_query_parameters(c: httpx.Client) -> None:
    assert send(c, "PUT", f"{NODE}/qkd_links/qkd_link={LINK}", {"etsi-qkd-sdn-node:qkd_link": [link()]}).status_code in (201, 204)
    try:
        d1 = c.get(NODE, params={"depth": "1"}).json()
        assert d1 == {"etsi-qkd-sdn-node:qkd_node": {}}
        d2 = c.get(NODE, params={"depth": "2"}).json()["etsi-qkd-sdn-node:qkd_node"]
        assert d2["qkd_links"] == {} and "qkdn_id" in d2
        f = c.get(NODE, params={"fields": "qkdn_id;qkd_links/qkd_link(virt_bandwidth)"}).json()["etsi-qkd-sdn-node:qkd_node"]
        assert set(f) == {"qkdn_id", "qkd_links"}
        assert f["qkd_links"]["qkd_link"] == [{"qkdl_id": LINK, "virt_bandwidth": 1000}]
        conf = c.get(NODE, params={"content": "config"}).json()["etsi-qkd-sdn-node:qkd_node"]
        assert "qkdn_status" not in conf and "qkdn_id" in conf
        state = c.get(NODE, params={"content": "nonconfig"}).json()["etsi-qkd-sdn-node:qkd_node"]
        assert "qkdn_status" in state and "qkdn_location_id" not in state
        caps = f"{NODE}/qkdn_capabilities"
        assert c.get(caps, params={"content": "config", "with-defaults": "trim"}).status_code in (200, 404)
        full = c.get(caps, params={"content": "config", "with-defaults": "report-all"}).json()
        assert full["etsi-qkd-sdn-node:qkdn_capabilities"]["link_stats_support"] is True
        for bad in ({"depth": "0"}, {"content": "some"}, {"with-defaults": "sometimes"}, {"fields": "a("},
                    {"nonsense": "1"}):
            r = c.get(NODE, params=bad)
            assert r.status_code == 400 and error(r)["error-tag"] == "invalid-value", bad
        r = send(c, "DELETE", f"{NODE}/qkd_links/qkd_link={LINK}?depth=1")
        assert r.status_code == 400  # depth is for GET only
    finally:
        send(c, "DELETE", f"{NODE}/qkd_links/qkd_link={LINK}")


def test_post_put_patch_delete(c: httpx.Client) -> None:
    url = f"{NODE}/qkd_links/qkd_link={LINK}"
    r = send(c, "POST", f"{NODE}/qkd_links", {"etsi-qkd-sdn-node:qkd_link": [link()]})
    assert r.status_code == 201
    assert r.headers["location"].endswith(f"/restconf/data/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link={LINK}")
    again = send(c, "POST", f"{NODE}/qkd_links", {"etsi-qkd-sdn-node:qkd_link": [link()]})
    assert again.status_code == 409 and error(again)["error-tag"] == "data-exists"
    r = send(c, "PATCH", url, {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": LINK, "virt_bandwidth": 2000}]})
    assert r.status_code == 204
    got = c.get(url).json()["etsi-qkd-sdn-node:qkd_link"][0]
    assert got["virt_bandwidth"] == 2000 and got["qkdl_remote"] == {"qkdn_id": PEER}  # merged
    r = send(c, "PUT", url, {"etsi-qkd-sdn-node:qkd_link": [{**link(3000), "qkdl_remote": {"qkdn_id": PEER}}]})
    assert r.status_code == 204  # replaced
    r = send(c, "PUT", f"{url}/virt_bandwidth", {"etsi-qkd-sdn-node:virt_bandwidth": 4000})
    assert r.status_code == 204 and c.get(f"{url}/virt_bandwidth").json() == {"etsi-qkd-sdn-node:virt_bandwidth": 4000}
    mismatch = send(c, "PUT", url, {"etsi-qkd-sdn-node:qkd_link": [link(qkdl_id=PEER)]})
    assert mismatch.status_code == 400
    xml = (f'<qkd_link xmlns="urn:etsi:qkd:yang:etsi-qkd-node"><qkdl_id>{LINK}</qkdl_id>'
           "<virt_bandwidth>5000</virt_bandwidth></qkd_link>")
    r = c.patch(url, content=xml, headers={"Content-Type": XML})
    assert r.status_code == 204 and c.get(f"{url}/virt_bandwidth").json()["etsi-qkd-sdn-node:virt_bandwidth"] == 5000
    assert send(c, "DELETE", url).status_code == 204
    assert c.get(url).status_code == 404
    gone = send(c, "DELETE", url)
    assert gone.status_code == 409 and error(gone)["error-tag"] == "data-missing"
    r = send(c, "PATCH", url, {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": LINK, "virt_bandwidth": 1}]})
    assert r.status_code == 404  # PATCH never creates its target
    r = send(c, "PUT", url, {"etsi-qkd-sdn-node:qkd_link": [link()]})
    assert r.status_code == 201  # PUT does
    assert send(c, "DELETE", url).status_code == 204
    assert c.post(f"{NODE}/qkd_links", content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
    bad = c.post(f"{NODE}/qkd_links", content="{not json", headers={"Content-Type": JSON})
    assert bad.status_code == 400 and error(bad)["error-tag"] == "malformed-message"


def test_errors_carry_path_and_tag(c: httpx.Client) -> None:
    r = send(c, "POST", f"{NODE}/qkd_links", {"etsi-qkd-sdn-node:qkd_link": [link(bw=1 << 40)]})
    assert r.status_code == 400
    e = error(r)
    assert e["error-type"] == "application" and e["error-tag"] == "invalid-value"
    assert e["error-path"] == f"/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link[qkdl_id='{LINK}']/virt_bandwidth"
    r = c.get("/restconf/data/etsi-qkd-sdn-node:no_such_node")
    assert r.status_code == 400 and error(r)["error-tag"] == "unknown-element"
    r = c.get(f"{NODE}/qkd_links/qkd_link")  # a list needs its keys
    assert r.status_code == 400 and error(r)["error-tag"] == "invalid-value"
    x = c.get("/restconf/data/etsi-qkd-sdn-node:no_such_node", headers={"Accept": XML})
    el = etree.fromstring(x.content)
    assert el.tag == "{urn:ietf:params:xml:ns:yang:ietf-restconf}errors"
    assert c.get(f"{NODE}/qkd_links/qkd_link={PEER}").status_code == 404
    trace = c.request("TRACE", NODE)
    assert trace.status_code == 405 and error(trace)["error-tag"] == "operation-not-supported"
    assert "PATCH" in trace.headers["allow"]
    assert c.delete("/restconf").headers["allow"] == "GET,HEAD,OPTIONS"
    assert c.get(f"{NODE}/qkd_applications/qkd_app={APP}").status_code == 404


def test_authentication(rc: RestconfAgent) -> None:
    with rc.client(auth=None) as anon:
        r = anon.get(NODE)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert error(r)["error-tag"] == "access-denied"
    with rc.client(auth=("admin", "wrong")) as bad:
        t0 = time.monotonic()
        assert bad.get(NODE).status_code == 401
        assert time.monotonic() - t0 >= 0.4  # answered late, as a wrong NETCONF password is
    with rc.client(auth=None, cert=rc.client_cert) as by_cert:
        assert by_cert.get(NODE).status_code == 200
    with rc.client(auth=None, cert=rc.stranger_cert) as stranger:
        assert stranger.get(NODE).status_code == 401


def test_etags_and_preconditions(c: httpx.Client) -> None:
    first = c.get(NODE)
    tag, modified = first.headers["etag"], first.headers["last-modified"]
    assert c.get(NODE, headers={"If-None-Match": tag}).status_code == 304
    assert c.get(NODE, headers={"If-Modified-Since": modified}).status_code == 304
    url = f"{NODE}/qkd_links/qkd_link={LINK}"
    stale = send(c, "PUT", url, {"etsi-qkd-sdn-node:qkd_link": [link()]}, **{"If-Match": '"not-the-tag"'})
    assert stale.status_code == 412
    time.sleep(1.1)  # Last-Modified has one-second resolution
    r = send(c, "PUT", url, {"etsi-qkd-sdn-node:qkd_link": [link()]}, **{"If-Match": tag})
    assert r.status_code == 201 and r.headers["etag"] != tag
    assert r.headers["last-modified"] != modified
    assert send(c, "PATCH", url, {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": LINK, "virt_bandwidth": 7}]},
                **{"If-Match": tag}).status_code == 412  # the tag moved with the edit
    assert send(c, "DELETE", url, **{"If-Unmodified-Since": modified}).status_code == 412
    assert send(c, "DELETE", url, **{"If-Match": r.headers["etag"]}).status_code == 204


def test_netconf_lock_denies_restconf_edits(rc: RestconfAgent, c: httpx.Client) -> None:
    url = f"{NODE}/qkd_links/qkd_link={LINK}"
    m = rc.agent.connect()
    try:
        m.lock("running")
        r = send(c, "PUT", url, {"etsi-qkd-sdn-node:qkd_link": [link()]})
        assert r.status_code == 409
        e = error(r)
        assert e["error-tag"] == "lock-denied" and e["error-info"]["session-id"] == str(m.session_id)
        assert c.get(NODE).status_code == 200  # reads go on
        m.unlock("running")
        assert send(c, "PUT", url, {"etsi-qkd-sdn-node:qkd_link": [link()]}).status_code == 201
        # NETCONF sees the RESTCONF edit: one datastore
        assert LINK in m.get_config("running").data_xml
        # a candidate lock, and a confirmed commit pending, would overwrite or roll back a
        # RESTCONF edit to running: refused the same way
        m.lock("candidate")
        r = send(c, "PATCH", url, {"etsi-qkd-sdn-node:qkd_link": [link(bw=2000)]})
        assert r.status_code == 409 and error(r)["error-tag"] == "lock-denied"
        assert error(r)["error-info"]["session-id"] == str(m.session_id)
        m.commit(confirmed=True, timeout="60")
        m.unlock("candidate")
        r = send(c, "PATCH", url, {"etsi-qkd-sdn-node:qkd_link": [link(bw=2000)]})
        assert r.status_code == 409 and "confirmed commit" in error(r)["error-message"]
        m.commit()  # confirmed
        assert send(c, "PATCH", url, {"etsi-qkd-sdn-node:qkd_link": [link(bw=2000)]}).status_code == 204
    finally:
        send(c, "DELETE", url)
        m.close_session()


def test_event_stream_gets_notifications(rc: RestconfAgent, c: httpx.Client) -> None:
    state = c.get("/restconf/data/ietf-restconf-monitoring:restconf-state/streams").json()
    stream = state["ietf-restconf-monitoring:streams"]["stream"][0]
    location = next(a["location"] for a in stream["access"] if a["encoding"] == "json")
    lines: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def listen() -> None:
        with rc.client() as sc, sc.stream("GET", location, headers={"Accept": "text/event-stream"}) as resp:
            lines.put(f"status {resp.status_code} {resp.headers['content-type']}")
            for line in resp.iter_lines():
                lines.put(line)
                if stop.is_set():
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert lines.get(timeout=10) == "status 200 text/event-stream"
    assert lines.get(timeout=10).startswith(":")  # subscribed
    app = {"app_id": APP, "app_type": "etsi-qkd-node-types:CLIENT", "server_app_id": "sae://alice/enc1",
           "app_qos": {"max_bandwidth": 2048, "min_bandwidth": 256}}
    try:
        r = send(c, "POST", f"{NODE}/qkd_applications", {"etsi-qkd-sdn-node:qkd_app": [app]})
        assert r.status_code == 201
        event: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = lines.get(timeout=10)
            if line.startswith("data: "):
                event.append(line[6:])
            elif event and line == "":
                break
        notif = json.loads("\n".join(event))["ietf-restconf:notification"]
        assert "eventTime" in notif
        assert notif["etsi-qkd-sdn-node:event"]["application"]["app_id"] == APP
    finally:
        stop.set()
        send(c, "DELETE", f"{NODE}/qkd_applications/qkd_app={APP}")
        t.join(20)


def test_datastore_resource_and_its_query_parameters(c: httpx.Client) -> None:
    assert c.get("/restconf/data", params={"depth": "1"}).json() == {"ietf-restconf:data": {}}
    some = c.get("/restconf/data", params={"fields": "etsi-qkd-sdn-node:qkd_node/qkdn_id"}).json()["ietf-restconf:data"]
    assert list(some) == ["etsi-qkd-sdn-node:qkd_node"] and list(some["etsi-qkd-sdn-node:qkd_node"]) == ["qkdn_id"]
    conf = c.get("/restconf/data", params={"content": "config"}).json()["ietf-restconf:data"]
    assert "ietf-yang-library:yang-library" not in conf and "qkdn_status" not in conf["etsi-qkd-sdn-node:qkd_node"]
    x = c.get("/restconf/data", params={"depth": "3"}, headers={"Accept": XML})
    root = etree.fromstring(x.content)
    assert root.tag == "{urn:ietf:params:xml:ns:yang:ietf-restconf}data"
    assert root.find("{urn:etsi:qkd:yang:etsi-qkd-node}qkd_node") is not None


def test_semantic_checks_are_the_netconf_ones(rc: RestconfAgent, c: httpx.Client) -> None:
    before = c.get(NODE, params={"content": "config"}).headers["etag"]
    bad = {"qkdl_id": LINK, "qkdl_type": "etsi-qkd-node-types:PHYS", "qkdl_local": {"qkdi_id": 99}}
    r = send(c, "POST", f"{NODE}/qkd_links", {"etsi-qkd-sdn-node:qkd_link": [bad]})
    assert r.status_code == 400
    errs = r.json()["ietf-restconf:errors"]["error"]
    assert sorted(e["error-tag"] for e in errs) == ["invalid-value", "missing-element"]  # no interface 99, no remote
    where = f"/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link[qkdl_id='{LINK}']"
    assert {e["error-path"] for e in errs} == {f"{where}/qkdl_local/qkdi_id", f"{where}/qkdl_remote/qkdn_id"}
    assert c.get(NODE).headers["etag"] == before  # nothing changed


def test_event_stream_replays_in_xml_and_ends_at_stop_time(rc: RestconfAgent, c: httpx.Client) -> None:
    app = {"app_id": APP, "app_type": "etsi-qkd-node-types:CLIENT", "server_app_id": "sae://alice/enc1"}
    assert send(c, "POST", f"{NODE}/qkd_applications", {"etsi-qkd-sdn-node:qkd_app": [app]}).status_code == 201
    assert send(c, "DELETE", f"{NODE}/qkd_applications/qkd_app={APP}").status_code == 204
    time.sleep(0.2)
    stop = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    params = {"start-time": "2000-01-01T00:00:00Z", "stop-time": stop}
    with rc.client() as sc, sc.stream("GET", "/restconf/streams/NETCONF/xml", params=params) as resp:
        assert resp.status_code == 200
        text = "\n".join(line[6:] for line in resp.iter_lines() if line.startswith("data: "))  # ends by itself
    assert "sdqkdn_application_disconnected" in text
    assert text.index("replayComplete") < text.index("notificationComplete")
    assert c.get("/restconf/streams/NETCONF/xml", params={"start-time": "2999-01-01T00:00:00Z"}).status_code == 400
    assert c.get("/restconf/streams/OTHER/json").status_code == 404


def test_hostile_json_bodies_are_malformed_messages(c: httpx.Client) -> None:
    """The agent's one JSON parser and its limits (agents/kms/https.parse_json) guard RESTCONF
    too: deep nesting, huge numbers and NaN are 400 malformed-message, never a 500, and the
    agent still answers."""
    url = f"{NODE}/qkd_links"
    hdrs = {"Content-Type": JSON}
    for raw in (b"[" * 100_000 + b"]" * 100_000,
                b'{"etsi-qkd-sdn-node:qkd_link": [{"virt_bandwidth": ' + b"9" * 5000 + b"}]}",
                b'{"etsi-qkd-sdn-node:qkd_link": [{"virt_bandwidth": NaN}]}',
                b'{"a": ' * 40 + b"1" + b"}" * 40):
        r = c.post(url, content=raw, headers=hdrs)
        assert r.status_code == 400, (raw[:40], r.status_code, r.text[:200])
        e = error(r)
        assert e["error-tag"] == "malformed-message" and e["error-type"] == "rpc"
    assert c.get(NODE).status_code == 200


@pytest.mark.parametrize("target", [
    "?depth=0", "?depth=-1", "?depth=99999999999999999999999", "?depth=abc", "?depth=1&depth=2",
    "?fields=" + "(" * 5000, "?fields=" + "a/" * 5000 + "b", "?fields=qkd_links;;;", "?fields=",
    "?content=nope", "?with-defaults=nope", "?%ff=1", "?depth=%00",
    "/qkd_links/qkd_link=%ZZ", "/qkd_links/qkd_link=a,b,c", "/qkd_links/qkd_link=" + "x" * 60_000, "?fields=qkd_links(qkd_link(nope))", "?fields=nope",
    "/qkd_links/qkd_link=%00", "/../../etc/passwd", "/qkd_links//qkd_link", "/qkd_links/qkd_link=",
    "/etsi-qkd-sdn-node:qkd_links", "/qkd_links/qkd_link=" + "%2F" * 3000 + "/qkdl_id",
])
def test_hostile_urls_are_client_errors(c: httpx.Client, target: str) -> None:
    """Malformed query parameters and api-paths are 4xx with an ietf-restconf:errors body,
    never a 500 (a 414/431-style refusal of an over-long request head included)."""
    r = c.get(NODE + target)
    assert 400 <= r.status_code < 500, (target[:60], r.status_code, r.text[:200])
