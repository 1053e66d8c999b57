"""Small emulated networks for the controller tests, as lab topology data: a DV profile,
rings of nodes each with a transmitter (interface 1) and a receiver (interface 2), and
the agents of a planned lab started as real processes."""
from __future__ import annotations

import ssl
from typing import Any

import httpx

from agentproc import AgentProc

DV_PROFILE = {"name": "dv", "technology": "etsi-qkd-node-types:DV-QKD", "band": "O-band", "max-absorption": "20.0",
              "reference-skr": "300.0", "reference-loss": "4.0", "qber": "2.5"}


def dv_nodes(names: list[str]) -> list[dict[str, Any]]:
    """Nodes with two DV interfaces and one SAE each (sae-<name>)."""
    return [{"name": n, "qkd-interface": [{"id": 1, "profile": "dv"}, {"id": 2, "profile": "dv"}],
             "sae": [{"id": f"sae-{n.lower()}"}]} for n in names]


def fibres(edges: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """A 10 km, 4 dB fibre per edge, named after its ends (AB)."""
    return [{"name": f"{a}{b}", "a-end": {"node": a}, "b-end": {"node": b}, "length": "10.0", "loss": "4.0"}
            for a, b in edges]


def ring_topology(name: str, ring: list[str], **defaults: Any) -> dict[str, Any]:
    """A ring: each node's interface 1 transmits to the next node's interface 2 (link l-AB)."""
    edges = list(zip(ring, ring[1:] + ring[:1]))
    lab: dict[str, Any] = {"name": name, "profile": [DV_PROFILE], "node": dv_nodes(ring), "fibre": fibres(edges),
                           "link": [{"name": f"l-{a}{b}", "endpoints": [f"{a}:1", f"{b}:2"], "path": [f"{a}{b}"]}
                                    for a, b in edges]}
    if defaults:
        lab["defaults"] = defaults
    return {"sdqkd-lab:lab": lab}


def line_topology(name: str, line: list[str], southbound: dict[str, str] | None = None, **defaults: Any) -> dict[str, Any]:
    """A line: each node's interface 1 transmits to the next node's interface 2 (link l-AB);
    `southbound`: node -> how the controller manages it (netconf when not given)."""
    edges = list(zip(line, line[1:]))
    nodes = dv_nodes(line)
    for n in nodes:
        if (southbound or {}).get(n["name"]):
            n["southbound"] = southbound[n["name"]]
    lab: dict[str, Any] = {"name": name, "profile": [DV_PROFILE], "node": nodes, "fibre": fibres(edges),
                           "link": [{"name": f"l-{a}{b}", "endpoints": [f"{a}:1", f"{b}:2"], "path": [f"{a}{b}"]}
                                    for a, b in edges]}
    if defaults:
        lab["defaults"] = defaults
    return {"sdqkd-lab:lab": lab}


def start_agents(plan: Any) -> dict[str, AgentProc]:
    """Every node of a planned lab (sdqkd.lab.plan.make) as a running agent process."""
    return {n: AgentProc(n, np.qkdn_id, np.netconf_port, np.config_path, np.dir).start() for n, np in plan.nodes.items()}


def sae_client(plan: Any, sae: str) -> httpx.Client:
    """An ETSI 014 client of a planned lab's SAE: its certificate, the lab CA, its node's
    key-delivery base URL."""
    node = next(n for n in plan.nodes.values() if sae in n.saes)
    ctx = ssl.create_default_context(cafile=str(plan.ca[0]))
    ctx.load_cert_chain(*(str(p) for p in node.sae_certs[sae]))
    return httpx.Client(verify=ctx, timeout=20, base_url=f"https://127.0.0.1:{node.kms_port}/api/v1/keys")
