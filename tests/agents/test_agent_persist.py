"""Running survives kill -9 (agents/datastore/store.py, persistence): real agent processes,
killed with SIGKILL and started again on the same state directory, over NETCONF."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from lxml import etree

from agentproc import AgentProc, agent_config
from test_agent_netconf import ETSI, cfg

APP_ID = "c0ffee00-1234-4abc-8def-00000000a001"
LINK_ID = "11111111-2222-4333-8444-00000000a002"
REMOTE = "3b1e7c22-5d4f-4a9b-9e0c-6a7b8c9d0e1f"
LOCATION = f".//{{{ETSI}}}qkdn_location_id"


def app_and_link(qkdn_id: str) -> str:
    """A VIRT link to a remote node and an application backed by it (what the controller pushes)."""
    return cfg(
        f"<qkd_applications><qkd_app><app_id>{APP_ID}</app_id>"
        "<app_type xmlns:t='urn:etsi:qkd:yang:etsi-qkd-node-types'>t:CLIENT</app_type>"
        "<server_app_id>sae-x</server_app_id><client_app_id>sae-y</client_app_id>"
        f"<backing_qkdl_id>{LINK_ID}</backing_qkdl_id><local_qkdn_id>{qkdn_id}</local_qkdn_id>"
        f"<remote_qkdn_id>{REMOTE}</remote_qkdn_id></qkd_app></qkd_applications>"
        f"<qkd_links><qkd_link><qkdl_id>{LINK_ID}</qkdl_id><qkdl_enable>true</qkdl_enable>"
        f"<qkdl_local><qkdn_id>{qkdn_id}</qkdn_id></qkdl_local><qkdl_remote><qkdn_id>{REMOTE}</qkdn_id></qkdl_remote>"
        "<qkdl_type xmlns:t='urn:etsi:qkd:yang:etsi-qkd-node-types'>t:VIRT</qkdl_type></qkd_link></qkd_links>")


def running(a: AgentProc) -> etree._Element:
    m = a.connect()
    try:
        return m.get_config("running").data
    finally:
        m.close_session()


@pytest.fixture
def node(tmp_path: Path):
    a = agent_config(tmp_path).start()
    yield a
    a.stop()


def test_provisioned_config_comes_back_after_kill_9(node: AgentProc) -> None:
    m = node.connect()
    m.edit_config(target="running", config=app_and_link(node.qkdn_id))
    m.edit_config(target="running", config=cfg("<qkdn_location_id>Provisioned</qkdn_location_id>"))
    node.kill()
    path = node.state_dir / "running.xml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # links and apps: readable by the agent's user only
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".running.xml-")]  # no temporary file left
    node.start()
    data = running(node)
    assert data.findtext(f".//{{{ETSI}}}qkd_app/{{{ETSI}}}app_id") == APP_ID
    assert data.findtext(f".//{{{ETSI}}}qkd_link/{{{ETSI}}}qkdl_id") == LINK_ID
    assert data.findtext(LOCATION) == "Provisioned"
    assert data.findtext(f".//{{{ETSI}}}qkdn_id") == node.qkdn_id
    assert "running restored from running" in node.log()


def test_startup_keeps_its_meaning_and_is_used_without_a_running_file(node: AgentProc) -> None:
    """copy-config running -> startup saves startup; running goes on changing apart from it; with
    no running file (a fresh state, or removed by the operator) the node boots from startup."""
    m = node.connect()
    m.edit_config(target="running", config=cfg("<qkdn_location_id>Saved</qkdn_location_id>"))
    m.copy_config(source="running", target="startup")
    m.edit_config(target="running", config=cfg("<qkdn_location_id>NotSaved</qkdn_location_id>"))
    assert m.get_config("startup").data.findtext(LOCATION) == "Saved"
    node.kill()
    node.start()
    assert running(node).findtext(LOCATION) == "NotSaved"  # running kept, not replaced by startup
    node.stop()
    (node.state_dir / "running.xml").unlink()
    node.start()
    assert running(node).findtext(LOCATION) == "Saved"
    assert "running restored from startup" in node.log()


def test_a_confirmed_commit_pending_at_kill_9_is_not_kept(node: AgentProc) -> None:
    """RFC 6241 8.4: a confirmed commit that was not confirmed is rolled back; a crash
    must not make it permanent."""
    m = node.connect()
    m.edit_config(target="running", config=cfg("<qkdn_location_id>Before</qkdn_location_id>"))
    m.edit_config(target="candidate", config=app_and_link(node.qkdn_id))
    m.edit_config(target="candidate", config=cfg("<qkdn_location_id>Unconfirmed</qkdn_location_id>"))
    m.commit(confirmed=True, timeout="120", persist="tok-9")
    assert m.get_config("running").data.findtext(LOCATION) == "Unconfirmed"
    node.kill()
    node.start()
    data = running(node)
    assert data.findtext(LOCATION) == "Before"
    assert data.find(f".//{{{ETSI}}}qkd_app") is None
    # and a confirmed commit that was confirmed is kept
    m = node.connect()
    m.edit_config(target="candidate", config=cfg("<qkdn_location_id>Confirmed</qkdn_location_id>"))
    m.commit(confirmed=True, timeout="120")
    m.commit()
    node.kill()
    node.start()
    assert running(node).findtext(LOCATION) == "Confirmed"


def test_a_corrupt_running_file_is_kept_aside_and_the_node_starts_from_startup(node: AgentProc) -> None:
    m = node.connect()
    m.edit_config(target="running", config=cfg("<qkdn_location_id>Saved</qkdn_location_id>"))
    m.copy_config(source="running", target="startup")
    m.edit_config(target="running", config=cfg("<qkdn_location_id>Later</qkdn_location_id>"))
    node.kill()
    path = node.state_dir / "running.xml"
    path.write_bytes(path.read_bytes()[:120])  # torn: what a non-atomic writer could leave
    node.start()
    assert running(node).findtext(LOCATION) == "Saved"
    aside = [p for p in path.parent.iterdir() if p.name.startswith("running.xml.corrupt-")]
    assert len(aside) == 1 and len(aside[0].read_bytes()) == 120
    assert "persisted running" in node.log() and "unusable" in node.log()
    assert not path.exists()  # until the next commit writes it again
    # valid XML that fails the node's checks (another node's identity) is refused the same way
    m = node.connect()
    m.edit_config(target="running", config=cfg("<qkdn_location_id>Second</qkdn_location_id>"))
    node.kill()
    path.write_text(path.read_text().replace(node.qkdn_id, REMOTE))
    node.start()
    assert running(node).findtext(f".//{{{ETSI}}}qkdn_id") == node.qkdn_id
    assert len([p for p in path.parent.iterdir() if p.name.startswith("running.xml.corrupt-")]) == 2
    # a commit writes a good file again
    m = node.connect()
    m.edit_config(target="running", config=cfg("<qkdn_location_id>Fresh</qkdn_location_id>"))
    node.kill()
    node.start()
    assert running(node).findtext(LOCATION) == "Fresh"
