"""The Prometheus endpoints of a lab: two real agents (A, B) with an emulated QKD link each
way, and a real controller process loop (controller/daemon.py) with its gRPC northbound,
all from the configs lab/plan.py writes. Every /metrics is scraped over HTTP and parsed
with prometheus_client's own parser; values are checked to move after real actions."""
from __future__ import annotations

import ssl
import threading
import urllib.error
import urllib.request

import grpc
import httpx
import pytest
from ncclient import manager
from prometheus_client.parser import text_string_to_metric_families

from testlib import wait_for
from labnets import ring_topology, sae_client, start_agents
from sdqkd.agents import config as agent_config
from sdqkd.configfile import ConfigError
from sdqkd.controller import config as controller_config
from sdqkd.controller import daemon
from sdqkd.controller.northbound import client as nb_client
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.lab import labjson
from sdqkd.lab import plan as lab_plan
from sdqkd import yangdata

ENC_KEYS = "/api/v1/keys/{slave_SAE_ID}/enc_keys"
CREATE_APP = "/sdqkd.v1.Controller/CreateApplication"


def scrape(url: str, accept: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the endpoint: (name, labels) -> value."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    plan = lab_plan.make(ring_topology("metrics", ["A", "B"]), tmp, free_ports=True)
    procs = start_agents(plan)
    cfg = controller_config.load(lab_plan.write_controller_config(plan))
    stop = threading.Event()
    ctl = threading.Thread(target=daemon.serve, args=(cfg, stop), name="controller", daemon=True)
    ctl.start()
    access = labjson.controller_access(plan)
    tls = access["tls"]
    stub = nb_client.stub(access["grpc"], ca=tls["ca"], cert=tls["cert"], key=tls["key"])
    data = labjson.describe(plan, {n: p.proc.pid for n, p in procs.items()}, None)
    try:
        def both_up() -> bool:
            try:
                return value(scrape(data["controller"]["metrics"]), "sdqkd_agent_up") == 2
            except urllib.error.URLError:  # not listening yet
                return False
        wait_for(both_up, 30, "both agents up")
        for a, b in (("A", "B"), ("B", "A")):
            stub.CreateChannel(pb.CreateChannelRequest(tx=pb.InterfaceRef(node=a, qkdi_id=1),
                                                       rx=pb.InterfaceRef(node=b, qkdi_id=2)), timeout=60)
        wait_for(lambda: sum(1 for lk in stub.GetTopology(pb.GetTopologyRequest(), timeout=10).topology.links
                             if lk.status == "ACTIVE" and lk.skr > 0) == 2, 40, "two ACTIVE links in the view")
        yield plan, procs, data, stub
    finally:
        stop.set()
        ctl.join(20)
        for p in procs.values():
            p.stop()



def test_lab_json_and_lab_env_list_every_endpoint(lab) -> None:
    plan, _, data, _ = lab
    urls = [data["controller"]["metrics"], *(n["metrics"] for n in data["nodes"])]
    assert all(u and u.startswith("http://127.0.0.1:") and u.endswith("/metrics") for u in urls)
    assert len(set(urls)) == 3
    env = labjson.shell_env(data)
    assert env["LAB_METRICS"] == data["controller"]["metrics"]
    assert env["A_METRICS"] == data["nodes"][0]["metrics"] and env["B_METRICS"] == data["nodes"][1]["metrics"]
    for url in urls[1:]:  # an agent serves /metrics only (prometheus_client's server, the controller's, any path)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("/metrics", "/nothing"), timeout=10)
        assert err.value.code == 404


def test_fixed_bases_put_the_endpoints_beside_the_netconf_ports(tmp_path) -> None:
    """Without --free-ports: the controller at netconf-port-base + 800, the agents after it."""
    plan = lab_plan.make(ring_topology("fixed", ["A", "B"], **{"netconf-port-base": 8350}), tmp_path)
    assert plan.controller_metrics_port == 9150
    assert [n.metrics_port for n in plan.nodes.values()] == [9151, 9152]
    cfg = agent_config.load(plan.nodes["A"].config_path)
    assert cfg.metrics is not None and (cfg.metrics.address, cfg.metrics.port) == ("127.0.0.1", 9151)
    assert controller_config.load(lab_plan.write_controller_config(plan)).metrics.port == 9150


def test_metrics_port_base_moves_them(tmp_path) -> None:
    """An operator whose hosts run node_exporter on 9100 moves the lab's endpoints."""
    topo = ring_topology("moved", ["A", "B"], **{"metrics-port-base": 9400})
    assert yangdata.validate_json(topo).json["sdqkd-lab:lab"]["defaults"]["metrics-port-base"] == 9400
    plan = lab_plan.make(topo, tmp_path)
    assert (plan.controller_metrics_port, [n.metrics_port for n in plan.nodes.values()]) == (9400, [9401, 9402])


def test_metrics_port_out_of_range_is_refused(tmp_path) -> None:
    plan = lab_plan.make(ring_topology("bad", ["A", "B"]), tmp_path, free_ports=True)
    raw = agent_config.read_json(plan.nodes["A"].config_path)
    raw["metrics"]["port"] = 70000
    with pytest.raises(ConfigError, match="config.metrics.port"):
        agent_config.parse(raw)


def test_links_report_key_rate_qber_and_stored_keys(lab) -> None:
    _, _, data, _ = lab
    for node in data["nodes"]:
        url = node["metrics"]

        def running() -> bool:
            s = scrape(url)
            return (value(s, "sdqkd_link_secret_key_rate_bits_per_second") > 0
                    and value(s, "sdqkd_link_up") == 2 and value(s, "sdqkd_stored_keys") > 0)
        wait_for(running, 40, f"{node['name']}: both links making keys")
        s = scrape(url)
        qbers = [v for (n, _), v in s.items() if n == "sdqkd_link_qber_ratio"]
        assert len(qbers) == 2 and all(0 < q < 0.11 for q in qbers)  # the DV profile's 2.5 %
        bits = value(s, "sdqkd_link_key_bits_total")
        wait_for(lambda: value(scrape(url), "sdqkd_link_key_bits_total") > bits, 20, "more key bits")
        assert value(s, "sdqkd_key_store_available") == 1
        assert value(s, "process_resident_memory_bytes") > 0


def test_an_etsi014_key_request_is_counted_by_route_and_code(lab) -> None:
    plan, _, data, stub = lab
    url = data["nodes"][0]["metrics"]
    stub.CreateApplication(pb.CreateApplicationRequest(master_sae="sae-a", slave_sae="sae-b"), timeout=60)
    before = scrape(url)
    with sae_client(plan, "sae-a") as a:
        r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(a.post("/sae-b/enc_keys", json={"number": 1})),
                     30, "a key for sae-b")
        key_id = r.json()["keys"][0]["key_ID"]
        ok_before = value(scrape(url), "sdqkd_kms_requests_total", route=ENC_KEYS, method="POST", code="200")
        assert a.post("/sae-b/enc_keys", json={"number": 1}).status_code == 200
        assert a.post("/sae-b/enc_keys", json={"number": -1}).status_code == 400
        assert a.get("/sae-b/no-such-thing").status_code == 404
    after = scrape(url)
    assert value(after, "sdqkd_kms_requests_total", route=ENC_KEYS, method="POST", code="200") == ok_before + 1
    assert value(after, "sdqkd_kms_requests_total", route=ENC_KEYS, method="POST", code="400") == \
        value(before, "sdqkd_kms_requests_total", route=ENC_KEYS, method="POST", code="400") + 1
    assert value(after, "sdqkd_kms_requests_total", route="unmatched", code="404") >= 1
    assert value(after, "sdqkd_kms_request_duration_seconds_count", route=ENC_KEYS) >= ok_before + 2
    # the key pair's reservation went to B over the relay channel, timed per peer
    assert value(after, "sdqkd_relay_request_duration_seconds_count", peer=plan.nodes["B"].qkdn_id) > 0
    # no SAE ID, key ID or path parameter is ever a label
    labels = {v for (_, ls) in after for _, v in ls}
    assert not labels & {"sae-a", "sae-b", key_id, "no-such-thing"}


def test_netconf_sessions_gauge_follows_a_session(lab) -> None:
    plan, _, data, _ = lab
    url = data["nodes"][1]["metrics"]
    s0 = scrape(url)
    base, rpcs = value(s0, "sdqkd_netconf_sessions"), value(s0, "sdqkd_netconf_in_rpcs_total")
    assert base >= 1  # the controller's (its provisioning session, and the one it re-reads the node on)
    np = plan.nodes["B"]
    with manager.connect(host="127.0.0.1", port=np.netconf_port, username=plan.username, password=plan.password,
                         hostkey_verify=False, look_for_keys=False, allow_agent=False, timeout=20) as m:
        m.get_config(source="running")
        wait_for(lambda: value(scrape(url), "sdqkd_netconf_sessions") == base + 1, 10, "one more session")
    wait_for(lambda: value(scrape(url), "sdqkd_netconf_sessions") == base, 10, "the session gone")
    # get-config and close-session counted, and still counted once the session ended
    assert value(scrape(url), "sdqkd_netconf_in_rpcs_total") >= rpcs + 2


def test_controller_counts_provisioning_reconciliation_and_northbound_calls(lab) -> None:
    _, _, data, stub = lab
    url = data["controller"]["metrics"]
    s0 = scrape(url)
    assert value(s0, "sdqkd_agent_up", agent="A") == 1 and value(s0, "sdqkd_agent_up", agent="B") == 1
    assert value(s0, "sdqkd_reconcile_runs_total") >= 2  # each agent on connect
    txns = value(s0, "sdqkd_provisioning_duration_seconds_count", outcome="ok")
    assert txns >= 2  # the two channels
    created = value(s0, "sdqkd_northbound_rpcs_total", method=CREATE_APP, code="OK")
    app = stub.CreateApplication(pb.CreateApplicationRequest(master_sae="sae-b", slave_sae="sae-a"), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteApplication(pb.DeleteApplicationRequest(app_id="00000000-0000-4000-8000-000000000000"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    s1 = scrape(url)
    assert value(s1, "sdqkd_provisioning_duration_seconds_count", outcome="ok") > txns
    assert value(s1, "sdqkd_provisioning_duration_seconds_sum", outcome="ok") > 0
    assert value(s1, "sdqkd_provisioning_phase_duration_seconds_count", phase="confirm") > txns
    assert value(s1, "sdqkd_northbound_rpcs_total", method=CREATE_APP, code="OK") == created + 1
    assert value(s1, "sdqkd_northbound_rpcs_total", method="/sdqkd.v1.Controller/DeleteApplication", code="NOT_FOUND") == 1
    assert value(s1, "sdqkd_applications", state="ACTIVE") >= 1 and value(s1, "sdqkd_optical_channels") == 2
    assert app.app_id not in {v for (_, ls) in s1 for _, v in ls}
    assert not any(n.endswith("_created") for n, _ in s1)  # one series per counter, not two
    # OpenMetrics for a scraper that asks for it
    om = scrape(url, accept="application/openmetrics-text; version=1.0.0")
    assert value(om, "sdqkd_agent_up") == 2


def test_an_etsi004_json_request_is_counted_by_call_and_code(lab) -> None:
    """OPEN_CONNECT then CLOSE in the JSON command form (mutual TLS with A's SAE certificate)."""
    import json
    import socket

    plan, _, data, _ = lab
    a, b = plan.nodes["A"], plan.nodes["B"]
    url = data["nodes"][0]["metrics"]
    s0 = scrape(url)
    ctx = ssl.create_default_context(cafile=str(plan.ca[0]))
    ctx.load_cert_chain(*(str(p) for p in a.sae_certs["sae-a"]))
    request = {"command": "OPEN_CONNECT", "data": {
        "source": f"qkd://sae-a@{a.qkdn_id}", "destination": f"qkd://sae-b@{b.qkdn_id}",
        "qos": {"key_chunk_size": 32, "max_bps": 32, "min_bps": 32, "jitter": 0, "priority": 0, "timeout": 0, "ttl": 0,
                "metadata_mimetype": "application/json"}}}
    with socket.create_connection(("127.0.0.1", a.etsi004_json_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(json.dumps(request).encode())
        opened = json.loads(s.recv(65057))
        s.sendall(json.dumps({"command": "CLOSE", "data": {"key_stream_id": opened["key_stream_id"]}}).encode())
        assert json.loads(s.recv(65057)) == {"status": 0}
    s1 = scrape(url)
    for call in ("open_connect", "close"):
        assert value(s1, "sdqkd_kms_stream_requests_total", protocol="ETSI 004 JSON", call=call, code="200") == \
            value(s0, "sdqkd_kms_stream_requests_total", protocol="ETSI 004 JSON", call=call, code="200") + 1
    assert opened["key_stream_id"] not in {v for (_, ls) in s1 for _, v in ls}
