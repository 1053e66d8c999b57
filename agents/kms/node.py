"""Assembles a node's LKMS from the agent config: key store, forwarding module, the
ETSI 014 and 004 HTTPS front ends on one port."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from sdqkd.agents.config import AgentConfig
from sdqkd.agents.kms import etsi004, etsi014, https
from sdqkd import pki
from sdqkd.agents.kms.forwarding import Forwarder
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig


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
          on_missing_path: Callable[..., None] | None = None,
          more_routes: Callable[[web.Application, Lkms], None] | None = None) -> KmsNode:
    """The LKMS of this node; without a `kms` section, a key store only (a relay-less
    node still keeps its link keys). The HTTPS server carries ETSI 014 and 004, and
    whatever `more_routes` adds (the node's quantum-as-a-service APIs)."""
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
    if more_routes is not None:
        more_routes(app, lkms)
    server = https.HttpsServer(app, k.address, k.port, server_ctx, role="ETSI 014/004 HTTPS",
                               header_timeout=k.header_timeout, max_connections=k.max_connections)
    return KmsNode(lkms, server)
