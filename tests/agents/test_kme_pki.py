"""The KME/SAE PKI split in process: config checks (the old single CA refused with an
explanation, pins required), the key-delivery front end's caller roles when a node also
trusts the KME CA (IPsec responders), and the relay's client pool and pins against a
server that closes idle connections."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
import uuid
from pathlib import Path

import httpx
import pytest
from sdqkd.agents.kms import web

from sdqkd import pki
from sdqkd.agents import config as agent_cfg
from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms import https

A, B = str(uuid.uuid4()), str(uuid.uuid4())


@pytest.fixture(scope="module")
def cas(tmp_path_factory) -> pki.LabCas:
    return pki.make_lab_cas(tmp_path_factory.mktemp("pki"), "test")


def base_config(tmp: Path, cas: pki.LabCas, **kms) -> dict:
    kme = pki.issue(cas.kme, A, tmp / "a", server_names=["127.0.0.1"], client=True, kme=True)
    peer = pki.issue(cas.kme, B, tmp / "b", server_names=["127.0.0.1"], client=True, kme=True)
    return {
        "node": {"name": "a", "qkdn_id": A},
        "netconf": {"port": 0, "host_key": str(tmp / "hk"), "users": [{"name": "admin", "password_hash": "x"}]},
        "state_dir": str(tmp / "state"),
        "peers": {B: {"node": "b", "relay": ["127.0.0.1", 1], "kme_pin": pki.spki_pin(peer[0])}},
        "kms": {"port": 0, "relay_port": 0, "cert": str(kme[0]), "key": str(kme[1]),
                "sae_ca": str(cas.sae[0]), "kme_ca": str(cas.kme[0]), **kms},
    }


def problems(data: dict) -> str:
    with pytest.raises(agent_cfg.ConfigError) as err:
        agent_cfg.parse(json.loads(json.dumps(data)))
    return str(err.value)


def test_the_config_needs_two_cas_and_the_peers_pins(tmp_path, cas) -> None:
    data = base_config(tmp_path, cas)
    cfg = agent_cfg.parse(data)
    assert cfg.kms.sae_ca == str(cas.sae[0]) and cfg.peers[B].kme_pin.startswith("sha256/")
    old = json.loads(json.dumps(data))  # a lab made before the split: one "ca"
    del old["kms"]["sae_ca"], old["kms"]["kme_ca"]
    del old["peers"][B]["kme_pin"]
    old["kms"]["ca"] = str(cas.root[0])
    text = problems(old)
    assert "config.kms.ca: one CA for applications and KMEs is no longer accepted" in text and "sdqkd lab up" in text
    assert f"config.peers.{B}.kme_pin: a relay peer needs the pin" in text
    assert "config.kms.sae_ca: missing" not in text  # the one explanation says it
    same = json.loads(json.dumps(data))
    same["kms"]["kme_ca"] = same["kms"]["sae_ca"]
    assert "must be two different CAs" in problems(same)
    leaf = json.loads(json.dumps(data))
    leaf["kms"]["sae_ca"] = data["kms"]["cert"]
    assert "config.kms.sae_ca" in problems(leaf) and "not a CA certificate" in problems(leaf)
    gone = json.loads(json.dumps(data))
    gone["kms"]["kme_ca"] = str(tmp_path / "nope.crt")
    assert "config.kms.kme_ca" in problems(gone) and "not a readable PEM certificate" in problems(gone)
    bad_pin = json.loads(json.dumps(data))
    bad_pin["peers"][B]["kme_pin"] = "md5:abc"
    assert "expected sha256/<base64 of 32 bytes>" in problems(bad_pin)
    limits = json.loads(json.dumps(data))
    limits["kms"]["relay_max_per_peer"] = 0
    assert "relay_max_per_peer" in problems(limits)


def test_callers_are_saes_or_kmes_by_usage_and_issuer(tmp_path, cas) -> None:
    """A node that trusts both CAs on its HTTPS port (an IPsec responder): an SAE gets keys'
    routes, a KME only the KME routes, and a certificate whose usage and issuer disagree
    (the SAE CA issuing a KME-marked certificate) is neither."""
    kme = pki.issue(cas.kme, A, tmp_path / "kme", server_names=["127.0.0.1"], client=True, kme=True)
    peer = pki.issue(cas.kme, B, tmp_path / "peer", client=True, kme=True)
    sae = pki.issue(cas.sae, "sae-1", tmp_path / "sae", client=True)
    forged = pki.issue(cas.sae, B, tmp_path / "forged", client=True, kme=True)
    app = https.make_app()
    https.trust(app, sae_ca=str(cas.sae[0]), kme_ca=str(cas.kme[0]))

    async def as_sae(request: web.Request) -> web.Response:
        return web.json_response({"sae": https.sae_of(request)})

    async def as_kme(request: web.Request) -> web.Response:
        return web.json_response({"kme": https.kme_of(request)})

    app.add_routes([web.get("/sae", as_sae), web.get("/kme", as_kme)])
    srv = https.HttpsServer(app, "127.0.0.1", 0, pki.server_ssl_context(*kme, [cas.sae[0], cas.kme[0]])).start()
    try:
        def get(creds, path):
            with httpx.Client(verify=pki.client_ssl_context(*creds, cas.root[0]), timeout=10) as c:
                return c.get(f"https://127.0.0.1:{srv.port}{path}")

        assert get(sae, "/sae").json() == {"sae": "sae-1"}
        assert get(sae, "/kme").status_code == 401
        assert get(peer, "/kme").json() == {"kme": B.lower()}
        r = get(peer, "/sae")
        assert r.status_code == 401 and "KME certificate gets no key" in r.json()["message"]
        for path in ("/sae", "/kme"):
            r = get(forged, path)
            assert r.status_code == 401 and r.json()["message"] == "the client certificate is not from this node's KME CA"
    finally:
        srv.stop()


def forwarder(cas, tmp: Path, me: str, peers: dict, pins: dict | None, delay: float = 0.0, **limits) -> fm.Forwarder:
    cert = pki.issue(cas.kme, me, tmp / me, server_names=["127.0.0.1"], client=True, kme=True)
    f = fm.Forwarder(me, ("127.0.0.1", 0), pki.server_ssl_context(*cert, cas.kme[0]),
                     pki.client_ssl_context(*cert, cas.kme[0]), peers, pins=pins, limits=fm.RelayLimits(**limits))

    def handler(sender: str, msg: dict) -> dict:
        time.sleep(delay)
        return {"ok": True, "from": sender, "n": msg.get("n")}

    f.start(handler)
    return f


def test_requests_to_a_peer_are_bounded_and_a_connection_over_its_limit_is_refused_with_keys_kept(tmp_path, cas) -> None:
    """A sends at most max_per_peer requests to B at once (the others wait for a connection);
    a connection over B's own limit gets a refusal saying the keys are kept, not a reset."""
    b = forwarder(cas, tmp_path, B, {}, None, delay=0.3, max_per_peer=1, workers=4)
    a = forwarder(cas, tmp_path, A, {B: b.address}, None, max_per_peer=1)
    b.peers = {A: a.address}
    try:
        with ThreadPoolExecutor(3) as pool:
            assert sorted(r["n"] for r in pool.map(lambda n: a.request(B, {"n": n}), range(3))) == [0, 1, 2]
        a.limits = fm.RelayLimits(max_per_peer=3)  # A now allows more than B takes
        a._slots.clear()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(a.request, B, {"n": n}) for n in range(3)]
            errors = [f.exception() for f in futures]
        refused = [e for e in errors if e is not None]
        assert refused and len(refused) < 3
        assert all(isinstance(e, fm.RelayError) and e.kept and e.code == 503 and "at most" in str(e) for e in refused)
    finally:
        a.close()
        b.close()


def test_the_client_pool_copes_with_connections_the_server_closed_when_idle(tmp_path, cas) -> None:
    b = forwarder(cas, tmp_path, B, {}, None, idle_timeout=0.3)
    a = forwarder(cas, tmp_path, A, {B: b.address}, None, idle_timeout=600)  # keeps its pooled ones for 300 s
    b.peers = {A: a.address}
    try:
        assert a.request(B, {"n": 1}) == {"ok": True, "from": A.lower(), "n": 1}
        assert b.connections() == {"handshaking": 0, A.lower(): 1}
        time.sleep(1.0)  # B closes the idle connection; A's pool still holds it
        assert b.connections() == {"handshaking": 0}
        assert a.request(B, {"n": 2})["n"] == 2  # not idempotent: no retry, the stale one was never used
    finally:
        a.close()
        b.close()


def test_pins_are_checked_both_ways(tmp_path, cas) -> None:
    b = forwarder(cas, tmp_path, B, {}, {})
    b_pin = pki.spki_pin(tmp_path / B / f"{B}.crt")
    a = forwarder(cas, tmp_path, A, {B: b.address}, {B: b_pin})
    a_pin = pki.spki_pin(tmp_path / A / f"{A}.crt")
    try:
        b.peers, b.pins = {A: a.address}, {A: "sha256/" + "A" * 43 + "="}  # B expects another key for A
        with pytest.raises(fm.RelayError) as err:
            a.request(B, {"n": 1})
        assert err.value.code == 503
        b.pins = {A: a_pin}
        assert a.request(B, {"n": 1})["ok"]
        a._drop_pool(B)
        a.pins = {B: "sha256/" + "B" * 43 + "="}  # A expects another key for B: it sends nothing
        with pytest.raises(fm.RelayError) as err:
            a.request(B, {"n": 2})
        assert err.value.sent is False and "not the one pinned" in str(err.value)
    finally:
        a.close()
        b.close()
