"""RFC 6241 7.2 error-option, driven over NETCONF (ncclient) against a real agent:
stop-on-error and rollback-on-error change nothing when one operation fails;
continue-on-error applies every operation that succeeds and reports every one that
fails, in one reply, leaving running valid as a whole."""
from __future__ import annotations

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from test_agent_netconf import APP, ETSI, NC, PEER, cfg

TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"
L1 = "11111111-2222-4333-8444-000000000001"  # exists before each test
L2 = "11111111-2222-4333-8444-000000000002"
L3 = "11111111-2222-4333-8444-000000000003"
APP_ID = "c0ffee00-1234-4abc-8def-0123456789ab"
OP = f'xmlns:nc="{NC}" nc:operation'


def link(qkdl_id: str, op: str = "", extra: str = "", remote: bool = True) -> str:
    attr = f' {OP}="{op}"' if op else ""
    far = f"<qkdl_remote><qkdn_id>{PEER}</qkdn_id></qkdl_remote>" if remote else ""
    return (f"<qkd_link{attr}><qkdl_id>{qkdl_id}</qkdl_id><qkdl_type xmlns:t='{TYPES}'>t:VIRT</qkdl_type>"
            f"{far}{extra}</qkd_link>")


def links(*entries: str) -> str:
    return f"<qkd_links>{''.join(entries)}</qkd_links>"


def errs(exc: RPCError) -> list[RPCError]:
    """Every rpc-error of a reply (ncclient keeps a list only when there are several)."""
    return list(getattr(exc, "errors", None) or [exc])


def running(m) -> etree._Element:
    return m.get_config("running").data


def link_ids(data: etree._Element) -> set[str]:
    return {e.text for e in data.iterfind(f".//{{{ETSI}}}qkd_link/{{{ETSI}}}qkdl_id")}


def location(data: etree._Element) -> str | None:
    return data.findtext(f"{{{ETSI}}}qkd_node/{{{ETSI}}}qkdn_location_id")


@pytest.fixture(autouse=True)
def start(nc) -> None:
    """Running with link L1 only, location 'Start', no application; candidate unmodified."""
    nc.discard_changes()
    nc.edit_config(target="running", config=cfg(
        "<qkdn_location_id>Start</qkdn_location_id>"
        f"<qkd_applications><qkd_app {OP}='remove'><app_id>{APP_ID}</app_id></qkd_app></qkd_applications>"
        + links(link(L1, "replace"), f"<qkd_link {OP}='remove'><qkdl_id>{L2}</qkdl_id></qkd_link>",
                f"<qkd_link {OP}='remove'><qkdl_id>{L3}</qkdl_id></qkd_link>")))


# One edit, two operations that fail on their own (L1 exists; L3 does not), two that succeed.
MIXED = cfg("<qkdn_location_id>Continued</qkdn_location_id>"
            + links(link(L1, "create"), link(L2), f"<qkd_link {OP}='delete'><qkdl_id>{L3}</qkdl_id></qkd_link>"))


def test_continue_on_error_applies_what_succeeds_and_reports_every_failure(nc) -> None:
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=MIXED, error_option="continue-on-error")
    assert sorted(e.tag for e in errs(err.value)) == ["data-exists", "data-missing"]
    paths = " ".join(e.path or "" for e in errs(err.value))
    assert L1 in paths and L3 in paths
    data = running(nc)
    assert location(data) == "Continued"
    assert link_ids(data) == {L1, L2}


@pytest.mark.parametrize("option", ["stop-on-error", "rollback-on-error"])
def test_stop_and_rollback_on_error_change_nothing(nc, option) -> None:
    before = etree.tostring(running(nc), method="c14n")
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=MIXED, error_option=option)
    assert [e.tag for e in errs(err.value)] == ["data-exists"]  # processing stopped at the first error
    assert etree.tostring(running(nc), method="c14n") == before


def test_continue_on_error_leaves_out_an_invalid_value_and_keeps_the_rest(nc) -> None:
    """A value libyang refuses fails its own operation: a merged leaf alone, a created
    entry with everything in it."""
    edit = cfg("<qkdn_location_id>Typed</qkdn_location_id>" + links(
        link(L2, extra="<qkdl_enable>maybe</qkdl_enable><virt_bandwidth>300</virt_bandwidth>"),
        link(L3, "create", extra="<qkdl_enable>perhaps</qkdl_enable>")))
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=edit, error_option="continue-on-error")
    assert [e.tag for e in errs(err.value)] == ["invalid-value", "invalid-value"]
    assert all("qkdl_enable" in (e.path or "") for e in errs(err.value))
    data = running(nc)
    assert location(data) == "Typed"
    assert link_ids(data) == {L1, L2}
    l2 = next(e for e in data.iterfind(f".//{{{ETSI}}}qkd_link") if e.findtext(f"{{{ETSI}}}qkdl_id") == L2)
    assert l2.findtext(f"{{{ETSI}}}virt_bandwidth") == "300"
    assert l2.find(f"{{{ETSI}}}qkdl_enable") is None


def test_continue_on_error_leaves_out_an_entry_the_whole_config_refuses(nc) -> None:
    """A link without its remote end is refused by the checks of the whole configuration:
    the operation that created it is left out, the other ones are applied."""
    edit = cfg(links(link(L2, remote=False), link(L3)) + "<qkdn_location_id>Whole</qkdn_location_id>")
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=edit, error_option="continue-on-error")
    assert [e.tag for e in errs(err.value)] == ["missing-element"]
    assert L2 in (errs(err.value)[0].path or "")
    data = running(nc)
    assert link_ids(data) == {L1, L3}
    assert location(data) == "Whole"


def test_continue_on_error_keeps_a_delete_that_would_leave_a_reference_dangling_out(nc) -> None:
    """The error names the application's backing_qkdl_id, which no operation of the edit
    wrote: it is pinned on the delete without which it disappears."""
    nc.edit_config(target="running", config=cfg(
        APP.replace("</qkd_app>", f"<backing_qkdl_id>{L1}</backing_qkdl_id></qkd_app>")))
    edit = cfg(links(f"<qkd_link {OP}='delete'><qkdl_id>{L1}</qkdl_id></qkd_link>", link(L2))
               + "<qkdn_location_id>Referenced</qkdn_location_id>")
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=edit, error_option="continue-on-error")
    assert len(errs(err.value)) == 1 and "backing_qkdl_id" in (errs(err.value)[0].path or "")
    data = running(nc)
    assert link_ids(data) == {L1, L2}
    assert location(data) == "Referenced"


def test_continue_on_error_on_candidate_and_test_only(agent, nc) -> None:
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=MIXED, error_option="continue-on-error", test_option="test-only")
    assert sorted(e.tag for e in errs(err.value)) == ["data-exists", "data-missing"]
    assert location(running(nc)) == "Start"  # test-only sets nothing

    with pytest.raises(RPCError) as err:
        nc.edit_config(target="candidate", config=MIXED, error_option="continue-on-error")
    assert sorted(e.tag for e in errs(err.value)) == ["data-exists", "data-missing"]
    data = nc.get_config("candidate").data
    assert location(data) == "Continued" and link_ids(data) == {L1, L2}
    assert location(running(nc)) == "Start"
    other = agent.connect()
    try:
        with pytest.raises(RPCError) as err:
            other.lock("candidate")  # partly applied: candidate is modified
        assert err.value.tag == "lock-denied"
    finally:
        other.close_session()
    nc.commit()
    assert link_ids(running(nc)) == {L1, L2}


def test_continue_on_error_with_every_operation_failing_changes_nothing(agent, nc) -> None:
    edit = cfg(links(link(L1, "create"), f"<qkd_link {OP}='delete'><qkdl_id>{L3}</qkdl_id></qkd_link>"))
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="candidate", config=edit, error_option="continue-on-error")
    assert sorted(e.tag for e in errs(err.value)) == ["data-exists", "data-missing"]
    other = agent.connect()
    try:
        other.lock("candidate")  # nothing applied: candidate is not modified
        other.unlock("candidate")
    finally:
        other.close_session()
