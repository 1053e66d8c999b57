"""ETSI GS QKD 014 over real HTTPS with mutual TLS, against the real LKMS (one node holding
both SAEs). Clients: httpx for raw requests, and the third-party PyPI `etsi-qkd-014-client`
as one of the clients in the wild."""
from __future__ import annotations

import base64
import logging
import os
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import httpx
import pytest
from etsi_qkd_014_client import QKD014Client

from sdqkd.agents.kms import etsi014
from sdqkd import pki
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig
from sdqkd.agents.kms.interface import Status

from kmeproc import KME, Kme, kme  # noqa: F401 - kme is the module's KME fixture

def b64(key: dict) -> bytes:
    return base64.b64decode(key["key"], validate=True)


def test_status_has_exactly_the_standard_fields(kme: Kme) -> None:
    with kme.client("sae-a") as c:
        r = c.get("/api/v1/keys/sae-b/status")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == {f.name for f in fields(Status)}
    assert body["master_SAE_ID"] == "sae-a" and body["slave_SAE_ID"] == "sae-b"  # master from the certificate
    assert body["source_KME_ID"] == body["target_KME_ID"] == KME
    assert all(isinstance(body[k], int) for k in ("key_size", "stored_key_count", "max_key_per_request", "max_SAE_ID_count"))


def test_get_and_post_enc_keys_are_decrypted_identically_by_get_and_post(kme: Kme) -> None:
    with kme.client("sae-a") as a:
        got = a.get("/api/v1/keys/sae-b/enc_keys", params={"number": 2, "size": 128})
        posted = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 3, "size": 512})
        default = a.get("/api/v1/keys/sae-b/enc_keys")
    assert got.status_code == posted.status_code == default.status_code == 200, (got.text, posted.text)
    enc = got.json()["keys"] + posted.json()["keys"]
    assert [len(b64(k)) for k in enc] == [16, 16, 64, 64, 64]
    assert len(default.json()["keys"]) == 1 and len(b64(default.json()["keys"][0])) == 256 // 8  # status key_size
    assert all(set(k) == {"key_ID", "key"} and str(uuid.UUID(k["key_ID"])) == k["key_ID"] for k in enc)
    assert len({k["key"] for k in enc}) == len(enc)

    with kme.client("sae-b") as b:
        one = b.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": enc[0]["key_ID"]})
        rest = b.post("/api/v1/keys/sae-a/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in enc[1:]]})
    assert one.status_code == rest.status_code == 200, (one.text, rest.text)
    assert one.json()["keys"] + rest.json()["keys"] == enc


def test_keys_are_delivered_at_most_once(kme: Kme) -> None:
    with kme.client("sae-a") as a:
        key = a.post("/api/v1/keys/sae-b/enc_keys", json={}).json()["keys"][0]
    with kme.client("sae-b") as b:
        assert b.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": key["key_ID"]}).json()["keys"] == [key]
        again = b.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": key["key_ID"]})
        twice = b.post("/api/v1/keys/sae-a/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"]}]})
    assert again.status_code == twice.status_code == 400
    assert again.json()["message"] and twice.json()["message"]


def test_the_sae_is_the_certificate_not_the_url(kme: Kme) -> None:
    with kme.client("sae-a") as a:
        key = a.get("/api/v1/keys/sae-b/enc_keys").json()["keys"][0]
        # sae-a asks for sae-b's key naming itself as master: it is still sae-a asking.
        stolen = a.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": key["key_ID"]})
    assert stolen.status_code == 400 and "key" not in stolen.json()
    with kme.client("sae-b") as b:  # and the key is still there for sae-b
        assert b.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": key["key_ID"]}).json()["keys"] == [key]


def test_unknown_fields_and_optional_extensions_are_ignored(kme: Kme) -> None:
    with kme.client("sae-a") as a:
        r = a.post("/api/v1/keys/sae-b/enc_keys", json={
            "number": 1, "size": 256, "vendor_hint": {"x": [1, 2]}, "extension_optional": [{"abc_route_type": "direct"}],
        })
        assert a.get("/api/v1/keys/sae-b/status", params={"trace": "1"}).status_code == 200
        assert a.get("/api/v1/keys/sae-b/enc_keys", params={"number": 1, "colour": "blue"}).status_code == 200
    assert r.status_code == 200, r.text
    key = r.json()["keys"][0]
    with kme.client("sae-b") as b:
        d = b.post("/api/v1/keys/sae-a/dec_keys", json={
            "key_IDs": [{"key_ID": key["key_ID"], "key_ID_extension": {"v": 1}}], "key_IDs_extension": {"w": 2}, "extra": None,
        })
    assert d.status_code == 200 and d.json()["keys"] == [key]


def test_unsupported_extension_mandatory_is_refused_as_the_standard_says(kme: Kme) -> None:
    with kme.client("sae-a") as a:
        r = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1, "extension_mandatory": [{"abc_route_type": "direct"}]})
        empty = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1, "extension_mandatory": []})
    assert r.status_code == 400
    assert r.json() == {"message": "not all extension_mandatory parameters are supported"}  # no details (issue 17)
    assert empty.status_code == 200


ENC, DEC = "/api/v1/keys/sae-b/enc_keys", "/api/v1/keys/sae-a/dec_keys"


@pytest.mark.parametrize("sae, method, path, kw", [
    ("sae-a", "GET", ENC, {"params": {"number": 0}}),
    ("sae-a", "GET", ENC, {"params": {"number": "-1"}}),
    ("sae-a", "GET", ENC, {"params": {"number": "two"}}),
    ("sae-a", "GET", ENC, {"params": {"number": "1.5"}}),
    ("sae-a", "GET", ENC, {"params": {"size": 100}}),
    ("sae-a", "GET", ENC, {"params": {"size": 0}}),
    ("sae-a", "GET", ENC, {"params": [("number", "1"), ("number", "2")]}),
    ("sae-a", "POST", ENC, {"content": b'{"number": 1,'}),
    ("sae-a", "POST", ENC, {"content": b"\xff\xfe"}),
    ("sae-a", "POST", ENC, {"json": [1, 2]}),
    ("sae-a", "POST", ENC, {"json": {"number": "2"}}),
    ("sae-a", "POST", ENC, {"json": {"number": 1.0}}),
    ("sae-a", "POST", ENC, {"json": {"number": True}}),
    ("sae-a", "POST", ENC, {"json": {"size": 250}}),
    ("sae-a", "POST", ENC, {"json": {"size": -8}}),
    ("sae-a", "POST", ENC, {"json": {"number": 100000}}),  # beyond max_key_per_request: the LKMS refuses
    ("sae-a", "POST", ENC, {"json": {"size": 1 << 20}}),  # beyond max_key_size
    ("sae-a", "POST", ENC, {"json": {"additional_slave_SAE_IDs": "sae-a"}}),
    ("sae-a", "POST", ENC, {"json": {"extension_optional": "fast"}}),
    ("sae-a", "POST", "/api/v1/keys/nobody/enc_keys", {"json": {}}),
    ("sae-b", "GET", DEC, {}),
    ("sae-b", "GET", DEC, {"params": {"key_ID": "not-a-uuid"}}),
    ("sae-b", "GET", DEC, {"params": [("key_ID", str(uuid.uuid4())), ("key_ID", str(uuid.uuid4()))]}),
    ("sae-b", "GET", DEC, {"params": {"key_ID": str(uuid.uuid4())}}),  # unknown key
    ("sae-b", "POST", DEC, {"json": {}}),
    ("sae-b", "POST", DEC, {"json": {"key_IDs": []}}),
    ("sae-b", "POST", DEC, {"json": {"key_IDs": [str(uuid.uuid4())]}}),
    ("sae-b", "POST", DEC, {"json": {"key_IDs": [{"key_ID": 7}]}}),
    ("sae-b", "POST", DEC, {"content": b"{{"}),
])
def test_bad_requests_get_400_with_a_message(kme: Kme, sae: str, method: str, path: str, kw: dict) -> None:
    with kme.client(sae) as c:
        r = c.request(method, path, **kw)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"message"} and isinstance(body["message"], str) and body["message"]


@pytest.mark.parametrize("method, path, kw", [
    ("GET", "/api/v1/keys/sae-a/status", {}),
    ("GET", "/api/v1/keys/sae-a/enc_keys", {}),
    ("POST", "/api/v1/keys/sae-a/enc_keys", {"json": {"number": 1}}),
    ("GET", "/api/v1/keys/sae-a/dec_keys", {"params": {"key_ID": str(uuid.uuid4())}}),
    ("POST", "/api/v1/keys/sae-a/dec_keys", {"json": {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}}),
])
def test_an_sae_naming_itself_as_its_peer_gets_400(kme: Kme, method: str, path: str, kw: dict) -> None:
    with kme.client("sae-a") as a:
        r = a.request(method, path, **kw)
    assert r.status_code == 400, r.text
    assert r.json() == {"message": "master and slave are the same SAE ('sae-a'): a key is shared by two different SAEs"}


def test_a_key_made_for_oneself_cannot_be_made_nor_read_back(kme: Kme) -> None:
    """The hole issue 17 names: sae-a got a key 'for itself' and read it back with dec_keys."""
    with kme.client("sae-a") as a:
        made = a.post("/api/v1/keys/sae-a/enc_keys", json={"number": 1})
        other = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1}).json()["keys"][0]
        back = a.post("/api/v1/keys/sae-a/dec_keys", json={"key_IDs": [{"key_ID": other["key_ID"]}]})
    assert made.status_code == back.status_code == 400 and "keys" not in made.json() | back.json()
    with kme.client("sae-b") as b:  # sae-b's key is still there for sae-b
        assert b.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": other["key_ID"]}).json()["keys"] == [other]


@pytest.mark.parametrize("body", [{"additional_slave_SAE_IDs": []}, {"number": 2, "additional_slave_SAE_IDs": []}])
def test_an_empty_additional_slave_list_is_400(kme: Kme, body: dict) -> None:
    with kme.client("sae-a") as a:
        r = a.post(ENC, json=body)
        fine = a.post(ENC, json={**body, "additional_slave_SAE_IDs": None})  # null is "none", as absent
    assert r.status_code == 400, r.text
    assert r.json() == {"message": "additional_slave_SAE_IDs must not be empty (leave it out when there is no additional slave)"}
    assert fine.status_code == 200 and len(fine.json()["keys"]) == body.get("number", 1)


def test_other_errors_are_json_too(kme: Kme) -> None:
    with kme.client("sae-a") as a:
        missing, wrong = a.get("/api/v1/nothing"), a.delete(ENC)
        head = a.head(ENC)  # would hand out a key nobody reads
    assert (missing.status_code, wrong.status_code, head.status_code) == (404, 405, 405)
    assert missing.json()["message"] and wrong.json()["message"]
    assert set(missing.json()) == set(wrong.json()) == {"message"}


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("who", [None, "rogue", "server-only"])
def test_without_a_client_certificate_of_the_lab_ca_tls_is_refused(kme: Kme, who: str | None, tls: ssl.TLSVersion) -> None:
    def context(cert: tuple[Path, Path] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(kme.ca))
        ctx.minimum_version = ctx.maximum_version = tls
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return ctx

    with httpx.Client(base_url=kme.url, verify=context(kme.certs["sae-a"]), timeout=10) as good:
        assert good.get("/api/v1/keys/sae-b/status").status_code == 200
    # TLS 1.2 fails in the handshake; under TLS 1.3 the client learns it on its first read.
    expected = httpx.ConnectError if tls == ssl.TLSVersion.TLSv1_2 else httpx.TransportError
    with httpx.Client(base_url=kme.url, verify=context(who and kme.certs[who]), timeout=10) as c, pytest.raises(expected):
        c.get("/api/v1/keys/sae-b/status")


def test_a_lab_sae_not_attached_to_this_kme_gets_401(kme: Kme) -> None:
    with kme.client("sae-x") as x:
        status = x.get("/api/v1/keys/sae-b/status")
        enc = x.post(ENC, json={"number": 1})
    assert status.status_code == enc.status_code == 401
    assert set(status.json()) == set(enc.json()) == {"message"} and status.json()["message"] and enc.json()["message"]


def test_third_party_client_library(kme: Kme) -> None:
    a, b = kme.lib("sae-a"), kme.lib("sae-b")
    code, status = a.get_status("sae-b")
    assert code == 200 and status.slave_sae_id == "sae-b" and status.master_sae_id == "sae-a"
    code, posted = a.get_key("sae-b", number=2, size=256)  # POST form
    assert code == 200 and len(posted.keys) == 2
    code, simple = a.get_key("sae-b")  # GET form
    assert code == 200 and len(simple.keys) == 1
    enc = posted.keys + simple.keys
    code, dec = b.get_key_with_key_IDs("sae-a", [k.key_id for k in enc])
    assert code == 200 and [(k.key_id, k.key) for k in dec.keys] == [(k.key_id, k.key) for k in enc]
    code, err = b.get_key_with_key_IDs("sae-a", [enc[0].key_id])
    assert code == 400 and err.message
    code, err = a.get_key("sae-b", number=1, extension_mandatory=[{"abc_route_type": "direct"}])
    assert code == 400 and err.message == "not all extension_mandatory parameters are supported"


def test_no_key_bytes_in_logs(kme: Kme, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with kme.client("sae-a") as a:
        enc = a.get(ENC, params={"number": 3, "size": 256}).json()["keys"]
        enc += a.post(ENC, json={"number": 2, "size": 1024}).json()["keys"]
    with kme.client("sae-b") as b:
        dec = b.post(DEC, json={"key_IDs": [{"key_ID": k["key_ID"]} for k in enc[1:]]}).json()["keys"]
        dec += b.get(DEC, params={"key_ID": enc[0]["key_ID"]}).json()["keys"]
        assert b.get(DEC, params={"key_ID": enc[0]["key_ID"]}).status_code == 400
    code, lib = kme.lib("sae-a").get_key("sae-b", number=1, size=512)
    assert code == 200
    text = caplog.text
    assert enc[0]["key_ID"] in text and "enc_keys" in text  # the server's records were captured
    secrets = [b64(k) for k in enc + dec] + [base64.b64decode(k.key) for k in lib.keys]
    for key in secrets:
        for form in (base64.b64encode(key).decode(), key.hex(), key.hex().upper(), repr(key)[2:-1]):
            assert form not in text
