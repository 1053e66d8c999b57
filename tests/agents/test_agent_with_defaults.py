"""RFC 6243 with-defaults, driven over NETCONF (ncclient) against a real agent: basic
mode explicit, also report-all and trim, on get-config and get; the parameter checked
by libyang against ietf-netconf-with-defaults."""
from __future__ import annotations

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from test_agent_netconf import ETSI, NC, PEER, cfg

WD = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
CAP = "urn:ietf:params:netconf:capability:with-defaults:1.0?basic-mode=explicit&also-supported=report-all,trim"
TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"
SET = "11111111-2222-4333-8444-00000000000a"  # qkdl_enable set by the client, to its default (true)
UNSET = "11111111-2222-4333-8444-00000000000b"  # qkdl_enable not set: its default is in use
OFF = "11111111-2222-4333-8444-00000000000c"  # qkdl_enable set to false, not its default


def link(qkdl_id: str, enable: str | None) -> str:
    leaf = f"<qkdl_enable>{enable}</qkdl_enable>" if enable else ""
    return (f"<qkd_link><qkdl_id>{qkdl_id}</qkdl_id><qkdl_type xmlns:t='{TYPES}'>t:VIRT</qkdl_type>"
            f"<qkdl_remote><qkdn_id>{PEER}</qkdn_id></qkdl_remote>{leaf}</qkd_link>")


@pytest.fixture(autouse=True)
def links(nc) -> None:
    nc.edit_config(target="running", config=cfg(
        f"<qkd_links>{link(SET, 'true')}{link(UNSET, None)}{link(OFF, 'false')}</qkd_links>"))


def enables(data: etree._Element) -> dict[str, str | None]:
    """qkdl_id -> qkdl_enable as reported (None: not reported)."""
    return {e.findtext(f"{{{ETSI}}}qkdl_id"): e.findtext(f"{{{ETSI}}}qkdl_enable")
            for e in data.iterfind(f".//{{{ETSI}}}qkd_link")}


def test_capability_and_module_are_advertised(nc) -> None:
    caps = set(nc.server_capabilities)
    assert CAP in caps
    assert f"{WD}?module=ietf-netconf-with-defaults&revision=2011-06-01" in caps
    # its import, with the features this server implements (RFC 6020 5.6.4)
    base = next(c for c in caps if "?module=ietf-netconf&" in c)
    assert "&features=" in base and "candidate" in base.split("&features=")[1].split(",")
    assert "module ietf-netconf-with-defaults" in nc.get_schema("ietf-netconf-with-defaults").data


@pytest.mark.parametrize("mode", [None, "explicit"])
def test_explicit_reports_what_a_client_set_even_a_default(nc, mode) -> None:
    data = nc.get_config("running", with_defaults=mode).data if mode else nc.get_config("running").data
    assert enables(data) == {SET: "true", UNSET: None, OFF: "false"}


def test_report_all_reports_every_default_in_use(nc) -> None:
    data = nc.get_config("running", with_defaults="report-all").data
    assert enables(data) == {SET: "true", UNSET: "true", OFF: "false"}
    # a default nobody set, elsewhere in the tree
    assert data.find(f".//{{{ETSI}}}qkd_node/{{{ETSI}}}qkdn_capabilities/{{{ETSI}}}key_relay_mode_enable") is not None


def test_trim_leaves_out_every_default_value(nc) -> None:
    data = nc.get_config("running", with_defaults="trim").data
    assert enables(data) == {SET: None, UNSET: None, OFF: "false"}
    caps = data.find(f".//{{{ETSI}}}qkdn_capabilities")  # the agent sets them all to true, their default
    assert caps is None or len(caps) == 0


def test_modes_apply_before_the_subtree_filter_and_to_get(nc) -> None:
    filt = ("subtree", f'<qkd_node xmlns="{ETSI}"><qkd_links><qkd_link><qkdl_id>{UNSET}</qkdl_id><qkdl_enable/>'
            "</qkd_link></qkd_links></qkd_node>")
    assert enables(nc.get_config("running", filter=filt, with_defaults="report-all").data) == {UNSET: "true"}
    assert enables(nc.get(filter=filt, with_defaults="report-all").data) == {UNSET: "true"}
    assert enables(nc.get(filter=filt).data) == {UNSET: None}
    assert enables(nc.get(with_defaults="trim").data) == {SET: None, UNSET: None, OFF: "false"}


def _raw(nc, op: str, mode: str) -> RPCError:
    body = {"get-config": "<source><running/></source>",
            "copy-config": "<target><candidate/></target><source><running/></source>"}[op]
    with pytest.raises(RPCError) as err:
        nc.dispatch(etree.fromstring(f'<{op} xmlns="{NC}">{body}<with-defaults xmlns="{WD}">{mode}</with-defaults></{op}>'))
    return err.value


@pytest.mark.parametrize("op", ["get-config", "copy-config"])
def test_a_mode_the_module_does_not_define_is_an_invalid_value(nc, op) -> None:
    err = _raw(nc, op, "everything")
    assert (err.tag, err.type) == ("invalid-value", "protocol")
    assert "with-defaults" in (err.info or "")


def test_report_all_tagged_is_not_offered_and_refused(nc) -> None:
    assert not any("report-all-tagged" in c for c in nc.server_capabilities)
    err = _raw(nc, "get-config", "report-all-tagged")
    assert (err.tag, err.type) == ("invalid-value", "protocol")


def test_copy_config_accepts_the_parameter_and_copies_what_was_set(nc) -> None:
    nc.discard_changes()
    reply = nc.dispatch(etree.fromstring(
        f'<copy-config xmlns="{NC}"><target><candidate/></target><source><running/></source>'
        f'<with-defaults xmlns="{WD}">report-all</with-defaults></copy-config>'))
    assert reply.ok
    assert enables(nc.get_config("candidate").data) == {SET: "true", UNSET: None, OFF: "false"}
    nc.discard_changes()
