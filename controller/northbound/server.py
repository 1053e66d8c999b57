"""Start the controller's gRPC server: the sdqkd.v1.Controller service plus server
reflection, so grpcurl and generic clients can list and call it without the .proto."""
from __future__ import annotations

from concurrent import futures

import grpc
from grpc_reflection.v1alpha import reflection

from sdqkd.controller.controller import Controller
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.northbound.servicer import ControllerServicer
from sdqkd.listen import ListenError, bind_error

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name  # "sdqkd.v1.Controller"
# Every StreamEvents call holds a worker thread for as long as the client listens.
MAX_WORKERS = 32


def start(controller: Controller, address: str, port: int) -> grpc.Server:
    """Serve `controller` on address:port (insecure; loopback in the lab) and return the
    started server; stop it with server.stop(grace). Fails if the port is taken."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="grpc-northbound"),
        # gRPC sets SO_REUSEPORT by default: a second controller would share the port silently.
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(controller), server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError:  # grpcio raises when it cannot bind, without the reason: ask the OS
        bound = 0
    if bound == 0:
        raise ListenError("controller gRPC", address, port, bind_error(address, port) or "gRPC refused the address")
    server.start()
    return server

