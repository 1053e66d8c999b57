"""QoS admission, mutual TLS, changes-only events and alarms on a real lab.

Four real agents on a diamond A-B-C + A-D-C with emulated QKD links (lab/plan.py makes
their configs and the lab PKI, as `sdqkd lab up` does), a real Controller from the lab's
controller config, and its gRPC northbound with the mutual TLS the lab configured; the
client presents the orchestrator certificate the lab issued. Link rates are measured by
the emulated modules, so expectations are fractions of what the controller reports.
"""
from __future__ import annotations

import json
import math
import ssl
import threading
import time
import uuid

import grpc
import httpx
import pytest

from testlib import wait_for
from agentproc import free_port
from labnets import DV_PROFILE, dv_nodes, fibres, start_agents
from sdqkd import pki
from sdqkd.controller import config as controller_config
from sdqkd.controller.controller import Controller
from sdqkd.controller.northbound import client as nb_client
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.northbound import server as northbound
from sdqkd.controller.northbound.servicer import REFUSAL_KEY
from sdqkd.lab import plan as lab_plan
from sdqkd.lab.labjson import controller_access

NODES = ["A", "B", "C", "D"]
EDGES = [("A", "B"), ("B", "C"), ("A", "D"), ("D", "C")]
TOPOLOGY = {"sdqkd-lab:lab": {
    "name": "diamond",
    "profile": [DV_PROFILE],
    "node": dv_nodes(NODES),
    "fibre": fibres(EDGES),
    # every node transmits on interface 1 and receives on 2: A->B->C, D->A, C->D
    "link": [{"name": "l-AB", "endpoints": ["A:1", "B:2"], "path": ["AB"]},
             {"name": "l-BC", "endpoints": ["B:1", "C:2"], "path": ["BC"]},
             {"name": "l-AD", "endpoints": ["D:1", "A:2"], "path": ["AD"]},
             {"name": "l-DC", "endpoints": ["C:1", "D:2"], "path": ["DC"]}],
}}
S = grpc.StatusCode


def wait(pred, timeout: float = 30.0, what: str = "condition"):
    return wait_for(pred, timeout, what, poll=0.2)


class Diamond:
    def __init__(self, plan, procs, ctl: Controller, server: grpc.Server, port: int) -> None:
        self.plan, self.procs, self.ctl, self.server, self.port = plan, procs, ctl, server, port
        self.ids = {n: np.qkdn_id for n, np in plan.nodes.items()}
        access = controller_access(plan)
        access["grpc"] = f"127.0.0.1:{port}"
        self.access = access
        tls = access["tls"]
        self.channel = nb_client.channel(access["grpc"], ca=tls["ca"], cert=tls["cert"], key=tls["key"])
        self.stub = pb_grpc.ControllerStub(self.channel)

    def links(self) -> dict[str, pb.Link]:
        return {lk.qkdl_id: lk for lk in self.stub.GetTopology(pb.GetTopologyRequest(), timeout=10).topology.links}

    def delete_all(self) -> None:
        for app in self.stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications:
            self.stub.DeleteApplication(pb.DeleteApplicationRequest(app_id=app.app_id), timeout=30)


@pytest.fixture(scope="module")
def diamond(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diamond")
    plan = lab_plan.make(TOPOLOGY, tmp, free_ports=True)
    procs = start_agents(plan)
    cfg = controller_config.load(lab_plan.write_controller_config(plan))
    port = free_port()
    ctl = Controller(cfg)
    ctl.start()
    server = None
    try:
        assert ctl.wait_discovered(20)
        server = northbound.start(ctl, "127.0.0.1", port, cfg.grpc)  # what daemon.serve does, TLS from the lab
        d = Diamond(plan, procs, ctl, server, port)
        for name in ("l-AB", "l-BC", "l-AD", "l-DC"):
            (an, ai), (bn, bi) = (ep.split(":") for ep in next(lk for lk in TOPOLOGY["sdqkd-lab:lab"]["link"]
                                                                if lk["name"] == name)["endpoints"])
            d.stub.CreateChannel(pb.CreateChannelRequest(tx=pb.InterfaceRef(node=an, qkdi_id=int(ai)),
                                                         rx=pb.InterfaceRef(node=bn, qkdi_id=int(bi))), timeout=60)
        wait(lambda: sum(1 for lk in d.links().values() if lk.status == "ACTIVE" and lk.skr > 0) == 4,
             what="four ACTIVE links")
        yield d
        d.channel.close()
    finally:
        if server is not None:
            server.stop(grace=1).wait()
        ctl.stop()
        for p in procs.values():
            p.stop()


def refusal(err: grpc.RpcError) -> pb.AdmissionRefusal:
    (raw,) = [v for k, v in (err.trailing_metadata() or ()) if k == REFUSAL_KEY]
    return pb.AdmissionRefusal.FromString(raw)


def create(d: Diamond, min_bps: float, **kw) -> pb.Application:
    return d.stub.CreateApplication(pb.CreateApplicationRequest(
        master_sae="sae-a", slave_sae="sae-c", app_id=str(uuid.uuid4()), qos=pb.Qos(min_bps=min_bps), **kw), timeout=60)


# --- admission ----------------------------------------------------------------------------------


def test_only_what_fits_is_admitted_and_the_refusal_offers_the_best(diamond) -> None:
    """Three applications each asking 60% of what A->C can carry: the first is admitted
    (over both sides of the diamond), the other two are refused with the ~40% left."""
    d = diamond
    plan = d.stub.ComputePath(pb.ComputePathRequest(src="A", dst="C"), timeout=10)
    maxflow = plan.maxflow_bps
    assert maxflow > 0
    ask = 0.6 * maxflow
    first = create(d, ask)
    assert first.state == "ACTIVE" and math.isclose(sum(p.reserved_bps for p in first.paths), ask, rel_tol=1e-6)
    refused = []
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            create(d, ask)
        assert err.value.code() == S.RESOURCE_EXHAUSTED, err.value.details()
        assert "does not fit" in err.value.details()
        refused.append(refusal(err.value))
    for r in refused:
        assert r.requested_bps == pytest.approx(ask)
        # what is left is about 40% of the bound (the rates are measured, and move a little)
        assert 0.2 * maxflow < r.best_bps < ask and 0.2 * maxflow < r.maxflow_bps < ask
        assert r.unreserved_maxflow_bps > ask and r.best_paths
    listed = d.stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications
    assert [a.app_id for a in listed] == [first.app_id]
    # what the refusal offered is admitted when asked for
    second = create(d, 0.7 * refused[-1].best_bps)
    assert second.state == "ACTIVE"
    # every link holds what the two applications' paths put on it, and no more than its rate
    res = d.stub.ListReservations(pb.ListReservationsRequest(), timeout=10).links
    held = {r.qkdl_id: r for r in res}
    for app in (first, second):
        for p in app.paths:
            for lid in p.links:
                assert app.app_id in {x.app_id for x in held[lid].reservations}
    total = sum(x.bps for r in res for x in r.reservations if x.app_id == first.app_id)
    assert total == pytest.approx(ask * 2, rel=1e-6)  # every path spans two links
    for r in res:
        assert r.reserved_bps == pytest.approx(sum(x.bps for x in r.reservations))
        assert r.available_bps == pytest.approx(max(0.0, r.capacity_bps - r.reserved_bps))
    d.delete_all()
    assert all(not r.reservations for r in d.stub.ListReservations(pb.ListReservationsRequest(), timeout=10).links)


def test_three_applications_over_one_small_link(diamond) -> None:
    """The issue's case: three applications each asking ~90% of one link (paths pinned to
    A-B-C by avoiding D's links). Before admission control all three were admitted."""
    d = diamond
    links = d.links()
    d_side = [lid for lid, lk in links.items() if d.ids["D"] in (lk.a, lk.b)]
    b_side = [lid for lid in links if lid not in d_side]
    cap = min(links[lid].skr for lid in b_side)
    ask = 0.9 * cap
    codes = []
    for _ in range(3):
        try:
            app = create(d, ask, avoid_links=d_side)
            codes.append(S.OK)
            assert [n.name for n in app.paths[0].nodes] == ["A", "B", "C"]
        except grpc.RpcError as exc:
            codes.append(exc.code())
            offer = refusal(exc)
            assert 0 <= offer.best_bps < 0.4 * cap and offer.unreserved_maxflow_bps == pytest.approx(cap, rel=0.3)
    try:
        assert codes == [S.OK, S.RESOURCE_EXHAUSTED, S.RESOURCE_EXHAUSTED]
        held = {r.qkdl_id: r for r in d.stub.ListReservations(pb.ListReservationsRequest(links=b_side), timeout=10).links}
        assert set(held) == set(b_side)
        for lid in b_side:
            assert held[lid].reserved_bps == pytest.approx(ask) and len(held[lid].reservations) == 1
    finally:
        d.delete_all()


def test_multipath_when_one_path_is_not_enough_and_virt_bandwidth_is_the_reservation(diamond) -> None:
    d = diamond
    links = d.links()
    sides = [min(links[lid].skr for lid in side) for side in
             ([lk.qkdl_id for lk in links.values() if {lk.a, lk.b} in ({d.ids["A"], d.ids["B"]}, {d.ids["B"], d.ids["C"]})],
              [lk.qkdl_id for lk in links.values() if {lk.a, lk.b} in ({d.ids["A"], d.ids["D"]}, {d.ids["D"], d.ids["C"]})])]
    ask = 1.3 * max(sides)  # more than either side, less than both
    assert ask < 0.95 * sum(sides)
    app = create(d, ask)
    try:
        assert len(app.paths) == 2 and {p.nodes[1].name for p in app.paths} == {"B", "D"}
        assert sum(p.reserved_bps for p in app.paths) == pytest.approx(ask)
        # the VIRT link each path got carries its reservation as virt_bandwidth, on every hop
        for p in app.paths:
            for node in p.nodes:
                m = d.procs[node.name].connect(password=d.plan.password)
                try:
                    xml = m.get_config("running").data_xml
                finally:
                    m.close_session()
                assert p.vlink in xml
                assert f"<virt_bandwidth>{math.ceil(p.reserved_bps)}</virt_bandwidth>" in xml
    finally:
        d.delete_all()


def test_disjoint_from_another_application(diamond) -> None:
    d = diamond
    first = create(d, 0)
    try:
        (p,) = first.paths
        via = p.nodes[1].name
        other = "D" if via == "B" else "B"
        node_disjoint = create(d, 0, disjoint_from=[pb.Disjointness(app_id=first.app_id, mode=pb.Disjointness.NODE)])
        assert [n.name for n in node_disjoint.paths[0].nodes] == ["A", other, "C"]
        link_disjoint = create(d, 0, disjoint_from=[pb.Disjointness(app_id=first.app_id, mode=pb.Disjointness.LINK)])
        assert not set(link_disjoint.paths[0].links) & set(p.links)
        # disjoint from both sides: nothing left
        with pytest.raises(grpc.RpcError) as err:
            create(d, 0, disjoint_from=[pb.Disjointness(app_id=first.app_id), pb.Disjointness(app_id=node_disjoint.app_id)])
        assert err.value.code() == S.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            create(d, 0, disjoint_from=[pb.Disjointness(app_id=str(uuid.uuid4()))])
        assert err.value.code() == S.NOT_FOUND
    finally:
        d.delete_all()


def test_etsi004_open_connect_qos_drives_the_application(diamond) -> None:
    """An SAE opens an ETSI 004 stream with QoS to a peer no application covers: its node
    asks the controller (sdqkdn_application_new with app_qos), and the application the
    controller makes has that min/max bps, TTL and priority, with min_bps reserved."""
    d = diamond
    node_b = d.plan.nodes["B"]
    ctx = ssl.create_default_context(cafile=str(d.plan.ca[0]))
    ctx.load_cert_chain(*(str(p) for p in node_b.sae_certs["sae-b"]))
    qos = {"key_chunk_size": 32, "min_bps": 40, "max_bps": 400, "ttl": 77, "priority": 2}
    try:
        with httpx.Client(verify=ctx, timeout=20, base_url=f"https://127.0.0.1:{node_b.kms_port}/api") as b:
            r = b.post("/open_connect", json={"source": "sae-b", "destination": "sae-d", "qos": qos})
            assert r.status_code == 200, r.text
            ksid = r.json()["key_stream_id"]

            def made():
                b.get("/get_key", params={"key_stream_id": ksid})  # the first asks the controller
                return [a for a in d.stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications
                        if (a.master_sae, a.slave_sae) == ("sae-b", "sae-d")]

            (app,) = wait(made, what="the application the agent asked for")
        assert (app.qos.min_bps, app.qos.max_bps, app.qos.ttl, app.qos.priority) == (40, 400, 77, 2)
        assert sum(p.reserved_bps for p in app.paths) == pytest.approx(40)
    finally:
        d.delete_all()


# --- mutual TLS -------------------------------------------------------------------------------------


def _call(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        pb_grpc.ControllerStub(channel).ListAlarms(pb.ListAlarmsRequest(), timeout=5)
        return S.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def test_mutual_tls_refuses_clients_without_the_labs_certificate(diamond, tmp_path) -> None:
    d = diamond
    target, tls = d.access["grpc"], d.access["tls"]
    ca = open(tls["ca"], "rb").read()
    other = pki.make_ca(tmp_path / "other", "not the lab CA")
    stranger = pki.issue(other, "sdqkd-orchestrator", tmp_path / "stranger", client=True)
    # no client certificate at all
    assert _call(grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))) == S.UNAVAILABLE
    # a client certificate from another CA
    assert _call(nb_client.channel(target, ca=tls["ca"], cert=stranger[0], key=stranger[1])) == S.UNAVAILABLE
    # plaintext
    assert _call(grpc.insecure_channel(target)) == S.UNAVAILABLE
    # the lab's orchestrator certificate
    assert _call(nb_client.channel(target, ca=tls["ca"], cert=tls["cert"], key=tls["key"])) == S.OK


def test_plaintext_only_when_the_config_says_insecure(diamond) -> None:
    d = diamond
    data = json.loads((d.plan.dir / "controller.json").read_text())
    data["grpc"] = {"address": "127.0.0.1", "port": 1}
    with pytest.raises(controller_config.ConfigError) as err:
        controller_config.parse(data)
    assert "insecure" in str(err.value)
    data["grpc"]["insecure"] = True
    cfg = controller_config.parse(data)
    port = free_port()
    server = northbound.start(d.ctl, "127.0.0.1", port, cfg.grpc)
    try:
        assert _call(grpc.insecure_channel(f"127.0.0.1:{port}")) == S.OK
    finally:
        server.stop(grace=1).wait()


# --- events and alarms ---------------------------------------------------------------------------


def test_stream_events_on_an_idle_lab_sends_no_repeats(diamond) -> None:
    """The agents are re-read several times a second (every QKD performance update), and
    each re-read used to stream a node-synced event; with nothing changing, none repeats."""
    d = diamond
    time.sleep(3.0)  # what the tests before changed has been re-read and streamed
    got: list[pb.Event] = []
    stream = d.stub.StreamEvents(pb.StreamEventsRequest(), timeout=30)

    def read() -> None:
        try:
            for ev in stream:
                got.append(ev)
        except grpc.RpcError:
            pass  # cancelled

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait(lambda: d.ctl.subscriber_count() > 0, 5, "the subscription")
    seen = {q: c.data for q, c in d.ctl.conns.items()}
    rereads = 0
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        for q, c in d.ctl.conns.items():
            if c.data is not seen[q]:
                rereads += 1
                seen[q] = c.data
        time.sleep(0.02)
    stream.cancel()
    reader.join(5)
    assert rereads >= 3, rereads  # the controller did re-read the agents meanwhile
    contents = [(ev.kind, ev.data_json) for ev in got]
    assert len(contents) == len(set(contents)), contents


def test_alarms_follow_a_killed_agent(diamond) -> None:
    d = diamond
    assert not [a for a in d.stub.ListAlarms(pb.ListAlarmsRequest(), timeout=10).alarms if a.kind == "node-disconnected"]
    proc = d.procs["D"]
    killed = time.time()
    proc.proc.kill()  # SIGKILL
    proc.proc.wait(10)
    try:
        def raised():
            return [a for a in d.stub.ListAlarms(pb.ListAlarmsRequest(), timeout=10).alarms
                    if (a.kind, a.resource) == ("node-disconnected", d.ids["D"])]

        (alarm,) = wait(raised, what="an alarm for D")
        assert alarm.severity == pb.Alarm.CRITICAL and "D" in alarm.text
        assert killed - 1 <= alarm.since.ToNanoseconds() / 1e9 <= time.time()
        alarms = d.stub.ListAlarms(pb.ListAlarmsRequest(), timeout=10).alarms
        assert alarms[0].severity == pb.Alarm.CRITICAL  # most severe first
        again = [a for a in alarms if (a.kind, a.resource) == ("node-disconnected", d.ids["D"])]
        assert again[0].since == alarm.since  # the same condition keeps its since
    finally:
        proc.start()
    wait(lambda: not [a for a in d.stub.ListAlarms(pb.ListAlarmsRequest(), timeout=10).alarms
                      if a.kind == "node-disconnected"], what="D's alarm cleared")


def test_alarms_follow_a_cut_fibre(diamond) -> None:
    """A cut fibre takes its QKD link down: a link-down alarm (MAJOR) while it is cut, and
    none once it is spliced and the link is ACTIVE again."""
    from sdqkd.agents.emulation.plant import Plant

    d = diamond
    ab = next(lid for lid, lk in d.links().items() if {lk.a, lk.b} == {d.ids["A"], d.ids["B"]})
    plant = Plant(TOPOLOGY, d.plan.dir / "plant.sqlite")
    cut = time.time()
    plant.cut_fibre("AB")
    try:
        def raised():
            return [a for a in d.stub.ListAlarms(pb.ListAlarmsRequest(), timeout=10).alarms
                    if (a.kind, a.resource) == ("link-down", ab)]

        (alarm,) = wait(raised, what="a link-down alarm")
        assert alarm.severity == pb.Alarm.MAJOR and "A-B" in alarm.text
        assert cut - 1 <= alarm.since.ToNanoseconds() / 1e9 <= time.time()
    finally:
        plant.cut_fibre("AB", cut=False)
        plant.close()
    wait(lambda: d.links()[ab].status == "ACTIVE" and not raised(), timeout=60, what="the link back and its alarm cleared")
