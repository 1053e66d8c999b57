"""One in-process ETSI GS QKD 014 KME (real HTTPS, mutual TLS, the real LKMS with one node
holding both SAEs), shared by the ETSI 014 tests and the QKD-keyed TLS tests."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from etsi_qkd_014_client import QKD014Client

from sdqkd import pki
from sdqkd.agents.kms import etsi014
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig

KME = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-test/etsi014/alice"))


@dataclass
class Kme:
    url: str
    host: str  # host:port, as QKD014Client wants it
    ca: Path
    certs: dict[str, tuple[Path, Path]]
    lkms: Lkms

    def client(self, sae: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=pki.client_ssl_context(*self.certs[sae], self.ca), timeout=10)

    def lib(self, sae: str) -> QKD014Client:
        return QKD014Client(self.host, str(self.certs[sae][0]), str(self.certs[sae][1]), str(self.ca))


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kme]:
    d = tmp_path_factory.mktemp("etsi014")
    ca = pki.make_ca(d / "ca", "lab-ca")
    server = pki.issue(ca, KME, d / "kme", server_names=["127.0.0.1"], client=True)
    certs = {sae: pki.issue(ca, sae, d / "sae", client=True) for sae in ("sae-a", "sae-b", "sae-x")}
    other_ca = pki.make_ca(d / "other", "other-ca")
    certs["rogue"] = pki.issue(other_ca, "sae-a", d / "other", client=True)  # right name, wrong CA
    certs["server-only"] = pki.issue(ca, "sae-a", d / "srv", server_names=["sae-a"], client=False)  # no clientAuth
    lkms = Lkms(LkmsConfig(kme_id=KME, node="alice", saes={"sae-a": KME, "sae-b": KME}),
                KeyStore(d / "keys.sqlite"), entropy=os.urandom)
    app = make_app()
    etsi014.add_routes(app, lkms)
    srv = HttpsServer(app, "127.0.0.1", 0, pki.server_ssl_context(*server, ca[0]), access_log=True).start()
    yield Kme(f"https://127.0.0.1:{srv.port}", f"127.0.0.1:{srv.port}", ca[0], certs, lkms)
    srv.stop()
    lkms.shutdown()
