"""`sdqkd key get`: an end-to-end key between two nodes' SAEs, the way an application
gets one — ETSI 014 enc_keys at the master's KME, dec_keys at the slave's — using the
SAE certificates the lab made. The first request for a new pair makes the agent ask
the controller for a path, so 503 is retried for a while."""
from __future__ import annotations

import base64
import hashlib
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx


class KeyError_(Exception):
    """The key could not be obtained; the message says at which end and why."""


@dataclass
class KeyResult:
    key_id: str
    key: bytes
    master_sae: str
    slave_sae: str
    attempts: int
    seconds: float

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.key).hexdigest()[:16]


def _node(lab: dict[str, Any], name_or_sae: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(node, sae) for a node name (its first SAE) or an SAE ID."""
    for n in lab["nodes"]:
        for s in n["saes"]:
            if s["id"] == name_or_sae:
                return n, s
    for n in lab["nodes"]:
        if n["name"].lower() == name_or_sae.lower():
            if not n["saes"]:
                raise KeyError_(f"node {n['name']} has no SAE (a relay-only node)")
            return n, n["saes"][0]
    raise KeyError_(f"no node or SAE called '{name_or_sae}' in lab {lab['name']}")


def _client(lab: dict[str, Any], node: dict[str, Any], sae: dict[str, Any]) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=lab["ca"]["cert"])
    ctx.load_cert_chain(sae["cert"], sae["key"])
    return httpx.Client(verify=ctx, timeout=30, base_url=node["kms"]["etsi014"])


def get(lab: dict[str, Any], src: str, dst: str, *, size: int = 256, wait: float = 60.0) -> KeyResult:
    mnode, msae = _node(lab, src)
    snode, ssae = _node(lab, dst)
    start = time.monotonic()
    attempts = 0
    with _client(lab, mnode, msae) as master, _client(lab, snode, ssae) as slave:
        while True:
            attempts += 1
            r = master.post(f"/{ssae['id']}/enc_keys", json={"number": 1, "size": size})
            if r.status_code == 200:
                break
            if r.status_code != 503 or time.monotonic() - start > wait:
                raise KeyError_(f"enc_keys at {mnode['name']}: HTTP {r.status_code}: {r.json().get('message', r.text)}")
            time.sleep(min(2.0, 0.25 * attempts))
        key = r.json()["keys"][0]
        r = slave.post(f"/{msae['id']}/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"]}]})
        if r.status_code != 200:
            raise KeyError_(f"dec_keys at {snode['name']}: HTTP {r.status_code}: {r.json().get('message', r.text)}")
        other = r.json()["keys"][0]
    if other != key:
        raise KeyError_("the two ends returned different keys for the same key ID")
    return KeyResult(key["key_ID"], base64.b64decode(key["key"]), msae["id"], ssae["id"], attempts, time.monotonic() - start)
