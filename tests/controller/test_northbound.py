"""The gRPC northbound: a real server on loopback over a real Controller.

`lonely`: a Controller whose agents are configured but unreachable, for the error paths,
the topology views (a snapshot set on the Controller) and reflection. `trio`: three real
agents (tests/agentproc.py), for provisioning that succeeds, events, and the NETCONF
refusals that must reach the client as the right status codes.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import grpctls
from agentproc import PASSWORD, agent_config, free_port
from testlib import run
from sdqkd.controller.config import AgentEntry, ControllerConfig
from sdqkd.controller.controller import Controller, ControllerError
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.northbound import server as northbound
from sdqkd.controller.northbound.servicer import status_for
from sdqkd.controller.topology.model import Node, QkdLink, Topology
from topo_samples import A, B, TAPI, small_channel, small_topology

RPCS = ["CreateApplication", "DeleteApplication", "ListApplications", "ComputePath", "CreateChannel", "ComputeChannel",
        "DeleteChannel", "ListChannels", "GetTopology", "StreamEvents", "ListReservations", "ListAlarms"]


def serve(ctl: Controller, tls: grpctls.Pki) -> tuple[grpc.Server, grpc.Channel]:
    """The northbound with mutual TLS, and a channel presenting the client certificate."""
    port = free_port()
    server = northbound.start(ctl, "127.0.0.1", port, tls.conf(port=port))
    channel = tls.channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=5)
    return server, channel


def code_of(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, timeout=10)
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def lonely(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lonely")
    dead = free_port()  # nothing listens there
    cfg = ControllerConfig(
        agents=[AgentEntry("alice", A, "127.0.0.1", dead, password="x"), AgentEntry("bob", B, "127.0.0.1", dead, password="x")],
        state_dir=str(tmp), saes={"sae-a1": A, "sae-a2": A, "sae-b": B})
    ctl = Controller(cfg)
    ctl.start()
    server, channel = serve(ctl, grpctls.make(tmp / "pki"))
    yield ctl, pb_grpc.ControllerStub(channel), channel
    channel.close()
    server.stop(grace=1).wait()
    ctl.stop()


# --- reflection and the error map -----------------------------------------------------------


def test_reflection_lists_the_service_and_calls_it(lonely) -> None:
    _, _, channel = lonely
    db = ProtoReflectionDescriptorDatabase(channel)
    assert {"sdqkd.v1.Controller", "grpc.reflection.v1alpha.ServerReflection"} <= set(db.get_services())
    service = descriptor_pool.DescriptorPool(db).FindServiceByName("sdqkd.v1.Controller")
    assert [m.name for m in service.methods] == RPCS
    # a call made from the reflected descriptors alone, as grpcurl does (and the README shows)
    method = service.methods_by_name["GetTopology"]
    req, resp = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    call = channel.unary_unary(f"/{service.full_name}/{method.name}", request_serializer=req.SerializeToString,
                               response_deserializer=resp.FromString)
    reflected = call(req(), timeout=5)
    typed = lonely[1].GetTopology(pb.GetTopologyRequest(), timeout=5)
    assert {n.name for n in reflected.topology.nodes} == {"alice", "bob"}
    assert reflected.SerializeToString(deterministic=True) == typed.SerializeToString(deterministic=True)


def test_unknown_sae_is_not_found(lonely) -> None:
    _, stub, _ = lonely
    code, msg = code_of(stub.CreateApplication, pb.CreateApplicationRequest(master_sae="sae-a1", slave_sae="nobody"))
    assert code == grpc.StatusCode.NOT_FOUND and "nobody" in msg


def test_same_node_saes_are_invalid(lonely) -> None:
    _, stub, _ = lonely
    code, _ = code_of(stub.CreateApplication, pb.CreateApplicationRequest(master_sae="sae-a1", slave_sae="sae-a2"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_no_path_is_failed_precondition(lonely) -> None:
    """Both SAEs are known, their nodes' agents are down: no path now."""
    _, stub, _ = lonely
    code, msg = code_of(stub.CreateApplication, pb.CreateApplicationRequest(master_sae="sae-a1", slave_sae="sae-b"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "down" in msg
    code, _ = code_of(stub.ComputePath, pb.ComputePathRequest(src="alice", dst="sae-b"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_requests(lonely) -> None:
    _, stub, _ = lonely
    S = grpc.StatusCode
    assert code_of(stub.ComputePath, pb.ComputePathRequest(src="alice", dst="atlantis"))[0] == S.NOT_FOUND
    assert code_of(stub.ComputePath, pb.ComputePathRequest(src="alice", dst="bob", min_bps=-1))[0] == S.INVALID_ARGUMENT
    assert code_of(stub.CreateChannel, pb.CreateChannelRequest(src="alice"))[0] == S.INVALID_ARGUMENT
    assert code_of(stub.CreateChannel, pb.CreateChannelRequest(src="alice", dst="atlantis"))[0] == S.NOT_FOUND
    assert code_of(stub.DeleteApplication, pb.DeleteApplicationRequest(app_id="nope"))[0] == S.NOT_FOUND
    assert code_of(stub.DeleteChannel, pb.DeleteChannelRequest(chan_id="nope"))[0] == S.NOT_FOUND


@pytest.mark.parametrize("fields, what", [
    ({"app_id": "not-a-uuid"}, "app_id"),
    ({"qos": pb.Qos(min_bps=10, max_bps=5)}, "exceeds"),
    ({"qos": pb.Qos(min_bps=float("nan"))}, "finite"),
    ({"qos": pb.Qos(min_bps=float("inf"))}, "finite"),
    ({"qos": pb.Qos(max_bps=float("-inf"))}, "finite"),
    ({"qos": pb.Qos(min_bps=-1)}, ">= 0"),
    ({"avoid_links": ["no-such-link"]}, "no-such-link"),
    ({"disjoint_from": [pb.Disjointness()]}, "app_id"),
])
def test_create_application_validates_its_input(lonely, fields, what) -> None:
    _, stub, _ = lonely
    code, msg = code_of(stub.CreateApplication, pb.CreateApplicationRequest(master_sae="sae-a1", slave_sae="sae-b", **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and what in msg, msg


def test_valid_input_goes_on_to_path_computation(lonely) -> None:
    """The same request with valid values passes validation (and fails later: no path)."""
    _, stub, _ = lonely
    code, _ = code_of(stub.CreateApplication, pb.CreateApplicationRequest(
        master_sae="sae-a1", slave_sae="sae-b", app_id=str(uuid.uuid4()).upper(), qos=pb.Qos(min_bps=5, max_bps=10)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, msg = code_of(stub.CreateApplication, pb.CreateApplicationRequest(
        master_sae="sae-a1", slave_sae="sae-b", disjoint_from=[pb.Disjointness(app_id=str(uuid.uuid4()))]))
    assert code == grpc.StatusCode.NOT_FOUND and "disjoint_from" in msg
    S = grpc.StatusCode
    assert code_of(stub.ComputePath, pb.ComputePathRequest(src="alice", dst="bob", avoid_links=["nope"]))[0] == S.INVALID_ARGUMENT
    assert code_of(stub.ComputePath, pb.ComputePathRequest(src="alice", dst="bob", min_bps=float("nan")))[0] == S.INVALID_ARGUMENT


def test_provisioning_failure_follows_the_tag(lonely) -> None:
    """A path exists in the view, but the agents cannot be reached: UNAVAILABLE, naming the agent."""
    ctl, stub, _ = lonely
    with ctl.view(small_topology()):
        plan = stub.ComputePath(pb.ComputePathRequest(src="sae-a1", dst="bob"), timeout=10)
        assert [n.name for n in plan.paths[0].nodes] == ["alice", "bob"] and plan.total_bps == 2000
        code, msg = code_of(stub.CreateApplication, pb.CreateApplicationRequest(master_sae="sae-a1", slave_sae="sae-b"))
    assert code == grpc.StatusCode.UNAVAILABLE and "alice" in msg
    assert stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications == []


@pytest.mark.parametrize("kind, message, code", [
    ("invalid", "x", grpc.StatusCode.INVALID_ARGUMENT),
    ("not-found", "x", grpc.StatusCode.NOT_FOUND),
    ("no-path", "x", grpc.StatusCode.FAILED_PRECONDITION),
    ("conflict", "x", grpc.StatusCode.ALREADY_EXISTS),
    ("exhausted", "x", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("failed", "provisioning failed at a: bad (invalid-value)", grpc.StatusCode.INVALID_ARGUMENT),
    ("failed", "provisioning failed at a: gone (data-missing)", grpc.StatusCode.NOT_FOUND),
    ("failed", "provisioning failed at a: locked (lock-denied)", grpc.StatusCode.ABORTED),
    ("failed", "provisioning failed at a: busy (in-use)", grpc.StatusCode.ABORTED),
    ("failed", "provisioning failed at a: full (resource-denied)", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("failed", "provisioning failed at a: oops (operation-failed)", grpc.StatusCode.INTERNAL),
    ("weird", "x", grpc.StatusCode.INTERNAL),
])
def test_error_map(kind, message, code) -> None:
    tag = message.rsplit("(", 1)[-1].rstrip(")") if message.endswith(")") else None
    assert status_for(ControllerError(kind, message, tag)) == code


# --- views ----------------------------------------------------------------------------------------


def test_get_topology_native(lonely) -> None:
    ctl, stub, _ = lonely
    view = stub.GetTopology(pb.GetTopologyRequest(), timeout=10)
    assert view.WhichOneof("view") == "topology"
    assert {(n.name, n.up) for n in view.topology.nodes} == {("alice", False), ("bob", False)}
    with ctl.view(small_topology()):
        t = stub.GetTopology(pb.GetTopologyRequest(format=pb.GetTopologyRequest.NATIVE), timeout=10).topology
    (link,) = t.links
    assert (link.a, link.b, link.status, link.skr, link.qber) == (A, B, "ACTIVE", 2000.0, pytest.approx(0.02))
    assert not link.HasField("channel")
    iface = next(i for i in t.interfaces if (i.node, i.qkdi_id) == (A, 1))
    assert (iface.switch, iface.port, iface.roles, iface.channels[0]) == ("sw-a", 1, ["TRANSMITTER"], 20)
    fibre = next(f for f in t.fibres if f.name == "f-ab")
    assert (fibre.a.switch, fibre.a.port, fibre.loss_db) == ("sw-a", 2, 6.5)
    assert {s.name: s.ports for s in t.switches} == {"sw-a": 4, "sw-b": 4}


def test_get_topology_tapi_and_channels(lonely, refdir, yanglint, tmp_path) -> None:
    ctl, stub, _ = lonely
    topo = small_topology()
    ch = small_channel(topo)
    ctl.store.put_channel(ch)  # as if provisioned earlier
    try:
        with ctl.view(topo):
            text = stub.GetTopology(pb.GetTopologyRequest(format=pb.GetTopologyRequest.TAPI), timeout=30).tapi_context_json
            (listed,) = stub.ListChannels(pb.ListChannelsRequest(), timeout=10).channels
            # its agents are unreachable: the channel leaves the store now, its entries leave each
            # agent when that agent is back (reconciliation: owned, no longer desired)
            stub.DeleteChannel(pb.DeleteChannelRequest(chan_id=ch.chan_id), timeout=10)
            assert not stub.ListChannels(pb.ListChannelsRequest(), timeout=10).channels
            assert ("link", ch.chan_id) in ctl.store.owned(ch.tx[0])
    finally:
        ctl.store.delete_channel(ch.chan_id)
    assert (listed.chan_id, listed.tx.node_name, listed.rx.qkdi_id, listed.channel) == (ch.chan_id, "alice", 1, ch.channel)
    assert [(h.switch, h.port_in, h.port_out) for h in listed.hops] == [tuple(h) for h in ch.hops]
    doc = tmp_path / "context.json"
    doc.write_text(text)
    d = refdir / "tapi"
    res = run([yanglint, "-t", "data", "-p", str(d), *(str(d / f"{m}.yang") for m in TAPI), str(doc)])
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    services = json.loads(text)["tapi-common:context"]["tapi-connectivity:connectivity-context"]["connectivity-service"]
    assert len(services) == 1


# --- with real agents --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trio")
    procs = [agent_config(tmp, n) for n in ("x", "y", "z")]
    for p in procs:
        p.start()
    cfg = ControllerConfig(
        agents=[AgentEntry(p.name, p.qkdn_id, "127.0.0.1", p.port, password=PASSWORD) for p in procs],
        state_dir=str(tmp / "controller"), saes={f"sae-{p.name}": p.qkdn_id for p in procs})
    ctl = Controller(cfg)
    ctl.start()
    try:
        assert ctl.wait_discovered(20)
        server, channel = serve(ctl, grpctls.make(tmp / "pki"))
        yield ctl, pb_grpc.ControllerStub(channel), procs
        channel.close()
        server.stop(grace=1).wait()
    finally:
        ctl.stop()
        for p in procs:
            p.stop()


def chain(procs) -> Topology:
    """x - y - z with ACTIVE PHYS links, as the agents would report them once keys flow."""
    x, y, z = (p.qkdn_id for p in procs)
    return Topology.build(nodes=[Node(p.qkdn_id, p.name) for p in procs],
                          links=[QkdLink(str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/{a}{b}")), a, 1, b, 1, skr=1000.0)
                                 for a, b in ((x, y), (y, z))])


def test_application_round_trip_and_its_event(trio) -> None:
    ctl, stub, procs = trio
    stream = stub.StreamEvents(pb.StreamEventsRequest(kinds=["application-created"]), timeout=30)
    got: list[pb.Event] = []
    reader = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while not ctl.subscriber_count() and time.monotonic() < deadline:  # the server has subscribed
        time.sleep(0.01)
    with ctl.view(chain(procs)):
        app = stub.CreateApplication(pb.CreateApplicationRequest(
            master_sae="sae-x", slave_sae="sae-z", qos=pb.Qos(min_bps=500, ttl=60)), timeout=30)
    assert [n.name for n in app.paths[0].nodes] == ["x", "y", "z"] and app.paths[0].vlink
    assert (app.src.name, app.dst.name, app.state, app.qos.ttl) == ("x", "z", "ACTIVE", 60)
    reader.join(10)
    stream.cancel()
    assert got and got[0].kind == "application-created"
    assert json.loads(got[0].data_json)["app_id"] == app.app_id and got[0].time.seconds > 0
    listed = stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications
    assert [a.app_id for a in listed] == [app.app_id]
    assert code_of(stub.CreateApplication, pb.CreateApplicationRequest(
        master_sae="sae-x", slave_sae="sae-z", app_id=app.app_id))[0] == grpc.StatusCode.ALREADY_EXISTS
    stub.DeleteApplication(pb.DeleteApplicationRequest(app_id=app.app_id), timeout=30)
    assert stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications == []


def test_a_locked_hop_is_aborted(trio) -> None:
    ctl, stub, procs = trio
    other = procs[1].connect()
    try:
        other.lock("running")
        with ctl.view(chain(procs)):
            code, msg = code_of(stub.CreateApplication, pb.CreateApplicationRequest(master_sae="sae-x", slave_sae="sae-z"))
    finally:
        other.unlock("running")
        other.close_session()
    assert code == grpc.StatusCode.ABORTED and "y" in msg


def test_an_agent_refusing_the_edit_is_invalid_argument(trio) -> None:
    """Adjacent x and y: the application is backed by a PHYS link the agents do not have."""
    ctl, stub, procs = trio
    with ctl.view(chain(procs)):
        code, msg = code_of(stub.CreateApplication, pb.CreateApplicationRequest(master_sae="sae-x", slave_sae="sae-y"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "backing" in msg, msg
