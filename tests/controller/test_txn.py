"""Provisioning transactions against three real agents: all hops change or none."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from lxml import etree

from agentproc import PASSWORD, agent_config
from sdqkd.controller.provisioning import txn
from sdqkd.controller.southbound.agent import AgentAddress, AgentConnection
from sdqkd.controller.southbound.ops import AppEdit, CrossConnectEdit, LinkEdit, Plan

ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
V = "dddddddd-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trio")
    procs = [agent_config(tmp, n).start() for n in ("x", "y", "z")]
    conns = {}
    for p in procs:
        c = AgentConnection(AgentAddress(p.name, p.qkdn_id, "127.0.0.1", p.port, "admin", PASSWORD), lambda c: None, lambda c, n: None)
        c.start()
        assert c.wait_connected(15)
        conns[p.qkdn_id] = c
    yield procs, conns
    for c in conns.values():
        c.stop()
    for p in procs:
        p.stop()


def virt_plan(procs, bad_last: bool = False) -> Plan:
    x, y, z = procs
    plan = Plan()
    plan.add(x.qkdn_id, LinkEdit(V, "VIRT", x.qkdn_id, z.qkdn_id, next_hops=(y.qkdn_id,)))
    plan.add(y.qkdn_id, LinkEdit(V, "VIRT", y.qkdn_id, z.qkdn_id, prev_hop=x.qkdn_id, next_hops=(z.qkdn_id,)))
    plan.add(z.qkdn_id, LinkEdit(V, "VIRT", z.qkdn_id, x.qkdn_id, prev_hop=y.qkdn_id))
    app = "eeeeeeee-0000-4000-8000-000000000001"
    # the last node's application points at a link that does not exist there: validation fails
    backing = (str(uuid.uuid4()),) if bad_last else (V,)
    for p in (x, z):
        plan.add(p.qkdn_id, AppEdit(app, "sae-x", ("sae-z",), backing=(V,) if p is x else backing))
    return plan


def has_virt(conn: AgentConnection) -> bool:
    data = conn.call(lambda m: m.get_config("running").data)
    return any(e.text == V for e in data.iter(f"{{{ETSI}}}qkdl_id"))


def test_failure_on_one_hop_leaves_no_hop_changed(trio) -> None:
    procs, conns = trio
    with pytest.raises(txn.TxnError) as err:
        txn.apply(virt_plan(procs, bad_last=True), conns)
    assert err.value.tag == "invalid-value" and "backing" in err.value.message
    assert err.value.node in {p.name for p in procs}
    assert not any(has_virt(c) for c in conns.values())


def test_a_locked_hop_refuses_and_nothing_changes(trio) -> None:
    procs, conns = trio
    other = procs[1].connect()
    try:
        other.lock("running")
        with pytest.raises(txn.TxnError) as err:
            txn.apply(virt_plan(procs), conns)
        assert err.value.tag == "lock-denied" and err.value.node == procs[1].name
    finally:
        other.unlock("running")
        other.close_session()
    assert not any(has_virt(c) for c in conns.values())


def test_someone_else_s_uncommitted_candidate_is_neither_used_nor_lost(trio) -> None:
    """No <discard-changes> in the transaction: the candidate lock itself refuses a
    candidate another session has edited (RFC 6241 7.5), and that edit stays."""
    procs, conns = trio
    other = procs[2].connect()
    try:
        other.edit_config(target="candidate", config=f'<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"><qkd_node xmlns="{ETSI}"><qkdn_location_id>elsewhere</qkdn_location_id></qkd_node></config>')
        with pytest.raises(txn.TxnError) as err:
            txn.apply(virt_plan(procs), conns)
        assert err.value.tag == "lock-denied" and err.value.node == procs[2].name
        assert "elsewhere" in etree.tostring(other.get_config("candidate").data).decode()
    finally:
        other.discard_changes()
        other.close_session()
    assert not any(has_virt(c) for c in conns.values())


def test_success_changes_every_hop_and_delete_removes(trio) -> None:
    procs, conns = trio
    report = txn.apply(virt_plan(procs), conns)
    assert set(report.phases) == {"lock", "edit", "commit", "confirm"}
    assert all(has_virt(c) for c in conns.values())
    for p in procs:  # every lock was released with the confirm
        other = p.connect()
        try:
            other.lock("running")
            other.lock("candidate")
            other.unlock("candidate")
            other.unlock("running")
        finally:
            other.close_session()
    time.sleep(0.2)
    undo = Plan()
    for p in procs:
        undo.add(p.qkdn_id, LinkEdit(V, "VIRT", p.qkdn_id, p.qkdn_id, delete=True))
        if p is not procs[1]:
            undo.add(p.qkdn_id, AppEdit("eeeeeeee-0000-4000-8000-000000000001", delete=True))
    # apps first would be right for validation order inside one node: one edit-config holds both
    txn.apply(undo, conns)
    assert not any(has_virt(c) for c in conns.values())
    data = conns[procs[0].qkdn_id].call(lambda m: m.get_config("running").data)
    assert etree.tostring(data).count(b"qkd_app>") == 0


def test_refresh_does_not_queue_behind_the_provisioning_session(trio) -> None:
    """A refresh <get> goes over its own session: a transaction's RPCs on the
    provisioning session (held here) neither wait for it nor hold it up."""
    procs, conns = trio
    c = conns[procs[0].qkdn_id]
    c.data = None
    with c.lock:
        t = threading.Thread(target=c.refresh)
        t.start()
        t.join(10)
        assert not t.is_alive()
    assert c.data is not None and c.data.find(f".//{{{ETSI}}}qkdn_id") is not None
    sessions = procs[0].connect()
    try:
        state = etree.tostring(sessions.get().data).decode()
        assert state.count("<session>") >= 3  # provisioning, refresh, this one
    finally:
        sessions.close_session()


def test_only_edits_the_view_reads_make_agents_stale() -> None:
    """After a transaction the controller re-reads only the agents whose part of its topology
    view changed: applications and VIRT links are not in the view (a <get> on every hop
    after each application was most of the create p99), PHYS links and cross-connects are."""
    a, b, c = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"stale/{n}")) for n in "abc")
    app = Plan()
    for node, far in ((a, c), (b, c), (c, a)):
        app.add(node, LinkEdit(str(uuid.uuid5(uuid.NAMESPACE_URL, "v")), "VIRT", node, far, prev_hop=a))
    app.add(a, AppEdit(str(uuid.uuid5(uuid.NAMESPACE_URL, "app")), "sae-a", ("sae-c",)))
    assert app.stale_views() == []
    gone = Plan()
    gone.add(a, AppEdit(str(uuid.uuid5(uuid.NAMESPACE_URL, "app")), delete=True))
    gone.add(b, LinkEdit(str(uuid.uuid5(uuid.NAMESPACE_URL, "v")), "VIRT", b, b, delete=True))
    assert gone.stale_views() == []
    channel = Plan()
    channel.add(a, LinkEdit(str(uuid.uuid5(uuid.NAMESPACE_URL, "p")), "PHYS", a, b, 1, 1, role="TRANSMITTER"))
    channel.add(b, LinkEdit(str(uuid.uuid5(uuid.NAMESPACE_URL, "p")), "PHYS", b, a, 1, 1, role="RECEIVER"))
    channel.add(c, CrossConnectEdit("osw1", 1, 2))
    channel.add(c, AppEdit(str(uuid.uuid5(uuid.NAMESPACE_URL, "other")), "sae-x", ("sae-y",)))
    assert channel.stale_views() == sorted({a.lower(), b.lower(), c.lower()})
