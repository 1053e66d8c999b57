"""Keys from a running lab, the way applications get them, with the SAE certificates
the lab made (lab.json): `get` for `sdqkd key get` (ETSI 014 enc_keys at the master's
KME, dec_keys at the slave's), `sae_keys` for a node's SAE as a key source
(sdqkd/keysource.py; QKD-keyed TLS uses it). The first request for a new pair makes
the agent ask the controller for a path, so 503 is retried for a while."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sdqkd.keysource import Etsi014Keys, KeySourceError, NodeApiKeys, etsi014_keys


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


def node_sae(lab: dict[str, Any], name_or_sae: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(node, sae) of lab.json for a node name (its first SAE) or an SAE ID."""
    for n in lab["nodes"]:
        for s in n["saes"]:
            if s["id"] == name_or_sae:
                return n, s
    for n in lab["nodes"]:
        if n["name"].lower() == name_or_sae.lower():
            if not n["saes"]:
                raise KeySourceError(f"node {n['name']} has no SAE (a relay-only node)")
            return n, n["saes"][0]
    raise KeySourceError(f"no node or SAE called '{name_or_sae}' in lab {lab['name']}")


def sae_keys(lab: dict[str, Any], node: str, peers: Sequence[str] | None = None, *, via: str = "014",
             **kw: Any) -> Etsi014Keys | NodeApiKeys:
    """The key source of `node`'s SAE (a node name: its first SAE); peers are node names
    or SAE IDs (default: every other node's SAEs). via: "014" (ETSI 014) or "api" (the
    node's one-call key API)."""
    me, sae = node_sae(lab, node)
    if peers:
        peer_saes = [node_sae(lab, p)[1]["id"] for p in peers]
    else:
        peer_saes = [s["id"] for n in lab["nodes"] if n is not me for s in n["saes"]]
    src = etsi014_keys(me["kms"]["url"], sae["cert"], sae["key"], lab["ca"]["cert"], peer_saes, **kw)
    return NodeApiKeys(src.client, peer_saes) if via == "api" else src


def get(lab: dict[str, Any], src: str, dst: str, *, size: int = 256, wait: float = 60.0) -> KeyResult:
    """One key at `src`'s KME for `dst`'s SAE, and the same key at `dst`'s KME by its ID."""
    start = time.monotonic()
    msae, ssae = node_sae(lab, src)[1]["id"], node_sae(lab, dst)[1]["id"]
    master, slave = sae_keys(lab, src, [ssae], size=size, wait=wait), sae_keys(lab, dst, [msae])
    assert isinstance(master, Etsi014Keys)
    try:
        key_id, key = master.new_key()
        other = slave.key(key_id)
    finally:
        master.close()
        slave.close()
    if other != key:
        raise KeySourceError("the two ends returned different keys for the same key ID")
    return KeyResult(key_id, key, msae, ssae, master.attempts, time.monotonic() - start)
