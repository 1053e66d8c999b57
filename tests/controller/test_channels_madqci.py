"""Direct CV channels on the MadQCI lab through the gRPC northbound: the dry run, wavelengths,
several channels per fibre through the fixed muxes, same-node refusal, interface choice.

The nine MadQCI agents run for real from lab/topologies/madqci.json (lab/plan.py makes their
configs, as `sdqkd lab up` does), with a real Controller and its northbound over the lab's
mutual TLS; cross-connects go to the emulated switches over NETCONF and the emulated plant
traces the light, so a channel that is set up wrong makes no key.
"""
from __future__ import annotations

import grpc
import pytest

import madqci
from agentproc import AgentProc, free_port
from testlib import wait_for
from sdqkd.controller import config as controller_config
from sdqkd.controller.controller import Controller
from sdqkd.controller.northbound import client as nb_client
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.northbound import server as northbound
from sdqkd.lab import plan as lab_plan
from sdqkd.lab import topology as labfile
from sdqkd.lab.labjson import controller_access

S = grpc.StatusCode
CV_TX = ["Quijote", "Quiron", "Quevedo", "Norte", "Distrito"]
CV_RX = ["Quintin", "Quijote", "Quevedo", "Norte", "Concepcion"]


class Lab:
    def __init__(self, plan, ctl: Controller, stub: pb_grpc.ControllerStub) -> None:
        self.plan, self.ctl, self.stub = plan, ctl, stub

    def tx(self, site: str) -> pb.InterfaceRef:
        return pb.InterfaceRef(node=site, qkdi_id=madqci.cv_tx(site)[1])

    def rx(self, site: str) -> pb.InterfaceRef:
        return pb.InterfaceRef(node=site, qkdi_id=madqci.cv_rx(site)[1])

    def code(self, rpc, request) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            rpc(request, timeout=60)
        return err.value.code(), err.value.details()

    def clear(self) -> None:
        for ch in self.stub.ListChannels(pb.ListChannelsRequest(), timeout=10).channels:
            self.stub.DeleteChannel(pb.DeleteChannelRequest(chan_id=ch.chan_id), timeout=60)

    def cross_connects(self) -> dict[str, tuple]:
        return {n: s.cross_connects for n, s in self.ctl.topology().switches.items()}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    for attempt in range(3):  # free ports are picked at plan time: another process may take one before we bind
        plan = lab_plan.make(labfile.load_valid(madqci.FILE), tmp_path_factory.mktemp("madqci"), free_ports=True)
        procs = {}
        try:
            for n, np in plan.nodes.items():
                procs[n] = AgentProc(n, np.qkdn_id, np.netconf_port, np.config_path, np.dir).start()
            break
        except RuntimeError as exc:
            for p in procs.values():
                p.stop()
            if attempt == 2 or "address already in use" not in str(exc):
                raise
    cfg = controller_config.load(lab_plan.write_controller_config(plan))
    ctl = Controller(cfg)
    ctl.start()
    server = channel = None
    try:
        assert ctl.wait_discovered(60)
        port = free_port()
        server = northbound.start(ctl, "127.0.0.1", port, cfg.grpc)
        tls = controller_access(plan)["tls"]
        channel = nb_client.channel(f"127.0.0.1:{port}", ca=tls["ca"], cert=tls["cert"], key=tls["key"])
        yield Lab(plan, ctl, pb_grpc.ControllerStub(channel))
    finally:
        if channel is not None:
            channel.close()
        if server is not None:
            server.stop(grace=1).wait()
        ctl.stop()
        for p in procs.values():
            p.stop()


@pytest.fixture()
def clean(lab: Lab):
    lab.clear()
    yield lab
    lab.clear()


def test_same_node_pairs_are_refused(clean: Lab) -> None:
    lab = clean
    for rpc in (lab.stub.CreateChannel, lab.stub.ComputeChannel):
        req = pb.CreateChannelRequest if rpc is lab.stub.CreateChannel else pb.ComputeChannelRequest
        code, details = lab.code(rpc, req(tx=lab.tx("Norte"), rx=lab.rx("Norte")))
        assert code == S.INVALID_ARGUMENT and "same node" in details
        assert lab.code(rpc, req(src="Norte", dst="Norte"))[0] == S.INVALID_ARGUMENT
    assert lab.stub.ListChannels(pb.ListChannelsRequest(), timeout=10).channels == []


def test_dry_run_lists_alternatives_and_changes_nothing(clean: Lab) -> None:
    lab = clean
    # the fixed DV link Quevedo:3 -> Norte:3 (lab link quevedo-norte) set up first: its modules are busy
    dv = lab.stub.CreateChannel(pb.CreateChannelRequest(tx=pb.InterfaceRef(node="Quevedo", qkdi_id=3),
                                                        rx=pb.InterfaceRef(node="Norte", qkdi_id=3)), timeout=60)
    assert dv.fibres == ["f-quevedo-norte"] and dv.loss_db == pytest.approx(3.0)
    before = lab.cross_connects()
    plan = lab.stub.ComputeChannel(pb.ComputeChannelRequest(src="Quevedo", dst="Norte"), timeout=30)
    # the free CV pair first, on each mux channel; the busy DV pair (3.0 dB, lower loss) last
    first = plan.options[0]
    assert (first.tx.node_name, first.rx.node_name, first.tx.qkdi_id, first.rx.qkdi_id) == ("Quevedo", "Norte", 11, 12)
    cv = [o for o in plan.options if o.tx.qkdi_id == 11]
    assert [o.channel for o in cv] == [34, 37, 38] and not any(o.busy for o in cv)
    assert all(o.fibres == ["cv-quevedo-norte"] and o.loss_db == pytest.approx(5.1) for o in cv)
    assert [(h.switch, h.port_in) for h in first.hops] == [("sw-quevedo", 1), ("sw-norte", 5)]
    assert 1000 < first.expected_skr < 20000  # the CV profile at 5.1 dB over one span (paper: 8.7-12 kb/s)
    last = plan.options[-1]
    assert last.busy and (last.tx.qkdi_id, last.rx.qkdi_id) == (3, 3) and last.loss_db < first.loss_db
    # a fixed link's modules are calibrated to its measured rate, in the dry run as in the agents
    # (paper: Quevedo-Norte 1.38 kb/s; the uncalibrated Cerberis profile would say 2.6 kb/s at 3 dB)
    assert last.expected_skr == pytest.approx(1380, rel=0.01)
    assert len(lab.stub.ComputeChannel(pb.ComputeChannelRequest(src="Quevedo", dst="Norte", max_alternatives=2),
                                       timeout=30).options) == 2
    assert lab.cross_connects() == before
    assert [c.chan_id for c in lab.stub.ListChannels(pb.ListChannelsRequest(), timeout=10).channels] == [dv.chan_id]
    # and CreateChannel between the nodes takes the free CV pair, not the busy DV one
    ch = lab.stub.CreateChannel(pb.CreateChannelRequest(src="Quevedo", dst="Norte"), timeout=60)
    assert (ch.tx.qkdi_id, ch.rx.qkdi_id, ch.channel) == (11, 12, 34)
    # with the CV pair taken too, only busy modules are left: refused, naming why
    code, details = lab.code(lab.stub.CreateChannel, pb.CreateChannelRequest(src="Quevedo", dst="Norte"))
    assert code == S.FAILED_PRECONDITION and "busy" in details


def test_second_cv_channel_shares_the_fibre_on_another_wavelength(clean: Lab) -> None:
    lab = clean
    first = lab.stub.CreateChannel(pb.CreateChannelRequest(tx=lab.tx("Quevedo"), rx=lab.rx("Norte")), timeout=60)
    assert first.channel == 34 and first.fibres == ["cv-quevedo-norte"]
    second = lab.stub.CreateChannel(pb.CreateChannelRequest(tx=lab.tx("Distrito"), rx=lab.rx("Quevedo")), timeout=60)
    assert second.fibres == ["cv-distrito-norte", "cv-quevedo-norte"] and second.channel == 37
    # contention per wavelength: 34 is taken on cv-quevedo-norte, so asking for it is refused
    lab.stub.DeleteChannel(pb.DeleteChannelRequest(chan_id=second.chan_id), timeout=60)
    code, details = lab.code(lab.stub.CreateChannel, pb.CreateChannelRequest(
        tx=lab.tx("Distrito"), rx=lab.rx("Quevedo"), wavelength=34))
    assert code == S.FAILED_PRECONDITION and "ch 34 already carries a quantum channel on cv-quevedo-norte" in details
    asked = lab.stub.CreateChannel(pb.CreateChannelRequest(tx=lab.tx("Distrito"), rx=lab.rx("Quevedo"), wavelength=38),
                                   timeout=60)
    assert asked.channel == 38
    # both PHYS links come up with key: the plant carried each channel through its own mux ports
    def active() -> set[str]:
        for c in lab.ctl.conns.values():
            c.refresh()
        return {lid for lid, lk in lab.ctl.topology().links.items() if lk.status == "ACTIVE" and lk.skr > 0}
    wait_for(lambda: {first.chan_id, asked.chan_id} <= active(), 60, "both CV channels ACTIVE with key", poll=0.5)


def test_wavelength_off_the_grid_or_not_passed(clean: Lab) -> None:
    lab = clean
    for bad in (0, 97):
        assert lab.code(lab.stub.CreateChannel, pb.CreateChannelRequest(
            tx=lab.tx("Quijote"), rx=lab.rx("Quevedo"), wavelength=bad))[0] == S.INVALID_ARGUMENT
    code, details = lab.code(lab.stub.ComputeChannel, pb.ComputeChannelRequest(
        tx=lab.tx("Quijote"), rx=lab.rx("Quevedo"), wavelength=36))
    assert code == S.FAILED_PRECONDITION and "not passed by fixed muxes" in details


def test_sweep_of_the_5x5_cv_pairs(clean: Lab) -> None:
    """Every CV Tx with every CV Rx, dry run: 18 routes (the 3 same-node pairs refused, 4 over
    the 23 dB budget), each on all three mux channels when the network is idle."""
    lab = clean
    routed, refused, over = [], [], []
    for t in CV_TX:
        for r in CV_RX:
            req = pb.ComputeChannelRequest(tx=lab.tx(t), rx=lab.rx(r))
            try:
                options = lab.stub.ComputeChannel(req, timeout=30).options
                routed.append((t, r, sorted(o.channel for o in options)))
            except grpc.RpcError as err:
                (refused if err.code() == S.INVALID_ARGUMENT else over).append((t, r, err.details()))
    assert len(routed) == 18 and len(refused) == 3 and len(over) == 4
    assert all(chans == [34, 37, 38] for _, _, chans in routed)
    assert all("loss over budget" in why for _, _, why in over)
