"""From a lab topology to what every process of the lab needs: node identities, ports,
the lab PKI, credentials, and one agent config per node. Pure apart from writing the
certificates and config files into the lab directory.
"""
from __future__ import annotations

import json
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdqkd.qkdprofile import resolved_profile
from sdqkd.agents.netconf import ssh
from sdqkd import pki
from sdqkd.lab import hosts as lab_hosts
from sdqkd.private import private_dir, write_private

LAB_NS = uuid.UUID("0b5e2f7a-6c1d-4e8b-9a3f-7d2c1b0a9e8f")
ETSI004_JSON_OFFSET = 1000  # the JSON 004 ports count up from kms-port-base + this
# The Prometheus endpoints count up from netconf-port-base + this (9100 for MadQCI's 8300, 9150
# for the cloud lab's 8350, so both labs run side by side): the controller's first, then the agents'.
METRICS_OFFSET = 800


@dataclass
class NodePlan:
    name: str
    qkdn_id: str
    domain: str | None
    netconf_port: int
    kms_port: int
    relay_port: int
    service_ports: dict[int, int]
    etsi004_binary_port: int
    saes: list[str]
    dir: Path
    kme_cert: tuple[Path, Path] | None = None
    sae_certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    config_path: Path | None = None
    etsi004_json_port: int = 0  # ETSI 004 JSON command form over mutual TLS (kms-port-base + 1000 up)
    metrics_port: int = 0  # Prometheus GET /metrics, plain HTTP (netconf-port-base + 801 up)
    restconf_port: int = 0  # RESTCONF (RFC 8040) over HTTPS (restconf-port-base up)
    restconf_cert: tuple[Path, Path] | None = None  # its server certificate, from the lab's root CA
    southbound: str = "netconf"  # how the controller manages the node (topology node/southbound)


@dataclass
class LabPlan:
    name: str
    dir: Path
    topology_path: Path
    password: str
    service_key: str
    ca: tuple[Path, Path]  # the lab's root CA: what every client trusts to check a lab server
    nodes: dict[str, NodePlan]
    address: str = "127.0.0.1"
    controller_port: int = 50051
    username: str = "admin"  # every agent's NETCONF user (defaults/netconf-username)
    hosts: dict[str, lab_hosts.Host] = field(default_factory=dict)  # node name -> its lab host
    # the northbound's mutual TLS: the controller's server certificate and the orchestrator's
    # client certificate (what `sdqkd` commands, tests and benchmarks present), both from `ca`
    controller_cert: tuple[Path, Path] | None = None
    orchestrator_cert: tuple[Path, Path] | None = None
    # the two intermediate CAs under `ca` (sdqkd/pki.py): KME certificates (relay, KME
    # HTTPS servers) and SAE client certificates; each port trusts one of them only
    kme_ca: tuple[Path, Path] | None = None
    sae_ca: tuple[Path, Path] | None = None
    controller_metrics_port: int = 0  # the controller's Prometheus endpoint (netconf-port-base + 800)

    @property
    def plant_path(self) -> Path:
        """The optical plant's shared state (cross-connects, cut fibres): every agent opens it,
        and `lab cut|splice|status` too."""
        return self.dir / "plant.sqlite"

    @property
    def controller_config_path(self) -> Path:
        return self.dir / "controller.json"

    def by_id(self, qkdn_id: str) -> NodePlan:
        return next(n for n in self.nodes.values() if n.qkdn_id == qkdn_id)

    def sae_directory(self) -> dict[str, str]:
        return {sae: n.qkdn_id for n in self.nodes.values() for sae in n.saes}


def lab_object(topology: dict[str, Any]) -> dict[str, Any]:
    return topology.get("sdqkd-lab:lab", topology)


def node_id(lab_name: str, node: dict[str, Any]) -> str:
    return str(node.get("qkdn-id") or uuid.uuid5(LAB_NS, f"{lab_name}/{node['name']}")).lower()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(used: set[int] | None = None) -> int:
    """A loopback port that is free now and outside the ephemeral range, so no
    outgoing connection of an already started process can take it before its
    listener binds it."""
    used = used if used is not None else set()
    lo, hi = _ephemeral_range()
    pool = (10000, lo - 1) if lo > 11000 else (hi + 1, 65535)
    rng = secrets.SystemRandom()
    for _ in range(1000):
        port = rng.randint(*pool)
        if port in used:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        used.add(port)
        return port
    raise OSError("no free loopback port outside the ephemeral range")


class _Ports:
    """Fixed bases from the topology defaults, or free loopback ports (tests, parallel labs)."""

    def __init__(self, defaults: dict[str, Any], free: bool) -> None:
        self.free = free
        self.used: set[int] = set()
        self.next = {
            "netconf": int(defaults.get("netconf-port-base", 8300)),
            "kms": int(defaults.get("kms-port-base", 8400)),
            "relay": int(defaults.get("relay-port-base", 8500)),
            "service": int(defaults.get("relay-port-base", 8500)) + 100,
            "etsi004-binary": int(defaults.get("relay-port-base", 8500)) + 200,
            "etsi004-json": int(defaults.get("kms-port-base", 8400)) + ETSI004_JSON_OFFSET,
            "metrics": int(defaults["metrics-port-base"]) if "metrics-port-base" in defaults
            else int(defaults.get("netconf-port-base", 8300)) + METRICS_OFFSET,
            "restconf": int(defaults.get("restconf-port-base", 8800)),
        }

    def take(self, kind: str) -> int:
        if self.free:
            return free_port(self.used)
        port = self.next[kind]
        self.next[kind] += 1
        return port


def _role(lab: dict[str, Any], node: str, iface: dict[str, Any]) -> str:
    if iface.get("role"):
        return str(iface["role"]).rsplit(":", 1)[-1]
    for link in lab.get("link", []):
        eps = link.get("endpoints", [])
        if f"{node}:{iface['id']}" in eps:
            return "TRANSMITTER" if eps[0] == f"{node}:{iface['id']}" else "RECEIVER"
    return "TRANSCEIVER"


def make(topology: dict[str, Any], lab_dir: Path, *, free_ports: bool = False) -> LabPlan:
    """Allocate everything and write PKI, topology copy and agent configs under lab_dir."""
    lab = lab_object(topology)
    name = lab.get("name") or "lab"
    lab_dir = Path(lab_dir)
    private_dir(lab_dir)
    topo_path = lab_dir / "topology.json"
    write_private(topo_path, json.dumps({"sdqkd-lab:lab": lab}, indent=1))
    defaults = lab.get("defaults", {})
    ports = _Ports(defaults, free_ports)
    cas = pki.make_lab_cas(lab_dir / "pki", f"sdqkd lab {name}")
    ca = cas.root
    plan = LabPlan(
        name=name,
        dir=lab_dir,
        topology_path=topo_path,
        password=secrets.token_urlsafe(18),
        service_key=secrets.token_hex(32),
        ca=ca,
        nodes={},
        address=str(defaults.get("address", "127.0.0.1")),
        controller_port=ports.take("kms") if free_ports else int(defaults.get("controller-grpc-port", 50051)),
        username=str(defaults.get("netconf-username", "admin")),
    )
    plan.kme_ca, plan.sae_ca = cas.kme, cas.sae
    plan.controller_metrics_port = ports.take("metrics")
    plan.controller_cert = pki.issue(ca, "sdqkd-controller", lab_dir / "pki" / "controller",
                                     server_names=[plan.address], client=False)
    plan.orchestrator_cert = pki.issue(ca, "sdqkd-orchestrator", lab_dir / "pki" / "orchestrator", client=True)
    for node in lab.get("node", []):
        nd = lab_dir / "nodes" / node["name"]
        private_dir(nd)
        np = NodePlan(
            name=node["name"],
            qkdn_id=node_id(name, node),
            domain=node.get("domain"),
            netconf_port=ports.take("netconf"),
            kms_port=ports.take("kms"),
            relay_port=ports.take("relay"),
            service_ports={int(i["id"]): ports.take("service") for i in node.get("qkd-interface", [])},
            etsi004_binary_port=ports.take("etsi004-binary"),
            saes=[s["id"] for s in node.get("sae", [])],
            dir=nd,
            etsi004_json_port=ports.take("etsi004-json"),
            metrics_port=ports.take("metrics"),
            restconf_port=ports.take("restconf"),
            southbound=str(node.get("southbound", "netconf")),
        )
        np.restconf_cert = pki.issue(ca, f"{np.name} RESTCONF", nd / "pki" / "restconf",
                                     server_names=[plan.address], client=False)
        np.kme_cert = pki.issue(plan.kme_ca, np.qkdn_id, nd / "pki", server_names=["127.0.0.1", "localhost", "::1"],
                                client=True, kme=True)
        for sae in np.saes:
            np.sae_certs[sae] = pki.issue(plan.sae_ca, sae, lab_dir / "saes" / _safe(sae), client=True)
        plan.nodes[np.name] = np
    with_host = [n for n in lab.get("node", []) if n.get("host")]
    plan.hosts = {h.node: h for h in lab_hosts.plan(lab_hosts.lab_tag(name, lab_dir), [n["name"] for n in with_host])}
    pw_hash = ssh.hash_password(plan.password)
    for node in lab.get("node", []):
        np = plan.nodes[node["name"]]
        cfg = agent_config(plan, lab, node, np, pw_hash)
        np.config_path = np.dir / "agent.json"
        write_private(np.config_path, json.dumps(cfg, indent=1))  # password hash, service key
    return plan


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def agent_config(plan: LabPlan, lab: dict[str, Any], node: dict[str, Any], np: NodePlan, pw_hash: str) -> dict[str, Any]:
    peers = {}
    for other in plan.nodes.values():
        if other.name == np.name:
            continue
        peers[other.qkdn_id] = {
            "node": other.name,
            "service": {str(i): [plan.address, p] for i, p in other.service_ports.items()},
            "relay": [plan.address, other.relay_port],
            **({"kme_pin": pki.spki_pin(other.kme_cert[0])} if other.kme_cert else {}),
        }
    assert np.kme_cert is not None and plan.kme_ca is not None and plan.sae_ca is not None
    return {
        "node": {"name": np.name, "qkdn_id": np.qkdn_id, "location": node.get("location") or np.name},
        "netconf": {
            "address": plan.address,
            "port": np.netconf_port,
            "host_key": str(np.dir / "ssh_host_ed25519_key"),
            "users": [{"name": plan.username, "password_hash": pw_hash}],
        },
        "state_dir": str(np.dir / "state"),
        "running_path": str(np.dir / "state" / "running.xml"),
        "plant": {"inventory": plant_inventory(lab), "state": str(plan.plant_path)},
        "service_key": plan.service_key,
        "qkd_modules": [
            {
                "qkdi_id": int(i["id"]),
                "profile": resolved_profile(lab, np.name, int(i["id"]), i["profile"]).to_dict(),
                **({"channel": int(i["channel"])} if i.get("channel") is not None else {}),
                "role": _role(lab, np.name, i),
                "service_port": np.service_ports[int(i["id"])],
                **({"device": i["attachment"]["switch"], "port": int(i["attachment"]["port"])} if i.get("attachment", {}).get("switch") else {}),
                **({"driver": "qkd-etsi014", "etsi014": etsi014_device(i["device"])} if i.get("device") else {}),
            }
            for i in node.get("qkd-interface", [])
        ],
        "switches": [
            {"name": sw["name"], "ports": int(sw["ports"]), "insertion_loss": float(sw.get("insertion-loss", 1.0))}
            for sw in lab.get("switch", [])
            if sw.get("node") == np.name
        ],
        "peers": peers,
        **({"qrng": {"source": node["qrng"].get("source", "emulated"),
                     "rate": float(node["qrng"].get("rate", 4_000_000))}} if "qrng" in node else {}),
        "kms": {
            "address": plan.address,
            "port": np.kms_port,
            "relay_port": np.relay_port,
            "sae_ca": str(plan.sae_ca[0]),
            "kme_ca": str(plan.kme_ca[0]),
            "etsi004_binary": {"port": np.etsi004_binary_port},
            "cert": str(np.kme_cert[0]),
            "key": str(np.kme_cert[1]),
            "saes": plan.sae_directory(),
            "link_key_limit": int(lab.get("defaults", {}).get("link-key-limit", 100_000)),
            "etsi004_json": {"port": np.etsi004_json_port},
        },
        **({"ipsec": ipsec_config(plan, lab, np.name)} if np.name in plan.hosts else {}),
        **({"metrics": {"address": plan.address, "port": np.metrics_port}} if np.metrics_port else {}),
        **({"restconf": {"host": plan.address, "port": np.restconf_port, "cert": str(np.restconf_cert[0]),
                         "key": str(np.restconf_cert[1])}} if np.restconf_cert else {}),
    }


def etsi014_device(device: dict[str, Any]) -> dict[str, Any]:
    """A topology `device` as the agent's ETSI 014 driver config (agents/config.py
    Etsi014DeviceConf): the agent is SAE `sae-id` at its device and asks it for the keys it
    shares with `peer-sae-id`, the peer agent's SAE at the peer device. The files are the
    operator's (lab check made sure they are readable and the key private), used in place."""
    return {"url": str(device["url"]).rstrip("/"), "sae_id": device["sae-id"], "peer_sae_id": device["peer-sae-id"],
            "ca": device["ca-certificate"], "cert": device["certificate"], "key": device["private-key"]}


def plant_inventory(lab: dict[str, Any]) -> dict[str, Any]:
    """What the emulated optical plant is made of (agents/emulation/plant.py): switches, each
    node's QKD interfaces (channel, switch attachment), fibres and links, as in the topology."""
    nodes = [{"name": n["name"], "qkd-interface": [{k: i[k] for k in ("id", "channel", "attachment") if k in i}
                                                   for i in n.get("qkd-interface", [])]} for n in lab.get("node", [])]
    return {"name": lab.get("name", ""), "switch": lab.get("switch", []), "node": nodes,
            "fibre": lab.get("fibre", []), "link": lab.get("link", [])}


def ipsec_config(plan: LabPlan, lab: dict[str, Any], node: str) -> dict[str, Any]:
    """The node's lab host and every other host, with the API that sets up its tunnel ends."""
    sae = {n["name"]: n["host"]["sae"] for n in lab.get("node", []) if n.get("host")}
    h = plan.hosts[node]
    return {
        "netns": h.netns, "address": h.address, "inner": h.inner, "sae_id": sae[node],
        "peers": {o.node: {"api": [plan.address, plan.nodes[o.node].kms_port], "sae_id": sae[o.node],
                           "address": o.address, "inner": o.inner}
                  for o in plan.hosts.values() if o.node != node},
    }


def controller_config(plan: LabPlan) -> dict[str, Any]:
    """The controller's config for this lab: every agent, the SAE directory, the plant."""
    return {
        "agents": [
            {"name": n.name, "qkdn_id": n.qkdn_id, "host": plan.address, "port": n.netconf_port,
             "username": plan.username, "password": plan.password, "domain": n.domain, **_southbound(plan, n)}
            for n in plan.nodes.values()
        ],
        "state_dir": str(plan.dir / "controller"),
        "inventory": lab_object(json.loads(plan.topology_path.read_text())),
        "saes": plan.sae_directory(),
        "grpc": {"address": plan.address, "port": plan.controller_port, "ca": str(plan.ca[0]),
                 **({"cert": str(plan.controller_cert[0]), "key": str(plan.controller_cert[1])} if plan.controller_cert else {})},
        **({"metrics": {"address": plan.address, "port": plan.controller_metrics_port}}
           if plan.controller_metrics_port else {}),
    }


def restconf_url(plan: LabPlan, n: NodePlan) -> str:
    """The node's RESTCONF root (RFC 8040 3.1)."""
    return f"https://{plan.address}:{n.restconf_port}/restconf"


def _southbound(plan: LabPlan, n: NodePlan) -> dict[str, Any]:
    """How the controller manages node `n` (controller/config.py AgentEntry): NETCONF, or
    RESTCONF at the node's RFC 8040 root, its certificate checked against the lab CA."""
    if n.southbound != "restconf":
        return {"southbound": "netconf"}
    return {"southbound": "restconf", "restconf": {"url": restconf_url(plan, n), "ca": str(plan.ca[0])}}


def write_controller_config(plan: LabPlan) -> Path:
    path = plan.controller_config_path
    write_private(path, json.dumps(controller_config(plan), indent=1))  # the agents' NETCONF password
    return path
