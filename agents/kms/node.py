"""Assembles a node's LKMS from the agent config: key store, forwarding module, the
ETSI 014 and 004 HTTPS front ends on one port, and the ETSI 004 JSON command form and
binary protocol on ports of their own when configured."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdqkd.agents.kms import web

from sdqkd.agents.config import AgentConfig
from sdqkd.agents.kms import etsi004, etsi004_binary, etsi004_json, etsi014, https, keystream, streamserver
from sdqkd import pki
from sdqkd.agents.kms.forwarding import Forwarder, RelayLimits
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
    assert k.sae_ca is not None and k.kme_ca is not None  # config.py refuses a kms section without them
    peers = {qid: (str(p.relay[0]), int(p.relay[1])) for qid, p in cfg.peers.items() if p.relay}
    pins = {qid: p.kme_pin for qid, p in cfg.peers.items() if p.relay and p.kme_pin}
    # The relay trusts the KME CA only (and then a configured peer with its pinned key only).
    forwarder = Forwarder(
        cfg.node.qkdn_id,
        (k.address, k.relay_port),
        pki.server_ssl_context(k.cert, k.key, k.kme_ca),
        pki.client_ssl_context(k.cert, k.key, k.kme_ca),
        peers,
        pins=pins,
        limits=RelayLimits(idle_timeout=k.relay_idle_timeout, handshake_timeout=k.relay_handshake_timeout,
                           max_connections=k.relay_max_connections, max_handshakes=k.relay_max_handshakes,
                           max_per_peer=k.relay_max_per_peer, workers=k.relay_workers),
    )
    lkms = Lkms(
        LkmsConfig(cfg.node.qkdn_id, cfg.node.name, dict(k.saes), key_size=k.key_size, default_ttl=k.default_ttl,
                   max_key_count=k.link_key_limit),  # ETSI 014 status: no pair stores more than a link holds
        store,
        entropy,
        forwarder,
        on_missing_path,
    )
    # The key-delivery port trusts the SAE CA; the KME CA too only on a node whose IPsec
    # peers call its responder API (those calls get no key: https.sae_of refuses a KME).
    callers = [k.sae_ca, *([k.kme_ca] if cfg.ipsec is not None else [])]
    app = https.make_app()
    https.trust(app, sae_ca=k.sae_ca, kme_ca=k.kme_ca if cfg.ipsec is not None else None)
    etsi014.add_routes(app, lkms)
    etsi004.add_routes(app, lkms, node_names(cfg))
    if more_routes is not None:
        more_routes(app, lkms)
    sae_only = pki.server_ssl_context(k.cert, k.key, [k.sae_ca])
    t = k.header_timeout
    server = https.HttpsServer(app, k.address, k.port, pki.server_ssl_context(k.cert, k.key, callers),
                               role="ETSI 014/004 HTTPS",
                               limits=web.Limits(head_timeout=t, body_timeout=t, handshake_timeout=t,
                                                 max_connections=k.max_connections))
    node = KmsNode(lkms, server)
    if k.etsi004_json is not None:
        j = k.etsi004_json
        streams = keystream.KeyStreams(lkms, node_names(cfg))
        node.streams.append(streamserver.StreamServer(
            etsi004_json.handler(streams), j.address or k.address, j.port, None if j.plain else sae_only,
            limits=streamserver.limits_of(j), role="ETSI 004 JSON"))
    if k.etsi004_binary is not None:
        b = k.etsi004_binary
        limits = dataclasses.replace(streamserver.limits_of(b), max_request=etsi004_binary.MAX_MESSAGE)
        node.streams.append(etsi004_binary.server(lkms, k.address, b.port, sae_only, node_names(cfg), limits=limits))
    return node


def node_names(cfg: AgentConfig) -> dict[str, set[str]]:
    """SAE ID -> the names its node goes by (qkdn_id, node name), lower case: an ETSI 004
    URI `qkd://SAE@node` naming another node than the SAE's is refused."""
    names = {cfg.node.qkdn_id.lower(): {cfg.node.qkdn_id.lower(), cfg.node.name.lower()}}
    names.update({qid.lower(): {qid.lower(), p.node.lower()} for qid, p in cfg.peers.items()})
    assert cfg.kms is not None
    return {sae: names.get(qid.lower(), {qid.lower()}) for sae, qid in cfg.kms.saes.items()}
