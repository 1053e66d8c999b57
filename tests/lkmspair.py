"""Two real LKMS nodes, alice and bob, joined by one PHYS link whose keys both stores
hold and by their forwarding modules (real mutual-TLS relay on loopback), each served
by whatever front end a test puts on it (ETSI 004 REST, the binary protocol...)."""
from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdqkd import pki
from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig
from sdqkd.agents.kms.routes import AppRoute, LinkRoute, RouteTable


def lkms_pair(d: Path, ca: tuple[Path, Path], kmes: tuple[str, str], saes: dict[str, str], link: str, app: str,
              serve: Callable[[Lkms, ssl.SSLContext], Any], link_keys: int = 200) -> list[tuple[Lkms, Any]]:
    """[(alice's Lkms, its server), (bob's...)]: `serve(lkms, server_ctx)` starts each one's
    front end; `link_keys` keys of 32 bytes in both stores, as a QKD pair delivers them."""
    nodes = []
    for kme, name in zip(kmes, ("alice", "bob")):
        cert = pki.issue(ca, kme, d / name, server_names=["127.0.0.1"], client=True)
        server_ctx, client_ctx = pki.server_ssl_context(*cert, ca[0]), pki.client_ssl_context(*cert, ca[0])
        lkms = Lkms(LkmsConfig(kme, name, saes), KeyStore(d / f"{name}.sqlite"), os.urandom,
                    fm.Forwarder(kme, ("127.0.0.1", 0), server_ctx, client_ctx, {}))
        nodes.append((lkms, serve(lkms, server_ctx)))
    (alice, _), (bob, _) = nodes
    alice.forwarder.peers, bob.forwarder.peers = {kmes[1]: bob.forwarder.address}, {kmes[0]: alice.forwarder.address}
    for lkms, remote in ((alice, kmes[1]), (bob, kmes[0])):
        lkms.update_routes(RouteTable(lkms.cfg.kme_id, {link: LinkRoute(link, "PHYS", True, remote)},
                                      (AppRoute(app, frozenset(saes), (link,)),)))
    keys = [(str(uuid.uuid4()), os.urandom(32)) for _ in range(link_keys)]
    for lkms, _ in nodes:
        for key_id, key in keys:
            lkms.key_sink(link, key_id, key)
        lkms.store.flush()
    return nodes
