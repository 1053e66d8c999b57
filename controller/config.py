"""The controller's configuration file (JSON), which `sdqkd lab up` writes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdqkd.configfile import ConfigError, parse_into, read_json


@dataclass
class RestconfEntry:
    """Where an agent serves RESTCONF (lab.json's node `restconf`): the RFC 8040 root
    (https://host:port/restconf) and the CA its certificate is checked against."""

    url: str
    ca: str | None = None


@dataclass
class AgentEntry:
    name: str
    qkdn_id: str
    host: str
    port: int
    username: str = "admin"
    password: str | None = None
    key_filename: str | None = None
    hostkey_b64: str | None = None
    domain: str | None = None
    # How the controller manages this agent: "netconf" (SSH, host/port above) or "restconf"
    # (`restconf`, logging in with the same username and password); a lab may mix them.
    southbound: str = "netconf"
    restconf: RestconfEntry | None = None


SOUTHBOUNDS = ("netconf", "restconf")


@dataclass
class GrpcConf:
    """The northbound. It serves mutual TLS: `cert`/`key` are the controller's, and only
    clients with a certificate signed by `ca` (the lab CA, which issues the orchestrator's)
    get in. Anyone on the host could otherwise delete applications and channels, so
    plaintext needs the explicit `insecure: true`."""

    address: str = "127.0.0.1"
    port: int = 50051
    cert: str | None = None
    key: str | None = None
    ca: str | None = None  # client certificates must be signed by it
    insecure: bool = False


@dataclass
class MetricsConf:
    """The Prometheus endpoint, GET http://address:port/metrics (controller/metrics.py);
    port 0: not served. Plain HTTP: it carries no secret, but describes the network."""

    port: int = 0
    address: str = "127.0.0.1"


@dataclass
class ControllerConfig:
    agents: list[AgentEntry]
    state_dir: str
    # The inventory NETCONF does not carry (sdqkd-lab RFC 7951 names): QKD profiles, nodes and
    # their interfaces' attachments, fibres, switches, domains; `sdqkd lab up` writes it here.
    inventory: dict[str, Any] | None = None
    saes: dict[str, str] = field(default_factory=dict)  # SAE -> qkdn_id of its node
    grpc: GrpcConf = field(default_factory=GrpcConf)
    confirm_timeout: int = 60
    auto_applications: bool = True  # provision a path when an agent reports sdqkdn_application_new
    # Reconciliation and self-healing (controller.py): every agent is reconciled against the
    # store on each (re)connect and every reconcile_interval s; applications are checked every
    # heal_interval s and moved back to a path at least better_margin cheaper once it has
    # stayed so for hold_down s (a link or node that flaps does not drag them to and fro).
    reconcile_interval: float = 30.0
    heal_interval: float = 1.0
    hold_down: float = 5.0
    better_margin: float = 0.2
    log_level: str = "INFO"
    metrics: MetricsConf | None = None  # absent: no metrics endpoint


def parse(data: dict[str, Any]) -> ControllerConfig:
    problems: list[str] = []
    cfg = parse_into(ControllerConfig, data, "config", problems)
    if cfg is not None and not cfg.agents:
        problems.append("config.agents: at least one agent")
    for i, a in enumerate(cfg.agents if cfg is not None else []):
        if a.southbound not in SOUTHBOUNDS:
            problems.append(f"config.agents[{i}].southbound: one of {', '.join(SOUTHBOUNDS)}, not {a.southbound!r}")
        elif a.southbound == "restconf" and a.restconf is None:
            problems.append(f"config.agents[{i}].restconf: required when southbound is restconf")
    if cfg is not None and not cfg.grpc.insecure:
        missing = [f"config.grpc.{k}" for k in ("cert", "key", "ca") if not getattr(cfg.grpc, k)]
        if missing:
            problems.append(f"{', '.join(missing)}: required for mutual TLS (or set config.grpc.insecure: true for plaintext)")
    if cfg is not None and cfg.metrics is not None and not 0 <= cfg.metrics.port <= 65535:
        problems.append("config.metrics.port: out of range (0: not served)")
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path: Path | str) -> ControllerConfig:
    return parse(read_json(path))
