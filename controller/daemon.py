"""The controller process: Controller + gRPC northbound until asked to stop."""
from __future__ import annotations

import logging
import threading

from sdqkd.controller.config import ControllerConfig
from sdqkd.controller.controller import Controller

log = logging.getLogger(__name__)


def serve(cfg: ControllerConfig, stop: threading.Event) -> None:
    from sdqkd.controller.northbound import server as northbound

    logging.getLogger("ncclient").setLevel(logging.WARNING)  # one line per RPC otherwise
    ctl = Controller(cfg)
    ctl.start()
    try:
        grpc_server = northbound.start(ctl, cfg.grpc.address, cfg.grpc.port, cfg.grpc)
    except BaseException:
        ctl.stop()
        raise
    if cfg.metrics is not None and cfg.metrics.port:
        try:
            ctl.metrics.serve(cfg.metrics.address, cfg.metrics.port)
        except BaseException:
            grpc_server.stop(grace=0)
            ctl.stop()
            raise
    log.info("controller serving gRPC on %s:%s (%s) for %d agents", cfg.grpc.address, cfg.grpc.port,
             "PLAINTEXT: insecure" if cfg.grpc.insecure else "mutual TLS", len(cfg.agents))
    try:
        stop.wait()
    finally:
        grpc_server.stop(grace=2).wait()
        ctl.stop()
