"""Entropy as a service: GET /api/v1/entropy over mutual TLS on a real agent process
with an emulated QRNG (schemathesis checks it against the served OpenAPI document);
a node without QRNG answers 404; when the QRNG fails its SP 800-90B health tests the
service answers 503 and the agent raises the sdqkd-qrng alarm over NETCONF, and both
recover after a repair once the start-up tests pass. No entropy byte is logged."""
from __future__ import annotations

import base64
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree
from schemathesis import GenerationMode

from agentproc import agent_config, free_port
from apicheck import conforms
from testlib import run
from sdqkd import yangmodels
from sdqkd.agents import config as agent_cfg
from sdqkd.agents.agent import Agent
from sdqkd.agents.kms import node as kms_node
from sdqkd.agents.qaas import api as qaas
from sdqkd import pki

QRNG_NS = "urn:sdqkd:yang:sdqkd-qrng"
MAX = 4096


def kms_section(tmp: Path, qkdn_id: str) -> tuple[dict[str, Any], tuple[str, str, str]]:
    """The node's KME certificate and an SAE client certificate from a fresh lab PKI."""
    d = tmp / "pki"
    d.mkdir(parents=True, exist_ok=True)
    cas = pki.make_lab_cas(d, "test")
    cert, key = pki.issue(cas.kme, qkdn_id, d, server_names=("localhost",), client=True, kme=True)
    sae_cert, sae_key = pki.issue(cas.sae, "sae-1", d, client=True)
    for other in ("sae-far", "sae-unknown"):  # an SAE of another node, an SAE of no node
        pki.issue(cas.sae, other, d, client=True)
    kms = {"port": free_port(), "relay_port": free_port(), "sae_ca": str(cas.sae[0]), "kme_ca": str(cas.kme[0]),
           "cert": str(cert), "key": str(key), "saes": {"sae-1": qkdn_id, "sae-far": str(uuid.uuid4())}}
    return kms, (str(sae_cert), str(sae_key), str(cas.root[0]))


def qrng_section(**kw: Any) -> dict[str, Any]:
    return {"source": "emulated", "rate": 2_000_000.0, "max_request_bytes": MAX, **kw}


def client(creds: tuple[str, str, str]) -> httpx.Client:
    return httpx.Client(verify=pki.client_ssl_context(*creds), timeout=10)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("entropy")
    qkdn_id = str(uuid.uuid4())
    kms, creds = kms_section(tmp, qkdn_id)
    proc = agent_config(tmp, "rectorado", qkdn_id, extra={"kms": kms, "qrng": qrng_section()}).start()
    base = f"https://127.0.0.1:{kms['port']}"
    deadline = time.monotonic() + 10
    while True:  # the NETCONF port answers first; the HTTPS server is up right after
        try:
            with client(creds) as c:
                c.get(f"{base}/openapi.json")
            break
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield base, creds, proc
    proc.stop()


def test_entropy_over_mutual_tls_with_strict_input_checks(node) -> None:
    base, creds, proc = node
    seen: list[bytes] = []
    with client(creds) as c:
        r = c.get(f"{base}/api/v1/entropy")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert set(body) == {"bytes", "entropy", "source"} and body["bytes"] == 32 and body["source"] == "emulated"
        seen.append(base64.b64decode(body["entropy"], validate=True))
        for n in (1, 1000, MAX):
            body = c.get(f"{base}/api/v1/entropy", params={"bytes": n}).json()
            seen.append(base64.b64decode(body["entropy"], validate=True))
            assert body["bytes"] == n == len(seen[-1])
        assert len(seen[0]) == 32 and len(set(seen)) == len(seen)
        for query, why in (("bytes=0", "from 1 to 4096, got 0"), (f"bytes={MAX + 1}", "got 4097"),
                           ("bytes=-3", "got -3"), ("bytes=abc", "must be an integer"), ("bytes=1.5", "integer"),
                           ("bytes=", "integer"), ("bytes=99999999999999999999999", "integer"),
                           ("bytes=1&bytes=2", "more than once"), ("count=5", "unknown query parameter(s): count")):
            r = c.get(f"{base}/api/v1/entropy?{query}")
            assert r.status_code == 400 and why in r.json()["message"], (query, r.text)
        r = c.post(f"{base}/api/v1/entropy")
        assert r.status_code == 405 and r.json()["message"]
        doc = c.get(f"{base}/openapi.json").json()
    param = doc["paths"]["/api/v1/entropy"]["get"]["parameters"][0]
    assert param["schema"] == {"type": "integer", "minimum": 1, "maximum": MAX, "default": 32}
    log = proc.log()
    for data in (d for d in seen if len(d) >= 16):  # no base64 or hex of delivered bytes in the log
        assert base64.b64encode(data).decode() not in log and data.hex() not in log


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_openapi_document(node, mode) -> None:
    """Schemathesis draws requests from the served document (valid ones, then invalid ones)
    and checks every answer: no server error, documented status code, content type,
    headers and body schema, valid input accepted and invalid input rejected."""
    base, (cert, key, ca), _ = node
    calls = conforms(base, cert, key, ca, "/api/v1/entropy", "GET", mode)
    # a "negative" case may still serialise to a valid query (e.g. an array of one integer)
    assert calls and (set(calls) == {200} if mode == GenerationMode.POSITIVE else 400 in calls)


def test_only_the_nodes_own_saes_get_entropy(node) -> None:
    """An SAE certificate of the SAE CA is not enough: the SAE must be one of this node's
    (kms.saes naming it); a KME certificate is no SAE at all."""
    base, (cert, key, ca), _ = node
    d = Path(cert).parent
    for other in ("sae-far", "sae-unknown"):
        with client((str(d / f"{other}.crt"), str(d / f"{other}.key"), ca)) as c:
            r = c.get(f"{base}/api/v1/entropy")
            assert r.status_code == 403 and r.json() == {"message": f"SAE '{other}' is not an application of this node"}
    kme = next(p for p in d.glob("*.crt") if p.stem not in ("sae-1", "sae-far", "sae-unknown") and "CA" not in p.stem)
    with client((str(kme), str(kme.with_suffix(".key")), ca)) as c:
        try:
            r = c.get(f"{base}/api/v1/entropy")
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            pass  # refused in the TLS handshake: the node trusts the SAE CA only for its callers
        else:
            assert r.status_code == 401
    with client((cert, key, ca)) as c:
        assert c.get(f"{base}/api/v1/entropy").status_code == 200


def test_a_node_without_qrng_answers_404(tmp_path) -> None:
    qkdn_id = str(uuid.uuid4())
    kms, creds = kms_section(tmp_path, qkdn_id)
    cfg = agent_cfg.parse(agent_config_dict(tmp_path, qkdn_id, kms, None))
    kn = kms_node.build(cfg, more_routes=lambda app, lkms: qaas.add_routes(app, qaas.Context(cfg, lkms)))
    kn.start()
    try:
        with client(creds) as c:
            r = c.get(f"https://127.0.0.1:{kn.server.port}/api/v1/entropy")
            assert r.status_code == 404 and r.json() == {"message": "this node has no QRNG"}
            r = c.get(f"https://127.0.0.1:{kn.server.port}/api/v1/entropy?bytes=nope")
            assert r.status_code == 400  # the query is checked first: bad input is always 400
    finally:
        kn.stop()


def agent_config_dict(tmp: Path, qkdn_id: str, kms: dict[str, Any], qrng: dict[str, Any] | None) -> dict[str, Any]:
    import json

    path = agent_config(tmp, "node", qkdn_id, extra={"kms": kms, **({"qrng": qrng} if qrng else {})}).config_path
    return json.loads(path.read_text())


def notifications(m: Any, want: str, timeout: float = 10.0) -> etree._Element:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = m.take_notification(block=True, timeout=0.5)
        if n is not None:
            root = etree.fromstring(n.notification_xml.encode())
            content = root[1]
            if content.tag == f"{{{QRNG_NS}}}{want}":
                return content
    raise AssertionError(f"no {want} notification")


def validate_notification(tmp: Path, yanglint: str, content: etree._Element, name: str) -> None:
    (tmp / f"{name}.xml").write_text(etree.tostring(content, encoding="unicode"))
    proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), "-t", "notif",
                str(yangmodels.module_path("sdqkd-qrng")), str(tmp / f"{name}.xml")])
    assert proc.returncode == 0, proc.stderr


def test_health_test_failure_stops_delivery_and_raises_the_alarm(tmp_path, yanglint, caplog) -> None:
    """The agent runs in-process so the test can break its emulated device (as a lab
    operator would); NETCONF and HTTPS are its real servers on loopback."""
    caplog.set_level(logging.DEBUG)
    qkdn_id = str(uuid.uuid4())
    kms, creds = kms_section(tmp_path, qkdn_id)
    cfg = agent_cfg.parse(agent_config_dict(tmp_path, qkdn_id, kms, qrng_section()))
    agent = Agent(cfg)
    agent.start()
    url = f"https://127.0.0.1:{kms['port']}/api/v1/entropy"
    delivered: list[str] = []
    try:
        from agentproc import PASSWORD
        from ncclient import manager

        m = manager.connect(host="127.0.0.1", port=cfg.netconf.port, username="admin", password=PASSWORD,
                            hostkey_verify=False, look_for_keys=False, allow_agent=False, timeout=20)
        try:
            caps = list(m.server_capabilities)
            assert any(c.startswith(f"{QRNG_NS}?module=sdqkd-qrng&revision=2026-12-04") for c in caps), caps
            assert "notification source-failed" in m.get_schema("sdqkd-qrng").data
            m.create_subscription()
            with client(creds) as c:
                r = c.get(url, params={"bytes": 64})
                assert r.status_code == 200
                delivered.append(r.json()["entropy"])
                agent.qrng.inject_failure("stuck")
                r = c.get(url, params={"bytes": 64})
                assert r.status_code == 503 and "entropy" not in r.json()
                assert "repetition-count test failed" in r.json()["message"]
                alarm = notifications(m, "source-failed")
                assert alarm.findtext(f"{{{QRNG_NS}}}node") == "node"
                assert alarm.findtext(f"{{{QRNG_NS}}}health-test/{{{QRNG_NS}}}test") == "repetition-count"
                cutoff = int(alarm.findtext(f"{{{QRNG_NS}}}health-test/{{{QRNG_NS}}}cutoff"))
                assert cutoff == 51 and int(alarm.findtext(f"{{{QRNG_NS}}}health-test/{{{QRNG_NS}}}observed")) >= cutoff
                validate_notification(tmp_path, yanglint, alarm, "failed")
                assert c.get(url).status_code == 503  # stays down until repaired
                agent.qrng.repair()
                r = c.get(url, params={"bytes": 64})  # start-up tests run on the way
                assert r.status_code == 200
                delivered.append(r.json()["entropy"])
                back = notifications(m, "source-recovered")
                assert back.findtext(f"{{{QRNG_NS}}}message") == "start-up health tests passed"
                validate_notification(tmp_path, yanglint, back, "recovered")
                # a transient glitch: alarm and recovery are notified, the request only waits
                agent.qrng.inject_failure("glitch")
                r = c.get(url, params={"bytes": 64})
                assert r.status_code == 200
                delivered.append(r.json()["entropy"])
                assert notifications(m, "source-failed") is not None
                assert notifications(m, "source-recovered") is not None
        finally:
            m.close_session()
    finally:
        agent.stop()
    text = caplog.text
    assert "QRNG FAILED" in text and all(e not in text for e in delivered)
    assert all(base64.b64decode(e).hex() not in text for e in delivered)


@pytest.mark.parametrize("value, problem", [
    (16, "between 32 (the default request) and 65536"), (1 << 17, "between 32"),
    ("64", "expected int, got str"), (True, "expected int, got bool"), (64.0, "expected int, got float")])
def test_max_request_bytes_is_checked_strictly(tmp_path, value, problem) -> None:
    data = agent_config_dict(tmp_path, str(uuid.uuid4()), kms_section(tmp_path, "x")[0],
                             qrng_section(max_request_bytes=value))
    with pytest.raises(agent_cfg.ConfigError, match="config.qrng.max_request_bytes") as err:
        agent_cfg.parse(data)
    assert problem in str(err.value)
