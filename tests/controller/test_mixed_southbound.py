"""A lab that mixes southbounds: a DV line A - B - C whose middle node the controller manages
over RESTCONF (topology `southbound: restconf`) and its ends over NETCONF. The controller
discovers all three, sets up the links, provisions a key relay A -> C across B and the SAEs
get the same keys at both ends; a transaction the RESTCONF node refuses, or one a NETCONF
node fails after the RESTCONF node has written, leaves no hop half-configured."""
from __future__ import annotations

import uuid

import pytest

from labnets import line_topology, sae_client, start_agents
from testlib import wait_for
from sdqkd.controller import config as controller_config
from sdqkd.controller.controller import Controller
from sdqkd.controller.pathcomp.optical import OpticalRequest
from sdqkd.controller.provisioning import txn
from sdqkd.controller.southbound.agent import AgentConnection
from sdqkd.controller.southbound.ops import AppEdit, LinkEdit, Plan, present
from sdqkd.controller.southbound.restconf import RestconfConnection
from sdqkd.lab import plan as lab_plan

LINE = ["A", "B", "C"]
TOPOLOGY = line_topology("mixed", LINE, southbound={"B": "restconf"}, **{"link-key-limit": 3000})


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    plan = lab_plan.make(TOPOLOGY, tmp, free_ports=True)
    procs = start_agents(plan)
    ctl = None
    try:
        ctl = Controller(controller_config.load(lab_plan.write_controller_config(plan)))
        ctl.start()
        assert ctl.wait_discovered(30), {c.addr.name: c.last_error for c in ctl.conns.values()}
        yield plan, procs, ctl
    finally:
        if ctl is not None:
            ctl.stop()
        for p in procs.values():
            p.stop()


def ids(plan) -> dict[str, str]:
    return {n: np.qkdn_id for n, np in plan.nodes.items()}



def half_configured(ctl: Controller, entries: set[tuple[str, str]]) -> list[str]:
    """The nodes whose running configuration holds any of `entries`, each read over the
    southbound the controller manages it with."""
    return [c.addr.name for c in ctl.conns.values() if c.is_up() and entries & present(c.get_config()).keys()]


def test_the_controller_manages_each_node_over_its_southbound(lab) -> None:
    plan, _, ctl = lab
    kinds = {c.addr.name: type(c) for c in ctl.conns.values()}
    assert kinds == {"A": AgentConnection, "B": RestconfConnection, "C": AgentConnection}
    topo = ctl.topology()
    assert set(topo.nodes) == set(ids(plan).values()) and len(topo.interfaces) == 6


def test_a_relay_across_the_mixed_path_serves_keys(lab) -> None:
    plan, _, ctl = lab
    q = ids(plan)
    for a, b in zip(LINE, LINE[1:]):
        ch = ctl.create_channel(OpticalRequest(tx=(q[a], 1), rx=(q[b], 2)))
        assert ch.fibres == [f"{a}{b}"]

    def active() -> bool:
        for c in ctl.conns.values():
            c.refresh()
        return sum(1 for lk in ctl.topology().links.values() if lk.status == "ACTIVE" and lk.skr > 0) == 2

    wait_for(active, 40, "two ACTIVE links", poll=0.25)
    app = ctl.create_application("sae-a", "sae-c")
    assert app.paths[0]["nodes"] == [q["A"], q["B"], q["C"]]
    # the relay's VIRT link reached the RESTCONF node as it did the NETCONF ones
    for c in ctl.conns.values():
        assert any(k[0] == "link" and v["type"] == "VIRT" for k, v in present(c.get_config()).items()), c.addr.name

    with sae_client(plan, "sae-a") as m, sae_client(plan, "sae-c") as s:
        r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(m.post("/sae-c/enc_keys", json={"number": 2})),
                     30, "keys from A's KME", poll=0.25)
        keys = r.json()["keys"]
        r = s.post("/sae-a/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]})
        assert r.status_code == 200, r.text
        assert r.json()["keys"] == keys


def relay_plan(q: dict[str, str], bad: str | None = None) -> tuple[Plan, set[tuple[str, str]]]:
    """A VIRT link A -> C over B and the applications at its ends (and one on B); the
    application on node `bad` is backed by a link that does not exist there."""
    v, app = str(uuid.uuid4()), str(uuid.uuid4())
    plan = Plan()
    plan.add(q["A"], LinkEdit(v, "VIRT", q["A"], q["C"], next_hops=(q["B"],)))
    plan.add(q["B"], LinkEdit(v, "VIRT", q["B"], q["C"], prev_hop=q["A"], next_hops=(q["C"],)))
    plan.add(q["C"], LinkEdit(v, "VIRT", q["C"], q["A"], prev_hop=q["B"]))
    for n in ("A", "B", "C"):
        backing = str(uuid.uuid4()) if n == bad else v
        plan.add(q[n], AppEdit(app, "sae-x", ("sae-y",), backing=(backing,)))
    return plan, {("link", v), ("app", app)}


def test_the_restconf_node_refusing_rolls_back_the_netconf_nodes(lab) -> None:
    plan, _, ctl = lab
    q = ids(plan)
    p, entries = relay_plan(q, bad="B")
    with pytest.raises(txn.TxnError) as err:
        txn.apply(p, ctl.conns)
    assert err.value.node == "B" and err.value.tag == "invalid-value" and err.value.committed == [], err.value
    assert half_configured(ctl, entries) == []


def test_a_netconf_node_failing_after_the_restconf_node_wrote_restores_it(lab) -> None:
    """C's agent dies between validation and commit: A makes its confirmed commit and B
    (RESTCONF) writes its link and application in that phase (every hop's step runs to its
    end), then B's entries are deleted again (they did not exist before) and A's commit is
    cancelled."""
    plan, procs, ctl = lab
    q = ids(plan)
    p, entries = relay_plan(q)

    def kill_c(phase: str) -> None:
        if phase == "commit":
            procs["C"].kill()

    try:
        with pytest.raises(txn.TxnError) as err:
            txn.apply(p, ctl.conns, before_phase=kill_c)
        assert err.value.node == "C" and err.value.unavailable and err.value.committed == [], err.value
        assert [n for n in half_configured(ctl, entries) if n != "C"] == []
    finally:
        procs["C"].start()
        assert ctl.conns[q["C"]].wait_connected(20)


def test_a_netconf_node_failing_its_confirm_leaves_only_the_confirmed_netconf_hops(lab) -> None:
    """C's agent dies before the confirm phase: A's confirm goes through (committed: the
    controller would reconcile it), B's writes are still undoable and are put back."""
    plan, procs, ctl = lab
    q = ids(plan)
    p, entries = relay_plan(q)

    def kill_c(phase: str) -> None:
        if phase == "confirm":
            procs["C"].kill()

    try:
        with pytest.raises(txn.TxnError) as err:
            txn.apply(p, ctl.conns, before_phase=kill_c)
        assert err.value.node == "C" and err.value.committed == [q["A"]], err.value
        assert [n for n in half_configured(ctl, entries) if n != "C"] == ["A"]
    finally:
        procs["C"].start()
        assert ctl.conns[q["C"]].wait_connected(20)
        undo = Plan()
        for n in LINE:
            for kind, ident in sorted(entries):
                undo.add(q[n], AppEdit(ident, delete=True) if kind == "app" else LinkEdit(ident, "VIRT", "", "", delete=True))
        txn.apply(undo, ctl.conns)
    assert half_configured(ctl, entries) == []


def test_the_restconf_node_lost_and_back_is_reconciled(lab) -> None:
    """The event stream is B's session: when B's agent dies the stream ends and B leaves the
    view at once; when it is back the stream reopens, B is read again and reconciled over
    RESTCONF (an entry the controller owns and no longer wants, left on B while it was
    away from the controller's view, is removed)."""
    plan, procs, ctl = lab
    q = ids(plan)
    b = ctl.conns[q["B"]]
    orphan = str(uuid.uuid4())
    stray = Plan()
    stray.add(q["B"], LinkEdit(orphan, "VIRT", q["B"], q["C"], prev_hop=q["A"], next_hops=(q["C"],)))
    ctl.store.own([(q["B"], "link", orphan)])  # as a transaction does before it pushes
    txn.apply(stray, ctl.conns)
    procs["B"].kill()
    wait_for(lambda: not b.is_up() and not ctl.topology().nodes[q["B"]].up, 10, "B out of the view", poll=0.1)
    procs["B"].start()
    assert b.wait_connected(20), b.last_error
    wait_for(lambda: ("link", orphan) not in present(b.get_config()), 20, "the orphan removed from B", poll=0.2)
    assert ctl.topology().nodes[q["B"]].up
