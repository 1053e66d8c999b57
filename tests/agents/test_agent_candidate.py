"""RFC 6241 8.3: candidate is a copy of running that follows running while it is
unmodified, driven over NETCONF by two ncclient sessions of one real agent."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from lxml import etree

from test_agent_netconf import APP, ETSI, cfg

LOCATION = f"{{{ETSI}}}qkd_node/{{{ETSI}}}qkdn_location_id"
SERVER_APP = f".//{{{ETSI}}}server_app_id"


def config(m: Any, source: str) -> etree._Element:
    return m.get_config(source).data


@pytest.fixture
def peer(agent) -> Iterator[Any]:
    """A second session, editing running while `nc` works on candidate."""
    m = agent.connect()
    yield m
    if m.connected:
        m.close_session()


@pytest.fixture(autouse=True)
def clean(nc) -> None:
    """Each test starts from an unmodified candidate and no application."""
    nc.discard_changes()
    nc.edit_config(target="running", config=cfg(
        f'<qkd_applications><qkd_app xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0" nc:operation="remove">'
        "<app_id>c0ffee00-1234-4abc-8def-0123456789ab</app_id></qkd_app></qkd_applications>"))


def test_unmodified_candidate_shows_edits_made_to_running(nc, peer) -> None:
    peer.edit_config(target="running", config=cfg("<qkdn_location_id>EditedByPeer</qkdn_location_id>"))
    assert config(nc, "candidate").findtext(LOCATION) == "EditedByPeer"
    peer.edit_config(target="running", config=cfg(APP))  # a second edit: still followed
    assert config(nc, "candidate").findtext(SERVER_APP) == "sae://alice/enc1"
    assert etree.tostring(config(nc, "candidate"), method="c14n") == etree.tostring(config(nc, "running"), method="c14n")


def test_commit_of_an_unmodified_candidate_keeps_running_edits(nc, peer) -> None:
    peer.edit_config(target="running", config=cfg("<qkdn_location_id>KeptAfterCommit</qkdn_location_id>"))
    nc.commit()
    assert config(peer, "running").findtext(LOCATION) == "KeptAfterCommit"


def test_candidate_edited_in_another_part_keeps_earlier_running_edits(nc, peer) -> None:
    peer.edit_config(target="running", config=cfg("<qkdn_location_id>PeerSite</qkdn_location_id>"))
    nc.edit_config(target="candidate", config=cfg(APP))  # the first modification copies running as it is now
    nc.commit()
    data = config(peer, "running")
    assert data.findtext(LOCATION) == "PeerSite"
    assert data.findtext(SERVER_APP) == "sae://alice/enc1"


def test_candidate_follows_running_again_after_commit_and_discard(nc, peer) -> None:
    nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>Committed</qkdn_location_id>"))
    nc.commit()
    peer.edit_config(target="running", config=cfg("<qkdn_location_id>AfterCommit</qkdn_location_id>"))
    assert config(nc, "candidate").findtext(LOCATION) == "AfterCommit"
    nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>Discarded</qkdn_location_id>"))
    nc.discard_changes()
    peer.edit_config(target="running", config=cfg("<qkdn_location_id>AfterDiscard</qkdn_location_id>"))
    assert config(nc, "candidate").findtext(LOCATION) == "AfterDiscard"


def test_a_modified_candidate_is_a_snapshot_and_its_commit_replaces_running(nc, peer) -> None:
    """The standard behaviour, kept: once modified, candidate no longer follows running,
    and committing it replaces running (a later edit made directly to running is lost)."""
    nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>FromCandidate</qkdn_location_id>"))
    peer.edit_config(target="running", config=cfg(APP))
    assert config(nc, "candidate").find(SERVER_APP) is None
    nc.commit()
    data = config(peer, "running")
    assert data.findtext(LOCATION) == "FromCandidate"
    assert data.find(SERVER_APP) is None
