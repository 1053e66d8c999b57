"""The controller's RESTCONF southbound against one real agent serving RESTCONF (RFC 8040):
reads, transactions with merge (PATCH), replace (PUT) and delete (DELETE), the agent's
refusals as the NETCONF path reports them, an entity-tag conflict, and notifications over
the SSE event stream."""
from __future__ import annotations

import queue
import uuid

import pytest
from lxml import etree

from agentproc import PASSWORD, agent_config, free_port
from testlib import wait_for
from sdqkd import pki
from sdqkd.controller.provisioning import txn
from sdqkd.controller.southbound.errors import from_restconf
from sdqkd.controller.southbound.interface import AgentAddress
from sdqkd.controller.southbound.ops import AppEdit, LinkEdit, Plan, present
from sdqkd.controller.southbound.restconf import RestconfConnection

ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
PEER = "12345678-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rc")
    ca = pki.make_ca(tmp / "ca", "restconf test CA")
    cert, key = pki.issue(ca, "rc-agent", tmp / "tls", server_names=["127.0.0.1"], client=False)
    port = free_port()
    proc = agent_config(tmp, "rc", extra={"restconf": {"host": "127.0.0.1", "port": port, "cert": str(cert),
                                                       "key": str(key)}}).start()
    notes: queue.Queue[etree._Element] = queue.Queue()
    addr = AgentAddress(proc.name, proc.qkdn_id, "127.0.0.1", proc.port, "admin", PASSWORD,
                        restconf_url=f"https://127.0.0.1:{port}/restconf", restconf_ca=str(ca[0]))
    try:
        conn = RestconfConnection(addr, lambda c: None, lambda c, n: notes.put(n))
        conn.start()
        try:
            assert conn.wait_connected(20), conn.last_error
            yield proc, conn, notes
        finally:
            conn.stop()
    finally:
        proc.stop()


def netconf_config(proc) -> etree._Element:
    m = proc.connect()
    try:
        return m.get_config("running").data
    finally:
        m.close_session()


def link_plan(proc, lid: str, app: str | None = None, backing: str | None = None) -> Plan:
    plan = Plan()
    plan.add(proc.qkdn_id, LinkEdit(lid, "VIRT", proc.qkdn_id, PEER, next_hops=(PEER,)))
    if app:
        plan.add(proc.qkdn_id, AppEdit(app, "sae-a", ("sae-b",), backing=(backing or lid,), local=proc.qkdn_id, remote=PEER))
    return plan


def test_reads_the_agent_as_netconf_does(agent) -> None:
    proc, conn, _ = agent
    assert conn.data is not None and conn.data.findtext(f".//{{{ETSI}}}qkdn_id") == proc.qkdn_id
    assert conn.data.tag == "{urn:ietf:params:xml:ns:netconf:base:1.0}data"
    over_rest, over_nc = conn.get_config(), netconf_config(proc)
    assert present(over_rest) == present(over_nc)
    assert over_rest.findtext(f".//{{{ETSI}}}qkdn_id") == over_nc.findtext(f".//{{{ETSI}}}qkdn_id") == proc.qkdn_id


def test_merge_replace_and_delete_in_transactions(agent) -> None:
    proc, conn, notes = agent
    lid, app = str(uuid.uuid4()), str(uuid.uuid4())
    conns = {proc.qkdn_id: conn}
    report = txn.apply(link_plan(proc, lid, app), conns)
    assert set(report.phases) == {"lock", "edit", "commit", "confirm"}
    found = present(netconf_config(proc))
    assert ("link", lid) in found and found[("app", app)]["backing"] == [lid]
    # the agent notified the new application over the event stream
    wait_for(lambda: any(etree.QName(n).localname == "event" and app in etree.tostring(n).decode()
                         for n in _drain(notes)), 10, "the application's event over SSE", poll=0.1)

    # replace: the application moved to another link (PUT: backing_qkdl_id replaced, not added to)
    lid2 = str(uuid.uuid4())
    plan = link_plan(proc, lid2, app)
    txn.apply(plan, conns)
    assert present(netconf_config(proc))[("app", app)]["backing"] == [lid2]

    undo = Plan()
    for e in (AppEdit(app, delete=True), LinkEdit(lid, "VIRT", "", "", delete=True), LinkEdit(lid2, "VIRT", "", "", delete=True)):
        undo.add(proc.qkdn_id, e)
    txn.apply(undo, conns)
    found = present(netconf_config(proc))
    assert not {("link", lid), ("link", lid2), ("app", app)} & found.keys()
    txn.apply(undo, conns)  # removing what is gone is no error (NETCONF's "remove")


def _drain(q: queue.Queue) -> list[etree._Element]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def test_a_refusal_is_the_netconf_error_and_nothing_is_left(agent) -> None:
    proc, conn, _ = agent
    lid, app = str(uuid.uuid4()), str(uuid.uuid4())
    before = present(netconf_config(proc))
    with pytest.raises(txn.TxnError) as err:  # the application's backing link does not exist
        txn.apply(link_plan(proc, lid, app, backing=str(uuid.uuid4())), {proc.qkdn_id: conn})
    # what the NETCONF path reports for the same refusal (tests/controller/test_txn.py)
    assert err.value.tag == "invalid-value" and "backing" in err.value.message, err.value
    assert err.value.node == proc.name and not err.value.unavailable and err.value.committed == []
    # the link written before the refused application was put back
    assert present(netconf_config(proc)) == before


def test_someone_else_s_change_in_between_fails_the_write_and_survives(agent) -> None:
    """In place of a lock, the configuration's entity-tag: a change made by another manager
    after the transaction read the configuration makes its first write fail (412), and that
    change is neither overwritten nor rolled back."""
    proc, conn, _ = agent
    lid = str(uuid.uuid4())

    def other_manager(phase: str) -> None:
        if phase != "commit":
            return
        m = proc.connect()
        try:
            m.edit_config(target="candidate", config=f'<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">'
                          f'<qkd_node xmlns="{ETSI}"><qkdn_location_id>elsewhere</qkdn_location_id></qkd_node></config>')
            m.commit()
        finally:
            m.close_session()

    with pytest.raises(txn.TxnError) as err:
        txn.apply(link_plan(proc, lid), {proc.qkdn_id: conn}, before_phase=other_manager)
    assert err.value.tag == "operation-failed" and err.value.committed == [], err.value
    after = netconf_config(proc)
    assert after.findtext(f".//{{{ETSI}}}qkdn_location_id") == "elsewhere"
    assert ("link", lid) not in present(after)


def test_errors_of_plain_requests(agent) -> None:
    proc, conn, _ = agent
    from ncclient.operations.rpc import RPCError
    with pytest.raises(RPCError) as err:
        conn.request("GET", f"data/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link={uuid.uuid4()}")
    assert err.value.tag == "invalid-value"
    with pytest.raises(RPCError) as err:
        conn.request("PATCH", "data", body={"etsi-qkd-sdn-node:qkd_node": {"no_such_leaf": 1}})
    assert err.value.tag in ("unknown-element", "malformed-message", "invalid-value"), err.value.tag
    # the same refusal in XML (RFC 8040 7.1: ietf-restconf:errors as XML)
    r = conn.client.get(f"data/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link={uuid.uuid4()}",
                        headers={"Accept": "application/yang-data+xml"})
    err2 = from_restconf(r.status_code, r.content, r.headers["content-type"])
    assert r.status_code == 404 and err2.tag == "invalid-value" and err2.message
    # no body at all (an If-Match refused by a proxy, say): RFC 8040 7's tag for the status
    assert from_restconf(412, b"").tag == "operation-failed"


def test_a_netconf_lock_on_the_agent_refuses_the_write(agent) -> None:
    """A NETCONF session holding running's lock keeps RESTCONF writes out (409 lock-denied):
    the transaction reports it as the NETCONF path reports a held lock."""
    proc, conn, _ = agent
    lid = str(uuid.uuid4())
    other = proc.connect()
    try:
        other.lock("running")
        with pytest.raises(txn.TxnError) as err:
            txn.apply(link_plan(proc, lid), {proc.qkdn_id: conn})
        assert err.value.tag == "lock-denied" and err.value.node == proc.name and err.value.committed == []
    finally:
        other.unlock("running")
        other.close_session()
    assert ("link", lid) not in present(netconf_config(proc))
