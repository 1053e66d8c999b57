"""Assembles a node's LKMS from the agent config: key store, forwarding module, the
ETSI 014 and 004 HTTPS front ends on one port, and the ETSI 004 JSON command form and
binary protocol on ports of their own when configured."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from sdqkd.agents.config import AgentConfig, binary_limits
from sdqkd.agents.kms import etsi004, etsi004_binary, etsi004_json, etsi014, https, keystream, streamserver
from sdqkd import pki
from sdqkd.agents.kms.forwarding import Forwarder
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig


@dataclass
class KmsNode:
    lkms: Lkms
    server: https.HttpsServer | None
    streams: list[streamserver.StreamServer] = field(default_factory=list)  # the non-HTTP 004 forms

    def start(self) -> None:
        if self.server is not None:
            self.server.start()
        for s in self.streams:
            s.start()

    def stop(self) -> None:
        for s in self.streams:
            s.stop()
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
    server = https.HttpsServer(app, k.address, k.port, server_ctx, role="ETSI 014/004 HTTPS")
    node = KmsNode(lkms, server)
    if k.etsi004_json is not None:
        j = k.etsi004_json
        streams = keystream.KeyStreams(lkms, node_names(cfg))
        node.streams.append(streamserver.StreamServer(
            etsi004_json.handler(streams), j.address or k.address, j.port, None if j.plain else server_ctx,
            limits=streamserver.limits_of(j), role="ETSI 004 JSON"))
    if k.etsi004_binary is not None:
        node.streams.append(etsi004_binary.server(lkms, k.address, k.etsi004_binary.port, server_ctx, node_names(cfg),
                                                  limits=binary_limits(k.etsi004_binary)))
    return node


def node_names(cfg: AgentConfig) -> dict[str, set[str]]:
    """SAE ID -> the names its node goes by (qkdn_id, node name), lower case: an ETSI 004
    URI `qkd://SAE@node` naming another node than the SAE's is refused."""
    names = {cfg.node.qkdn_id.lower(): {cfg.node.qkdn_id.lower(), cfg.node.name.lower()}}
    names.update({qid.lower(): {qid.lower(), p.node.lower()} for qid, p in cfg.peers.items()})
    assert cfg.kms is not None
    return {sae: names.get(qid.lower(), {qid.lower()}) for sae, qid in cfg.kms.saes.items()}
