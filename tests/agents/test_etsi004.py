"""ETSI GS QKD 004 (REST form) over real HTTPS with mutual TLS, against the real LKMS: two
nodes, alice (sae-a) and bob (sae-b), each with its own key store and HTTPS server,
joined by a PHYS link whose keys both stores hold and by their forwarding modules."""
from __future__ import annotations

import base64
import json
import dataclasses
import logging
import os
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from lkmspair import lkms_pair

from sdqkd.agents.kms import etsi004
from sdqkd import pki
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig

A, B = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/etsi004/{n}")) for n in ("alice", "bob"))
LINK, APP = "10000000-0000-4000-8000-0000000000ab", "30000000-0000-4000-8000-0000000000ab"
SAES = {"sae-a": A, "sae-b": B, "sae-c": B}  # sae-c: another application at bob's node
QOS = {"key_chunk_size": 32, "max_bps": 0, "min_bps": 0, "jitter": 0, "priority": 0, "timeout": 2000, "ttl": 60,
       "metadata_mimetype": "application/json"}


@dataclass
class Lab:
    urls: dict[str, str]  # SAE -> base URL of its node
    ca: Path
    certs: dict[str, tuple[Path, Path]]
    nodes: dict[str, Lkms] = dataclasses.field(default_factory=dict)

    def client(self, sae: str, node_of: str | None = None) -> httpx.Client:
        ctx = pki.client_ssl_context(*self.certs[sae], self.ca)
        return httpx.Client(base_url=self.urls[node_of or sae], verify=ctx, timeout=10)


def _serve(lkms: Lkms, server_ctx: ssl.SSLContext) -> HttpsServer:
    app = make_app()
    etsi004.add_routes(app, lkms, {"sae-a": {A, "alice"}, "sae-b": {B, "bob"}, "sae-c": {B, "bob"}})
    return HttpsServer(app, "127.0.0.1", 0, server_ctx, access_log=True).start()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    d = tmp_path_factory.mktemp("etsi004")
    ca = pki.make_ca(d / "ca", "lab-ca")
    certs = {sae: pki.issue(ca, sae, d / "sae", client=True) for sae in ("sae-a", "sae-b", "sae-c", "sae-x")}
    certs["rogue"] = pki.issue(pki.make_ca(d / "other", "other-ca"), "sae-a", d / "other", client=True)
    (alice, alice_srv), (bob, bob_srv) = lkms_pair(d, ca, (A, B), SAES, LINK, APP, _serve)
    urls = {"sae-a": f"https://127.0.0.1:{alice_srv.port}", "sae-b": f"https://127.0.0.1:{bob_srv.port}"}
    lab = Lab({**urls, "sae-c": urls["sae-b"], "sae-x": urls["sae-a"], "rogue": urls["sae-a"]}, ca[0], certs)
    lab.nodes = {"alice": alice, "bob": bob}
    yield lab
    for srv, lkms in ((alice_srv, alice), (bob_srv, bob)):
        srv.stop()
        lkms.shutdown()


def open_stream(lab: Lab, timeout_ms: int = 2000) -> str:
    """Opened at both ends; returns the KSID."""
    qos = {**QOS, "timeout": timeout_ms}
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        src = a.post("/api/open_connect", json={"source": "sae-a", "destination": "sae-b", "qos": qos})
        assert src.status_code == 200, src.text
        assert src.json()["status"] == 1  # connected, peer not yet
        ksid = src.json()["key_stream_id"]
        dst = b.post("/api/open_connect", json={"source": "sae-a", "destination": "sae-b", "qos": qos, "key_stream_id": ksid})
        assert dst.status_code == 200 and dst.json()["status"] == 0, dst.text
    return ksid


def get_key(c: httpx.Client, ksid: str, index: int | None = None) -> httpx.Response:
    params = {"key_stream_id": ksid} if index is None else {"key_stream_id": ksid, "index": index}
    return c.get("/api/get_key", params=params)


def test_open_get_key_by_index_and_close_at_both_ends(lab: Lab) -> None:
    with lab.client("sae-a") as a:
        src = a.post("/api/open_connect", json={"source": "sae-a", "destination": "sae-b", "qos": QOS})
    body = src.json()
    assert src.status_code == 200 and set(body) == {"status", "key_stream_id", "qos"}
    assert body["status"] == 1 and body["qos"] == QOS
    ksid = body["key_stream_id"]
    assert str(uuid.UUID(ksid)) == ksid
    with lab.client("sae-b") as b:  # field names as the standard writes them; unknown fields ignored
        dst = b.post("/api/open_connect", json={"Source": "sae-a", "Destination": "sae-b", "Key_stream_ID": ksid,
                                                "QoS": {"Key_chunk_size": 32, "Timeout": 2000, "TTL": 60}, "vendor": 1})
    assert dst.status_code == 200 and dst.json() == {"status": 0, "key_stream_id": ksid, "qos": QOS}

    delivered = {n: lab.nodes[n].deliveries.get(APP.lower()) for n in ("alice", "bob")}
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        first, second = get_key(a, ksid).json(), get_key(a, ksid).json()
        assert (first["status"], first["index"], second["status"], second["index"]) == (0, 0, 0, 1)
        assert set(first) == {"status", "index", "key_buffer", "metadata"}
        k0, k1 = (base64.b64decode(r["key_buffer"], validate=True) for r in (first, second))
        assert len(k0) == len(k1) == 32 and k0 != k1
        # The other end asks by index, in any order, and gets the same chunks.
        at_b = get_key(b, ksid, 1).json(), get_key(b, ksid, 0).json()
        assert [(r["status"], r["index"], r["key_buffer"]) for r in at_b] == [(0, 1, second["key_buffer"]), (0, 0, first["key_buffer"])]
        again = get_key(a, ksid, 0).json()  # each chunk leaves each end once
        assert again["status"] == 2 and again["key_buffer"] == "" and again["message"]
        for n in ("alice", "bob"):  # sdqkd-key-stock key-delivery: two chunks at each end, the refusal not counted
            now = lab.nodes[n].deliveries.get(APP.lower())
            assert (now["requests"] - delivered[n]["requests"], now["keys"] - delivered[n]["keys"],
                    now["bits"] - delivered[n]["bits"]) == (2, 2, 512)
        reused = a.post("/api/open_connect", json={"source": "sae-a", "destination": "sae-b", "qos": QOS, "key_stream_id": ksid})
        assert reused.status_code == 200 and reused.json()["status"] == 5  # KSID in use

        assert a.post("/api/close", json={"key_stream_id": ksid}).json() == {"status": 0}
        assert b.post("/api/close", json={"key_stream_id": ksid}).json() == {"status": 0}
        closed = get_key(a, ksid)
    assert closed.status_code == 200 and closed.json()["status"] == 4 and closed.json()["key_buffer"] == ""


def test_at_the_destination_a_chunk_not_held_is_status_2_not_an_http_error(lab: Lab) -> None:
    ksid = open_stream(lab, timeout_ms=0)
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        chunk = get_key(a, ksid).json()["key_buffer"]
        assert get_key(b, ksid, 0).json()["key_buffer"] == chunk
        again, ahead = get_key(b, ksid, 0), get_key(b, ksid, 7)  # delivered already; never drawn
    # a chunk already delivered is not there any more: status 2 at once (timeout 0)
    assert again.status_code == 200 and again.json()["status"] == 2 and again.json()["key_buffer"] == ""
    assert ahead.status_code == 200
    body = ahead.json()
    assert body["status"] == 2 and body["key_buffer"] == "" and body["message"] and body["index"] == 7


def test_a_caller_that_is_not_a_party_is_401(lab: Lab) -> None:
    with lab.client("sae-a") as a:
        r = a.post("/api/open_connect", json={"source": "sae-b", "destination": "sae-b", "qos": QOS})
    with lab.client("sae-x") as x:  # certified by the lab CA, attached to no node
        r2 = x.post("/api/open_connect", json={"source": "sae-x", "destination": "sae-b"})
    assert r.status_code == r2.status_code == 401
    assert r.json()["message"] and r2.json()["message"]


def test_a_certificate_from_another_ca_is_refused(lab: Lab) -> None:
    with lab.client("rogue") as c, pytest.raises(httpx.TransportError):
        c.post("/api/open_connect", json={"source": "sae-a", "destination": "sae-b"})


KSID = str(uuid.uuid4())


@pytest.mark.parametrize("method, path, kw", [
    ("POST", "/api/open_connect", {"content": b'{"source": "sae-a"'}),
    ("POST", "/api/open_connect", {"json": ["sae-a", "sae-b"]}),
    ("POST", "/api/open_connect", {"json": {"destination": "sae-b"}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": 7}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "qos": [32]}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "qos": {"key_chunk_size": "32"}}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "qos": {"key_chunk_size": 0}}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "qos": {"timeout": -1}}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "qos": {"ttl": 2**32}}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "qos": {"min_bps": 9, "max_bps": 8}}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "qos": {"metadata_mimetype": 1}}}),
    ("POST", "/api/open_connect", {"json": {"source": "sae-a", "destination": "sae-b", "key_stream_id": "stream-1"}}),
    ("GET", "/api/get_key", {}),
    ("GET", "/api/get_key", {"params": {"key_stream_id": "stream-1"}}),
    ("GET", "/api/get_key", {"params": {"key_stream_id": KSID, "index": "-1"}}),
    ("GET", "/api/get_key", {"params": {"key_stream_id": KSID, "index": "first"}}),
    ("POST", "/api/close", {"json": {}}),
    ("POST", "/api/close", {"json": {"key_stream_id": 5}}),
    ("POST", "/api/close", {"content": b"close"}),
    ("POST", "/api/open_connect", {"json": {"source": "qkd://sae-a@bob", "destination": "sae-b"}}),  # not sae-a's node
    ("POST", "/api/open_connect", {"json": {"source": "http://sae-a@alice", "destination": "sae-b"}}),
    ("GET", "/api/get_key", {"params": {"key_stream_id": "00000000-0000-0000-0000-000000000000"}}),
])
def test_bad_requests_get_400_with_a_message(lab: Lab, method: str, path: str, kw: dict) -> None:
    with lab.client("sae-a") as a:
        r = a.request(method, path, **kw)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json") and r.json()["message"]


def test_no_key_bytes_in_logs(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ksid = open_stream(lab, timeout_ms=0)
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        chunks = [get_key(a, ksid).json()["key_buffer"] for _ in range(3)]
        chunks += [get_key(b, ksid, i).json()["key_buffer"] for i in range(3)]
        assert get_key(a, ksid, 0).json()["status"] == 2
        a.post("/api/close", json={"key_stream_id": ksid})
        b.post("/api/close", json={"key_stream_id": ksid})
    text = caplog.text
    assert ksid in text and "get_key" in text  # the servers' records were captured
    assert chunks[:3] == chunks[3:]
    for chunk in chunks:
        key = base64.b64decode(chunk)
        for form in (chunk, key.hex(), key.hex().upper(), repr(key)[2:-1]):
            assert form not in text


def test_both_saes_on_one_node(tmp_path: Path) -> None:
    ca = pki.make_ca(tmp_path / "ca", "lab-ca")
    certs = {sae: pki.issue(ca, sae, tmp_path / "sae", client=True) for sae in ("sae-a", "sae-b")}
    server = pki.issue(ca, A, tmp_path / "kme", server_names=["127.0.0.1"], client=True)
    lkms = Lkms(LkmsConfig(kme_id=A, node="alice", saes={"sae-a": A, "sae-b": A}), KeyStore(tmp_path / "k.sqlite"),
                entropy=os.urandom)
    app = make_app()
    etsi004.add_routes(app, lkms)
    srv = HttpsServer(app, "127.0.0.1", 0, pki.server_ssl_context(*server, ca[0])).start()
    try:
        lab = Lab({s: f"https://127.0.0.1:{srv.port}" for s in certs}, ca[0], certs)
        ksid = open_stream(lab)
        with lab.client("sae-a") as a, lab.client("sae-b") as b:
            assert get_key(a, ksid).json()["key_buffer"] == get_key(b, ksid, 0).json()["key_buffer"]
    finally:
        srv.stop()
        lkms.shutdown()


def _open(c: httpx.Client, src: str = "sae-a", dst: str = "sae-b", **body: object) -> dict:
    r = c.post("/api/open_connect", json={"source": src, "destination": dst, "qos": QOS, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_get_key_before_the_peer_opened_is_3_at_either_end(lab: Lab) -> None:
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        ksid = _open(a)["key_stream_id"]
        early = get_key(a, ksid).json()
        assert early["status"] == 3 and early["key_buffer"] == ""
        assert _open(b, key_stream_id=ksid)["status"] == 0
        assert get_key(a, ksid).json()["status"] == 0
        # the source closes: the destination gets what was sent, then 3
        assert a.post("/api/close", json={"key_stream_id": ksid}).json() == {"status": 0}
        assert get_key(b, ksid, 0).json()["status"] == 0
        assert get_key(b, ksid, 1).json()["status"] == 3
        assert b.post("/api/close", json={"key_stream_id": ksid}).json() == {"status": 0}


def test_unknown_streams_and_applications_are_status_4(lab: Lab) -> None:
    other = str(uuid.uuid4())
    with lab.client("sae-a") as a:
        got = get_key(a, other)
        closed = a.post("/api/close", json={"key_stream_id": other})
        nobody = a.post("/api/open_connect", json={"source": "sae-a", "destination": "nobody"})
    assert got.status_code == closed.status_code == nobody.status_code == 200
    assert got.json()["status"] == closed.json()["status"] == nobody.json()["status"] == 4
    assert nobody.json()["key_stream_id"] is None


def test_null_and_all_zero_ksid_ask_for_one_and_uris_name_the_application(lab: Lab) -> None:
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        first = _open(a, src=f"qkd://sae-a@{A}", dst="qkd://sae-b@bob", key_stream_id="00000000-0000-0000-0000-000000000000")
        assert first["status"] == 1 and first["key_stream_id"] != "00000000-0000-0000-0000-000000000000"
        ksid = first["key_stream_id"]
        assert _open(b, src="qkd://sae-a@alice", dst="qkd://sae-b", key_stream_id=ksid)["status"] == 0
        assert get_key(a, ksid).json()["key_buffer"] == get_key(b, ksid, 0).json()["key_buffer"]
        for c in (a, b):
            c.post("/api/close", json={"key_stream_id": ksid})


@pytest.mark.parametrize("first", ["source", "destination"])
def test_madqci_pairing_both_ends_open_with_a_null_ksid(lab: Lab, first: str) -> None:
    """Both applications open (source, destination) with no KSID at their own node, in
    either order, and get the same stream."""
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        order = [a, b] if first == "source" else [b, a]
        one, two = _open(order[0], key_stream_id=None), _open(order[1], key_stream_id=None)
        assert (one["status"], two["status"]) == (1, 0)
        assert one["key_stream_id"] == two["key_stream_id"]
        ksid = one["key_stream_id"]
        assert get_key(a, ksid).json()["key_buffer"] == get_key(b, ksid).json()["key_buffer"]
        for c in (a, b):
            assert c.post("/api/close", json={"key_stream_id": ksid}).json() == {"status": 0}


def test_a_third_application_cannot_feed_or_squat_a_stream(lab: Lab) -> None:
    """sae-c (at bob's node, like the destination) opens the victim's KSID with itself as
    source and asks for keys first: its stream is its own, the destination never sees its
    keys, and the destination still joins the real one."""
    with lab.client("sae-a") as a, lab.client("sae-b") as b, lab.client("sae-c") as c:
        ksid = _open(a)["key_stream_id"]
        squat = _open(c, src="sae-c", dst="sae-b", key_stream_id=ksid)
        assert squat["status"] == 1  # a stream of sae-c's own, which sae-b never joined
        assert get_key(c, ksid).json()["status"] == 3
        assert _open(b, key_stream_id=ksid)["status"] == 0
        real = get_key(a, ksid).json()
        at_b = get_key(b, ksid, 0).json()
        assert real["status"] == at_b["status"] == 0 and real["key_buffer"] == at_b["key_buffer"]
        assert get_key(c, ksid).json()["status"] == 3  # still not joined by anyone
        # claiming to be the destination of the real stream is another party's KSID: 5
        assert _open(c, src="sae-a", dst="sae-c", key_stream_id=ksid)["status"] in (4, 5)
        for cl in (a, b, c):
            cl.post("/api/close", json={"key_stream_id": ksid})


def test_metadata_and_status_8(lab: Lab) -> None:
    ksid = open_stream(lab)
    with lab.client("sae-a") as a, lab.client("sae-b") as b:
        small = a.get("/api/get_key", params={"key_stream_id": ksid, "metadata_size": 4}).json()
        assert small["status"] == 8 and small["metadata"]["size"] > 4 and small["key_buffer"] == ""
        ok = a.get("/api/get_key", params={"key_stream_id": ksid, "metadata_size": small["metadata"]["size"]}).json()
        assert ok["status"] == 0 and ok["index"] == 0
        meta = json.loads(ok["metadata"]["buffer"])
        assert meta == {"index": 0, "size": 256} and ok["metadata"]["size"] == len(ok["metadata"]["buffer"])
        none = a.get("/api/get_key", params={"key_stream_id": ksid, "metadata_size": 0}).json()  # no buffer: none wanted
        assert none["status"] == 0 and none["metadata"] == {"size": 0, "buffer": ""}
        assert get_key(b, ksid, 0).json()["key_buffer"] == ok["key_buffer"]
        assert get_key(b, ksid, 1).json()["key_buffer"] == none["key_buffer"]
        for c in (a, b):
            c.post("/api/close", json={"key_stream_id": ksid})


def test_qos_counter_proposals_are_achievable(lab: Lab) -> None:
    alice = lab.nodes["alice"]
    alice.streams.link_rate = lambda link: 5000.0  # what the QKD modules measure on the PHYS link
    try:
        with lab.client("sae-a") as a, lab.client("sae-b") as b:
            big = _open(a, qos={**QOS, "key_chunk_size": 4096, "min_bps": 8000})
            assert big["status"] == 7 and big["key_stream_id"] is None
            assert big["qos"]["key_chunk_size"] == 1024 and big["qos"]["min_bps"] == 5000
            again = _open(a, qos=big["qos"])  # the counter-proposal, sent back, is accepted
            assert again["status"] == 1 and again["qos"] == big["qos"]
            ksid = again["key_stream_id"]
            second = _open(a, qos={**QOS, "min_bps": 1})  # the first stream holds the whole rate
            assert second["status"] == 7 and second["qos"]["min_bps"] == 0
            assert _open(a, qos=second["qos"])["status"] == 1
            joined = _open(b, key_stream_id=ksid)  # the destination gets the stream's granted QoS
            assert joined["status"] == 0 and joined["qos"] == big["qos"]
            for c in (a, b):
                c.post("/api/close", json={"key_stream_id": ksid})
    finally:
        alice.streams.link_rate = None
