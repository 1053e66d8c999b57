"""Assembles a node's LKMS from the agent config: key store, forwarding module, the
ETSI 014 and 004 HTTPS front ends on one port."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from sdqkd.agents.config import AgentConfig
from sdqkd.agents.kms import etsi004, etsi014, https, pki
from sdqkd.agents.kms.forwarding import Forwarder
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig
from sdqkd.agents.qaas import api as qaas


@dataclass
class KmsNode:
    lkms: Lkms
    server: https.HttpsServer | None

    def start(self) -> None:
        if self.server is not None:
            self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.lkms.shutdown()


def build(cfg: AgentConfig, entropy: Callable[[int], bytes] = os.urandom,
          on_missing_path: Callable[[str, str], None] | None = None, *, qrng: Any | None = None,
          publish: Callable[[etree._Element], None] | None = None) -> KmsNode:
    """The LKMS of this node; without a `kms` section, a key store only (a relay-less
    node still keeps its link keys). The HTTPS server also carries the
    quantum-as-a-service APIs (agents/qaas), which may use the QRNG and send
    notifications through `publish`."""
    k = cfg.kms
    store = KeyStore(Path(cfg.state_dir) / "keys.sqlite", **({"link_key_limit": k.link_key_limit} if k else {}))
    if k is None:
        return KmsNode(Lkms(LkmsConfig(cfg.node.qkdn_id, cfg.node.name, {}), store, entropy), None)
    peers = {qid: (str(p.relay[0]), int(p.relay[1])) for qid, p in cfg.peers.items() if p.relay}
    server_ctx = pki.server_ssl_context(k.cert, k.key, k.ca)  # the relay and the HTTPS APIs
    forwarder = Forwarder(
        cfg.node.qkdn_id,
        (k.address, k.relay_port),
        server_ctx,
        pki.client_ssl_context(k.cert, k.key, k.ca),
        peers,
    )
    lkms = Lkms(
        LkmsConfig(cfg.node.qkdn_id, cfg.node.name, dict(k.saes), key_size=k.key_size, default_ttl=k.default_ttl,
                   max_key_count=k.link_key_limit),  # ETSI 014 status: no pair stores more than a link holds
        store,
        entropy,
        forwarder,
        on_missing_path,
    )
    app = https.make_app()
    etsi014.add_routes(app, lkms)
    etsi004.add_routes(app, lkms)
    qaas.add_routes(app, qaas.Context(cfg, lkms, qrng, publish))
    server = https.HttpsServer(app, k.address, k.port, server_ctx, role="ETSI 014/004 HTTPS")
    return KmsNode(lkms, server)
