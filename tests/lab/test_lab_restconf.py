"""A planned lab gives every agent a RESTCONF server (lab/plan.py) and says in lab.json
where it is and which CA to trust (lab/labjson.py); a client that knows only lab.json
reaches it."""
from __future__ import annotations

import ssl

import httpx

from agentproc import AgentProc
from labnets import ring_topology
from sdqkd.lab import labjson
from sdqkd.lab import plan as lab_plan


def test_ports_from_the_topology_base(tmp_path) -> None:
    plan = lab_plan.make(ring_topology("rc", ["A", "B", "C"], **{"restconf-port-base": 9900}), tmp_path)
    assert [np.restconf_port for np in plan.nodes.values()] == [9900, 9901, 9902]
    default = lab_plan.make(ring_topology("rc2", ["A", "B"]), tmp_path / "two")
    assert [np.restconf_port for np in default.nodes.values()] == [8800, 8801]


def test_lab_json_leads_to_a_working_restconf_server(tmp_path) -> None:
    plan = lab_plan.make(ring_topology("rc", ["A", "B"]), tmp_path, free_ports=True)
    data = labjson.describe(plan, {}, None)
    node = next(n for n in data["nodes"] if n["name"] == "A")
    np = plan.nodes["A"]
    assert node["restconf"]["url"] == f"https://127.0.0.1:{np.restconf_port}/restconf"
    assert node["restconf"]["ca"] == data["ca"]["cert"]
    proc = AgentProc("A", np.qkdn_id, np.netconf_port, np.config_path, np.dir).start()
    try:
        tls = ssl.create_default_context(cafile=node["restconf"]["ca"])  # checks the name 127.0.0.1 too
        auth = (node["netconf"]["username"], node["netconf"]["password"])
        with httpx.Client(verify=tls, auth=auth, timeout=20) as c:
            r = c.get(node["restconf"]["url"] + "/data/etsi-qkd-sdn-node:qkd_node/qkdn_id")
        assert r.status_code == 200 and r.json() == {"etsi-qkd-sdn-node:qkdn_id": np.qkdn_id}
    finally:
        proc.stop()
