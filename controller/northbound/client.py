"""The client side of the northbound's mutual TLS: one place that makes a channel to the
controller, so every in-repo client (the lab, the CLI, tests, benchmarks) authenticates
the same way. The lab passes the paths it wrote to lab.json (controller.tls)."""
from __future__ import annotations

from pathlib import Path

import grpc

from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc


def channel(target: str, *, ca: str | Path | None, cert: str | Path | None, key: str | Path | None,
            insecure: bool = False) -> grpc.Channel:
    """A channel to the controller at `target` ("host:port") presenting `cert`/`key` and
    trusting `ca` for the server; plaintext only when `insecure` (a controller run with
    grpc.insecure: true)."""
    if insecure:
        return grpc.insecure_channel(target)
    if not (ca and cert and key):
        raise ValueError("a controller channel needs ca, cert and key (mutual TLS)")
    creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                         private_key=Path(key).read_bytes(),
                                         certificate_chain=Path(cert).read_bytes())
    return grpc.secure_channel(target, creds)


def stub(target: str, *, ca: str | Path | None, cert: str | Path | None, key: str | Path | None,
         insecure: bool = False) -> pb_grpc.ControllerStub:
    """A ControllerStub over `channel(...)`."""
    return pb_grpc.ControllerStub(channel(target, ca=ca, cert=cert, key=key, insecure=insecure))
