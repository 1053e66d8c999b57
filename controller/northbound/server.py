"""Start the controller's gRPC server: the sdqkd.v1.Controller service plus server
reflection, so grpcurl and generic clients can list and call it without the .proto."""
from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection

from sdqkd.controller.config import GrpcConf
from sdqkd.controller.controller import Controller
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.northbound.servicer import ControllerServicer
from sdqkd.listen import ListenError, bind_error

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name  # "sdqkd.v1.Controller"
# Every StreamEvents call holds a worker thread for as long as the client listens.
MAX_WORKERS = 32


def credentials(conf: GrpcConf) -> grpc.ServerCredentials | None:
    """Mutual TLS from `conf` (clients must present a certificate signed by conf.ca), or
    None for plaintext, which only conf.insecure allows."""
    if conf.insecure:
        return None
    if not (conf.cert and conf.key and conf.ca):
        raise ValueError("the gRPC northbound needs cert, key and ca (mutual TLS), or insecure: true")
    return grpc.ssl_server_credentials(
        [(Path(conf.key).read_bytes(), Path(conf.cert).read_bytes())],
        root_certificates=Path(conf.ca).read_bytes(), require_client_auth=True)


def start(controller: Controller, address: str, port: int, tls: GrpcConf | None = None) -> grpc.Server:
    """Serve `controller` on address:port with mutual TLS as `tls` says (None or
    tls.insecure: plaintext) and return the started server; stop it with
    server.stop(grace). Fails if the port is taken."""
    creds = credentials(tls) if tls is not None else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="grpc-northbound"),
        # gRPC sets SO_REUSEPORT by default: a second controller would share the port silently.
        options=[("grpc.so_reuseport", 0)],
        interceptors=[controller.metrics.interceptor],  # calls by method and status code
    )
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(controller), server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        bound = server.add_secure_port(target, creds) if creds is not None else server.add_insecure_port(target)
    except RuntimeError:  # grpcio raises when it cannot bind, without the reason: ask the OS
        bound = 0
    if bound == 0:
        raise ListenError("controller gRPC", address, port, bind_error(address, port) or "gRPC refused the address")
    server.start()
    return server

