"""A planned lab gives every agent a RESTCONF server (lab/plan.py) and says in lab.json
where it is and which CA to trust (lab/labjson.py); a client that knows only lab.json
reaches it."""
from __future__ import annotations

import ssl

import httpx
import pytest

from agentproc import AgentProc
from labnets import ring_topology
from sdqkd.agents import config as agent_config
from sdqkd.configfile import ConfigError
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


def test_a_broken_restconf_section_is_refused_at_load(tmp_path) -> None:
    """A missing certificate, a client CA that is no CA, a port out of range: said when the
    config is read, all at once, not when the server starts or a client connects."""
    plan = lab_plan.make(ring_topology("rcbad", ["A", "B"]), tmp_path, free_ports=True)
    raw = agent_config.read_json(plan.nodes["A"].config_path)
    assert agent_config.parse(raw).restconf is not None
    raw["restconf"].update(port=70000, cert=str(tmp_path / "gone.crt"), client_ca=raw["restconf"]["key"])
    with pytest.raises(ConfigError) as err:
        agent_config.parse(raw)
    said = "\n".join(err.value.problems)
    for what in ("config.restconf.port: out of range", "config.restconf.cert:", "config.restconf.client_ca:"):
        assert what in said, said
