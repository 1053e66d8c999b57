"""The controller keeps the network in its desired state, against real agents that are
killed (kill -9) and restarted, a real controller and its gRPC northbound.

Five agents on a ring A-B-C-D-E-A, its links made by the controller as direct quantum
channels; an application A -> C goes A-B-C (two hops) and can go around, A-E-D-C (three).
- a transit agent (B) dies in each phase of CreateApplication's transaction: the call
  answers UNAVAILABLE naming B, the surviving hops keep nothing and hold no lock, and a
  retry (over A-E-D-C) works; B restarted empty gets its links back from the controller;
- reconciliation removes an entry the controller owns and no longer wants, and leaves an
  entry another manager wrote;
- a dead transit node's application is rerouted, DEGRADED when nothing is left, ACTIVE
  again when a node returns, and moved back to the better path after the hold-down, make
  before break: keys are served all through the move back.
"""
from __future__ import annotations

import ssl
import sys
import threading
import time
import traceback

import grpc
import httpx
import pytest

from testlib import wait_for
from agentproc import AgentProc, free_port
from labnets import ring_topology, start_agents
from sdqkd.controller import config as controller_config
from sdqkd.controller.controller import Controller
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.northbound import server as northbound
from sdqkd.controller.pathcomp.optical import OpticalRequest
from sdqkd.controller.provisioning import reconcile, txn
from sdqkd.controller.southbound.ops import AppEdit, CrossConnectEdit, LinkEdit, config_element, present
from sdqkd.lab import plan as lab_plan

RING = ["A", "B", "C", "D", "E"]
HOLD_DOWN = 2.0
TOPOLOGY = ring_topology("pentagon", RING, **{"link-key-limit": 3000})
SHORT, DETOUR = ["A", "B", "C"], ["A", "E", "D", "C"]


def wait(pred, timeout: float = 20.0, what: str = "condition"):
    return wait_for(pred, timeout, what, poll=0.1, explain=lambda: f"the controller's threads:\n{_stacks()}")


def _stacks() -> str:
    """Where the controller's own threads are (what a wait that timed out was waiting for)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- {names[i]}\n{''.join(traceback.format_stack(f)[-6:])}" for i, f in sys._current_frames().items()
                     if names.get(i, "").startswith(("controller-", "agent-", "txn")))


class Net:
    def __init__(self, plan, procs: dict[str, AgentProc], ctl: Controller, stub: pb_grpc.ControllerStub) -> None:
        self.plan, self.procs, self.ctl, self.stub = plan, procs, ctl, stub
        self.ids = {n: np.qkdn_id for n, np in plan.nodes.items()}
        self.names = {v: k for k, v in self.ids.items()}

    def connect(self, name: str):  # noqa: ANN201 - an ncclient Manager
        """A session of its own on one agent, as another manager (an operator, an ONOS) has."""
        return self.procs[name].connect(username=self.plan.username, password=self.plan.password)

    def path_names(self, app_id: str) -> list[str] | None:
        app = self.ctl.store.app(app_id)
        return None if app is None else [self.names[n] for n in app.paths[0]["nodes"]]

    def running(self, name: str) -> dict:
        """The agent's running configuration by entry, read over a session of its own."""
        m = self.connect(name)
        try:
            return present(m.get_config(source="running").data)
        finally:
            m.close_session()

    def channel_links(self, name: str) -> set[tuple[str, str]]:
        return {("link", ch.chan_id) for ch in self.ctl.store.channels() if self.ids[name] in (ch.tx[0], ch.rx[0])}

    def assert_clean(self, name: str) -> None:
        """No entry but its channels' PHYS links, and no lock held (locks granted to another session)."""
        assert set(self.running(name)) == self.channel_links(name), name
        m = self.connect(name)
        try:
            for t in ("running", "candidate"):
                m.lock(t)
            for t in ("candidate", "running"):
                m.unlock(t)
        finally:
            m.close_session()

    def ring_up(self, timeout: float = 25.0) -> None:
        """Every ring hop in the controller's relay graph (links ACTIVE with key)."""
        def up() -> bool:
            g = self.ctl.topology().relay_graph()
            return all(g.has_edge(self.ids[a], self.ids[b]) for a, b in zip(RING, RING[1:] + RING[:1]))
        wait(up, timeout, "every ring link ACTIVE")

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.proc.kill()  # SIGKILL: no goodbye on its sessions
        p.proc.wait(5)

    def restart(self, name: str) -> None:
        """Start a killed agent; it comes back with an empty running datastore (or its own, once
        agents persist it): either way the controller restores its entries."""
        t0 = time.monotonic()
        self.procs[name].start()
        want = self.channel_links(name)
        wait(lambda: want <= set(self.running(name)), 15, f"{name}'s links restored by the controller")
        print(f"\nmeasured: {name} restarted empty, its links restored {time.monotonic() - t0:.2f} s after the start")

    def sae(self, sae: str) -> httpx.Client:
        node = next(n for n in self.plan.nodes.values() if sae in n.saes)
        ctx = ssl.create_default_context(cafile=str(self.plan.ca[0]))
        ctx.load_cert_chain(*(str(p) for p in node.sae_certs[sae]))
        return httpx.Client(verify=ctx, timeout=10, base_url=f"https://127.0.0.1:{node.kms_port}/api/v1/keys")

    def keys_flow(self) -> None:
        """One key from A's KME, the same key from C's."""
        with self.sae("sae-a") as m, self.sae("sae-c") as s:
            r = wait(lambda: (lambda r: r if r.status_code == 200 else None)(m.post("/sae-c/enc_keys", json={"number": 1})),
                     15, "a key from A's KME")
            keys = r.json()["keys"]
            r = s.post("/sae-a/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]})
            assert r.status_code == 200 and r.json()["keys"] == keys, r.text


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pentagon")
    plan = lab_plan.make(TOPOLOGY, tmp, free_ports=True)
    procs = start_agents(plan)
    cfg = controller_config.load(lab_plan.write_controller_config(plan))
    cfg.heal_interval, cfg.hold_down, cfg.reconcile_interval, cfg.confirm_timeout = 0.5, HOLD_DOWN, 4.0, 20
    ctl = Controller(cfg)
    ctl.start()
    port = free_port()
    server = northbound.start(ctl, "127.0.0.1", port)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        assert ctl.wait_discovered(20)
        n = Net(plan, procs, ctl, pb_grpc.ControllerStub(channel))
        for a, b in zip(RING, RING[1:] + RING[:1]):
            ctl.create_channel(OpticalRequest(tx=(n.ids[a], 1), rx=(n.ids[b], 2)))
        n.ring_up()
        yield n
    finally:
        channel.close()
        server.stop(grace=1).wait()
        ctl.stop()
        for p in procs.values():
            p.stop()


def create(n: Net) -> pb.Application:
    return n.stub.CreateApplication(pb.CreateApplicationRequest(master_sae="sae-a", slave_sae="sae-c"), timeout=30)


@pytest.mark.parametrize("phase", txn.PHASES)
def test_transit_agent_killed_mid_create_leaves_nothing_and_a_retry_works(net: Net, phase: str) -> None:
    n = net
    n.ring_up()
    assert [n.names[x] for x in n.ctl.compute_relay(n.ids["A"], n.ids["C"]).paths[0].nodes] == SHORT

    def kill_b(p: str) -> None:
        if p == phase:
            n.kill("B")

    n.ctl.txn_hook = kill_b
    t0 = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as err:
            create(n)
    finally:
        n.ctl.txn_hook = None
    failed_in = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
    assert "failed at B:" in err.value.details() and "unreachable" in err.value.details(), err.value.details()
    for name in ("A", "C"):  # nothing half-configured, no lock held, no confirmed commit left pending
        n.assert_clean(name)
    assert not n.stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications

    t0 = time.monotonic()
    app = create(n)  # the retry goes around the dead node, at once
    assert [n.names[x.qkdn_id] for x in app.paths[0].nodes] == DETOUR, app
    print(f"\nmeasured: B killed before {phase}: UNAVAILABLE in {failed_in:.2f} s, "
          f"the retry around B succeeded in {time.monotonic() - t0:.2f} s")
    n.stub.DeleteApplication(pb.DeleteApplicationRequest(app_id=app.app_id), timeout=10)
    for name in ("A", "C", "D", "E"):
        n.assert_clean(name)
    n.restart("B")  # empty: its two PHYS links come back from the controller's store
    n.ring_up()
    n.assert_clean("B")


def test_reconciliation_removes_owned_orphans_and_leaves_other_managers_entries(net: Net) -> None:
    """An owned entry no service wants (as if the controller died between pushing it and
    recording its service) goes at the next periodic pass; one written by another manager
    over raw NETCONF, with an id the controller never made, stays."""
    n = net
    a, c, b = n.ids["A"], n.ids["C"], n.ids["B"]
    orphan, foreign = "0bad0000-0000-4000-8000-00000000000a", "f0e19e00-0000-4000-8000-00000000000b"
    # As the controller pushes: under its provisioning lock, ownership recorded first (else a
    # periodic pass in between would find the entry owned, absent and unwanted, and forget it)
    with n.ctl._intent:
        n.ctl.store.own([(a, "link", orphan)])
        m = n.connect("A")
        try:
            for lid in (orphan, foreign):
                m.edit_config(target="candidate", config=config_element([LinkEdit(lid, "VIRT", a, c, next_hops=(b,))]))
            m.commit()
        finally:
            m.close_session()
        assert {("link", orphan), ("link", foreign)} <= set(n.running("A"))
    wait(lambda: ("link", orphan) not in n.running("A"), 15, "the orphan removed by the periodic reconciliation")
    assert ("link", foreign) in n.running("A")
    assert n.ctl.reconcile(a) == 0  # nothing more to do: the foreign entry is not the controller's
    assert ("link", foreign) in n.running("A") and ("link", orphan) not in n.ctl.store.owned(a)
    m = n.connect("A")
    try:
        m.edit_config(target="candidate", config=config_element([LinkEdit(foreign, "VIRT", a, a, delete=True)]))
        m.commit()
    finally:
        m.close_session()


def test_dead_transit_rerouted_degraded_restored_and_moved_back_make_before_break(net: Net) -> None:
    n = net
    n.ring_up()
    app_id = create(n).app_id
    try:
        assert n.path_names(app_id) == SHORT
        n.keys_flow()
        first_vlink = n.ctl.store.app(app_id).paths[0]["vlink"]

        n.kill("B")  # the transit dies: the application goes around at once
        t0 = time.monotonic()
        wait(lambda: n.path_names(app_id) == DETOUR, 10, "the application rerouted around B")
        rerouted_in = time.monotonic() - t0
        assert rerouted_in < 5, rerouted_in
        assert n.ctl.store.app(app_id).state == "ACTIVE"
        assert ("link", first_vlink) not in n.running("A") and ("link", first_vlink) not in n.running("C")
        n.keys_flow()

        n.kill("D")  # and nothing is left: DEGRADED, listed so
        def state() -> str:
            (a,) = n.stub.ListApplications(pb.ListApplicationsRequest(), timeout=10).applications
            return a.state
        wait(lambda: state() == "DEGRADED", 10, "the application DEGRADED")
        assert n.path_names(app_id) == DETOUR  # kept as it was: keys flow again when the path is back

        n.restart("D")  # back empty: the controller gives it the application's VIRT link too, and
        # with its path back the application is ACTIVE again, where it was
        detour_vlink = n.ctl.store.app(app_id).paths[0]["vlink"]
        wait(lambda: ("link", detour_vlink) in n.running("D"), 10, "D's VIRT link restored")
        wait(lambda: state() == "ACTIVE", 20, "DEGRADED cleared")
        assert n.path_names(app_id) == DETOUR
        n.keys_flow()

        # B returns: once its links are ACTIVE and the shorter path has stayed so for the
        # hold-down, the application moves back; keys are asked for all the while
        failures: list[str] = []
        served = 0
        stop = threading.Event()

        def ask() -> None:
            nonlocal served
            with n.sae("sae-a") as m, n.sae("sae-c") as s:
                while not stop.is_set():
                    r = m.post("/sae-c/enc_keys", json={"number": 1})
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        ids = [{"key_ID": k["key_ID"]} for k in r.json()["keys"]]
                        d = s.post("/sae-a/dec_keys", json={"key_IDs": ids})
                        if d.status_code != 200:
                            failures.append(d.text)
                        served += 1
                    time.sleep(0.05)

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            n.restart("B")
            n.ring_up()
            back_at = time.monotonic()
            wait(lambda: n.path_names(app_id) == SHORT, 15, "the application back on A-B-C")
            moved_after = time.monotonic() - back_at
            time.sleep(0.5)
        finally:
            stop.set()
            asker.join(15)
        assert moved_after >= HOLD_DOWN - 1.0, moved_after  # not at the first sight of the path
        assert served > 10 and not failures, (served, failures[:3])
        print(f"\nmeasured: rerouted around a dead transit {rerouted_in:.2f} s after kill -9; back on the shorter path "
              f"{moved_after:.2f} s after its links were ACTIVE (hold-down {HOLD_DOWN} s); {served} key pairs served during it, "
              f"none failed")
        detour = [p for p in n.ctl.store.app(app_id).paths]
        assert n.ctl.store.app(app_id).state == "ACTIVE" and len(detour) == 1
        for name in ("E", "D"):  # the detour's VIRT links are gone (broken last)
            assert {k for k in n.running(name) if k[0] == "link"} == n.channel_links(name), name
        n.keys_flow()
    finally:
        for name, p in n.procs.items():
            if p.proc is None or p.proc.poll() is not None:
                n.restart(name)
        n.stub.DeleteApplication(pb.DeleteApplicationRequest(app_id=app_id), timeout=10)


def test_reconcile_diff_pushes_missing_removes_owned_orphans_only() -> None:
    """The pure decision, on tables: desired x found x owned."""
    app = AppEdit("a1", "sae-x", ("sae-y",), backing=("v1",))
    vl = LinkEdit("v1", "VIRT", "n1", "n3", next_hops=("n2",))
    xc = CrossConnectEdit("sw", 1, 2)
    found_ok = {("app", "a1"): {"backing": ["v1"], "server": "sae-x", "clients": ["sae-y"]}, ("link", "v1"): {"type": "VIRT"},
                ("xc", "sw/1"): {"port-b": 2}}
    assert not reconcile.diff([app, vl, xc], found_ok, {("app", "a1"), ("link", "v1"), ("xc", "sw/1")})
    d = reconcile.diff([app, vl, xc], {}, set())  # an agent back empty: everything, what others refer to first
    assert [e.key for e in d.edits] == [("xc", "sw/1"), ("link", "v1"), ("app", "a1")]
    moved = {**found_ok, ("app", "a1"): {"backing": ["v9"], "server": "sae-x", "clients": ["sae-y"]}, ("xc", "sw/1"): {"port-b": 3}}
    assert [e.key for e in reconcile.diff([app, vl, xc], moved, set()).push] == [("app", "a1"), ("xc", "sw/1")]
    others = {**found_ok, ("link", "v9"): {"type": "VIRT"}, ("link", "op"): {"type": "PHYS"}, ("app", "theirs"): {}}
    d = reconcile.diff([app, vl, xc], others, {("link", "v9"), ("link", "gone"), ("app", "a1")})
    assert d.remove == [("link", "v9")] and d.forget == [("link", "gone")] and not d.push
    assert [(type(e).__name__, e.key, e.delete) for e in d.edits] == [("LinkEdit", ("link", "v9"), True)]
