"""Mutual TLS material for a controller's gRPC northbound in tests: a CA like the lab's,
the controller's server certificate, a client certificate from that CA, and a client
certificate from another CA (which the controller must refuse)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from sdqkd import pki
from sdqkd.controller.config import GrpcConf
from sdqkd.controller.northbound import client


@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # signed by another CA

    def conf(self, address: str = "127.0.0.1", port: int = 50051) -> GrpcConf:
        return GrpcConf(address=address, port=port, cert=str(self.server[0]), key=str(self.server[1]), ca=str(self.ca))

    def channel(self, target: str) -> grpc.Channel:
        return client.channel(target, ca=self.ca, cert=self.client[0], key=self.client[1])


def make(dir: Path) -> Pki:
    ca = pki.make_ca(dir / "ca", "sdqkd test CA")
    other = pki.make_ca(dir / "other", "some other CA")
    return Pki(ca=ca[0],
               server=pki.issue(ca, "sdqkd-controller", dir / "server", server_names=["127.0.0.1"], client=False),
               client=pki.issue(ca, "sdqkd-orchestrator", dir / "client", client=True),
               stranger=pki.issue(other, "sdqkd-orchestrator", dir / "stranger", client=True))
