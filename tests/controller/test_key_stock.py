"""The operator's view of key stock, key delivery and the QRNG, end to end: two agents
(A, B: two QKD links A->B and B->A) and a real controller with its gRPC northbound.
GetTopology reports each link's stored keys at both ends (key_bits the smaller), an
application's keys fetched over ETSI 014 show up in ListApplications at both ends, and
node A's QRNG health state (NETCONF <get> of sdqkd-qrng `qrng`) follows a hardware fault
injected through the lab's optical plant, as `sdqkd lab qrng-fail` does it."""
from __future__ import annotations

import threading
import time

import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations.rpc import RPCError

import grpctls
from labnets import ring_topology, start_agents
from test_controller_e2e import active_links, sae_client, wait
from test_northbound import serve
from testlib import run
from sdqkd import yangmodels
from sdqkd.agents.emulation.plant import Plant
from sdqkd.controller import config as controller_config
from sdqkd.controller.controller import Controller
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.pathcomp.optical import OpticalRequest
from sdqkd.lab import plan as lab_plan

RING = ["A", "B"]
QRNG = "urn:sdqkd:yang:sdqkd-qrng"
KS = "urn:sdqkd:yang:sdqkd-key-stock"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"


def topology() -> dict:
    top = ring_topology("stock", RING, **{"link-key-limit": 3000})
    top["sdqkd-lab:lab"]["node"][0]["qrng"] = {"source": "emulated", "rate": "2000000"}
    return top


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stock")
    plan = lab_plan.make(topology(), tmp, free_ports=True)
    procs = start_agents(plan)
    ctl = Controller(controller_config.load(lab_plan.write_controller_config(plan)))
    ctl.start()
    server = channel = None
    try:
        assert ctl.wait_discovered(20)
        server, channel = serve(ctl, grpctls.make(tmp / "pki"))
        yield plan, procs, ctl, pb_grpc.ControllerStub(channel)
    finally:
        if channel is not None:
            channel.close()
            server.stop(grace=1).wait()
        ctl.stop()
        for p in procs.values():
            p.stop()


def test_get_topology_reports_the_stock_at_both_ends(net) -> None:
    plan, _, ctl, stub = net
    ids = {n: np.qkdn_id for n, np in plan.nodes.items()}
    if not ctl.store.channels():  # the ring's two links as direct quantum channels
        for a, b in zip(RING, RING[1:] + RING[:1]):
            ctl.create_channel(OpticalRequest(tx=(ids[a], 1), rx=(ids[b], 2)))
    wait(lambda: len(active_links(ctl)) == 2, what="two ACTIVE links")

    def stocked():
        for c in ctl.conns.values():
            c.refresh()
        links = stub.GetTopology(pb.GetTopologyRequest(), timeout=10).topology.links
        return links if all(len(lk.stock) == 2 and lk.key_bits > 0 for lk in links) else None

    links = wait(stocked, what="key stock at both ends of both links")
    for lk in links:
        assert {st.node for st in lk.stock} == {ids["A"], ids["B"]}
        for st in lk.stock:
            assert st.key_size == 256 and st.stored_bits == 256 * st.stored_keys > 0
            assert 0 < st.local_keys < st.stored_keys and st.limit_keys == 3000
        assert lk.key_bits == min(st.stored_bits for st in lk.stock)


def test_list_applications_reports_delivery_at_both_ends(net) -> None:
    plan, _, ctl, stub = net
    ids = {n: np.qkdn_id for n, np in plan.nodes.items()}
    app = stub.CreateApplication(pb.CreateApplicationRequest(master_sae="sae-a", slave_sae="sae-b"), timeout=20)
    with sae_client(plan, "sae-a") as m, sae_client(plan, "sae-b") as s:
        r = wait(lambda: (lambda r: r if r.status_code == 200 else None)(m.post("/sae-b/enc_keys", json={"number": 3})),
                 what="keys from A's KME")
        keys = r.json()["keys"]
        for k in keys:  # one dec_keys call per key at the slave
            assert s.post("/sae-a/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]}]}).status_code == 200
    for c in ctl.conns.values():
        c.refresh()
    listed = {a.app_id: a for a in stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications}
    by_node = {d.node.name: d for d in listed[app.app_id].delivery}
    assert set(by_node) == {"A", "B"}
    a, b = by_node["A"], by_node["B"]
    assert (a.key_requests, a.keys_delivered, a.bits_delivered) == (1, 3, 768)
    assert (b.key_requests, b.keys_delivered, b.bits_delivered) == (3, 3, 768)
    assert a.node.qkdn_id == ids["A"] and a.rate_window_s == 10
    assert a.rate_bps == pytest.approx(76.8) and b.rate_bps == pytest.approx(76.8)  # 768 bits in the 10-s window
    assert a.HasField("available_keys") and a.available_keys > 0 and a.available_bits == 256 * a.available_keys
    assert a.since.seconds > 0


def qrng_element(m: manager.Manager):
    q = m.get(filter=("subtree", f'<qrng xmlns="{QRNG}"/>')).data.find(f"{{{QRNG}}}qrng")
    assert q is not None
    return q


def qrng_state(m: manager.Manager) -> dict:
    q = qrng_element(m)

    def t(path: str) -> str | None:
        return q.findtext("/".join(f"{{{QRNG}}}{p}" for p in path.split("/")))

    tests = {x.findtext(f"{{{QRNG}}}name"): {c.tag.split("}")[1]: c.text for c in x} for x in q.findall(f"{{{QRNG}}}health-tests/{{{QRNG}}}test")}
    return {"state": t("state"), "since": t("state-since"), "failures": int(t("failures")), "bits": int(t("bits-generated")),
            "samples": int(t("raw-samples-tested")), "tests": tests, "last": t("last-failure/test"),
            "phase": t("last-failure/phase"), "message": t("message"), "passed": t("health-tests/start-up-passed")}


def test_qrng_health_state_follows_an_injected_fault(net, tmp_path, yanglint) -> None:
    plan, procs, ctl, stub = net
    events = ctl.events(stop := threading.Event())
    seen: list = []
    threading.Thread(target=lambda: seen.extend(events), daemon=True).start()  # until stop
    plant = Plant(topology(), plan.dir / "plant.sqlite")
    m = procs["A"].connect(username=plan.username, password=plan.password)
    try:
        before = wait(lambda: (lambda s: s if s["state"] == "ok" else None)(qrng_state(m)), what="QRNG ok")
        assert before["failures"] == 0 and before["last"] is None and before["passed"]
        assert before["tests"]["repetition-count"]["cutoff"] == "51" and before["tests"]["adaptive-proportion"]["window"] == "1024"
        # idle: the device's own sampling keeps its tests running
        wait(lambda: qrng_state(m)["samples"] > before["samples"], what="raw samples tested while idle")

        plant.set_qrng_fault("A", "stuck")
        failed = wait(lambda: (lambda s: s if s["state"] == "failed" else None)(qrng_state(m)), what="QRNG failed")
        assert failed["failures"] == 1 and failed["last"] == "repetition-count"
        assert failed["tests"]["repetition-count"]["failures"] == "1"
        assert int(failed["tests"]["repetition-count"]["last-observed"]) >= 51
        assert "repetition-count test failed" in failed["message"] and failed["passed"] is None
        (tmp_path / "qrng.xml").write_text(etree.tostring(qrng_element(m), encoding="unicode"))  # yanglint agrees
        proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), "-t", "data", str(yangmodels.module_path("sdqkd-qrng")),
                    str(tmp_path / "qrng.xml")])
        assert proc.returncode == 0, proc.stderr
        time.sleep(1.0)  # the start-up retries keep failing: still one failure, not one per retry
        assert qrng_state(m)["failures"] == 1
        # the controller: a qrng-failed event, and the node's qrng_state in GetTopology
        ev = wait(lambda: next((e for e in seen if e.kind == "qrng-failed"), None), what="a qrng-failed event")
        assert ev.data["node"] == "A" and ev.data["test"] == "repetition-count"
        nodes = wait(lambda: (lambda ns: ns if ns["A"] == "failed" else None)(
            {n.name: n.qrng_state for n in stub.GetTopology(pb.GetTopologyRequest(), timeout=10).topology.nodes}),
            what="GetTopology: A's QRNG failed")
        assert nodes["B"] == ""  # no QRNG

        plant.set_qrng_fault("A", None)  # repaired: start-up tests pass on fresh samples
        back = wait(lambda: (lambda s: s if s["state"] == "ok" else None)(qrng_state(m)), what="QRNG ok after repair")
        assert back["failures"] == 1 and back["last"] == "repetition-count" and back["passed"]

        plant.set_qrng_fault("A", "glitch")  # transient: fails, recovers by itself, reported degraded
        flaky = wait(lambda: (lambda s: s if s["state"] == "degraded" else None)(qrng_state(m)), what="QRNG degraded")
        assert flaky["failures"] == 2
    finally:
        stop.set()
        m.close_session()
        plant.set_qrng_fault("A", None)
        plant.close()


def test_key_stock_is_served_and_advertised(net) -> None:
    plan, procs, _, _ = net
    m = procs["B"].connect(username=plan.username, password=plan.password)
    try:
        assert any(c.startswith(f"{KS}?module=sdqkd-key-stock&revision=2026-12-04") for c in m.server_capabilities)
        data = m.get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkd_links/></qkd_node>')).data
        stocks = data.findall(f".//{{{ETSI}}}qkd_link/{{{KS}}}key-stock")
        assert len(stocks) == 2 and all(int(s.findtext(f"{{{KS}}}stored-keys")) >= 0 for s in stocks)
        # no QRNG at B: no qrng container
        assert m.get(filter=("subtree", f'<qrng xmlns="{QRNG}"/>')).data.find(f"{{{QRNG}}}qrng") is None
        with pytest.raises(RPCError):  # state is not configuration
            m.edit_config(target="running", config=f'<config><qrng xmlns="{QRNG}"><state>ok</state></qrng></config>')
    finally:
        m.close_session()
