"""One in-process ETSI GS QKD 014 KME (real HTTPS, mutual TLS, the real LKMS with one node
holding both SAEs), shared by the ETSI 014 tests and the QKD-keyed TLS tests; and a real
KME agent process (start_kme_agent) for tests that watch the server's threads, descriptors
and files from outside."""
from __future__ import annotations

import json
import os
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from etsi_qkd_014_client import QKD014Client

from sdqkd import pki
from sdqkd.agents.kms import etsi014
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig
from agentproc import AgentProc, agent_config, free_port

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


@dataclass
class KmeAgent:
    proc: AgentProc
    url: str
    port: int
    ca: str
    certs: dict[str, tuple[str, str]]

    def client(self, sae: str = "sae-a", timeout: float = 10) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=pki.client_ssl_context(*self.certs[sae], self.ca), timeout=timeout)

    def tls(self, sae: str = "sae-a") -> ssl.SSLContext:
        return pki.client_ssl_context(*self.certs[sae], self.ca)

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def start_kme_agent(tmp: Path, name: str, state_dir: Path | None = None, **kms: Any) -> KmeAgent:
    """A real agent process (`sdqkd agent`) whose LKMS holds two SAEs (sae-a, sae-b): their keys
    never leave the node. `kms`: more of the config's kms section (header_timeout...)."""
    qkdn_id = str(uuid.uuid4())
    d = tmp / f"pki-{name}"
    d.mkdir(parents=True, exist_ok=True)
    cas = pki.make_lab_cas(d, "lab")
    ca = cas.root
    cert, key = pki.issue(cas.kme, qkdn_id, d, server_names=("127.0.0.1",), client=True, kme=True)
    certs = {sae: tuple(map(str, pki.issue(cas.sae, sae, d, client=True))) for sae in ("sae-a", "sae-b")}
    port = free_port()
    section = {"port": port, "relay_port": free_port(), "sae_ca": str(cas.sae[0]), "kme_ca": str(cas.kme[0]),
               "cert": str(cert), "key": str(key),
               "saes": {"sae-a": qkdn_id, "sae-b": qkdn_id}, **kms}
    proc = agent_config(tmp, name, qkdn_id, extra={"kms": section})
    if state_dir is not None:  # the state (key store...) elsewhere, e.g. on a small file system; the log stays
        cfg = json.loads(proc.config_path.read_text())
        cfg["state_dir"] = str(state_dir)
        proc.config_path.write_text(json.dumps(cfg))
        proc.log_path, proc.state_dir = proc.state_dir / "agent.log", state_dir
    proc.start()
    node = KmeAgent(proc, f"https://127.0.0.1:{port}", port, str(ca[0]), certs)  # type: ignore[arg-type]
    deadline = time.monotonic() + 15
    while True:  # NETCONF answers first; the HTTPS server comes up right after
        try:
            with node.client() as c:
                c.get("/openapi.json")
            return node
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.stop()
                raise
            time.sleep(0.05)
