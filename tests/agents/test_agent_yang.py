"""The agent enforces the ETSI 015 model on every edit, as a third party tried it: each
hostile edit is an rpc-error with the tag RFC 6241 / RFC 7950 give and libyang's
error-path, and running (and candidate) stay as they were; RPC parameters are checked
against ietf-netconf's types (a confirm-timeout past uint32 once killed the timer thread
and left running locked)."""
from __future__ import annotations

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele


NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"
LINK = "11111111-2222-4333-8444-555555555555"
APP = "c0ffee00-1234-4abc-8def-0123456789ab"
PEER = "3b1e7c22-5d4f-4a9b-9e0c-6a7b8c9d0e1f"


def cfg(body: str) -> str:
    return f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}" xmlns:t="{TYPES}">{body}</qkd_node></config>'


def link(kind: str, extra: str) -> str:
    return (f"<qkd_links><qkd_link><qkdl_id>{LINK}</qkdl_id><qkdl_type>t:{kind}</qkdl_type>"
            f"<qkdl_remote><qkdn_id>{PEER}</qkdn_id></qkdl_remote>{extra}</qkd_link></qkd_links>")


def app(extra: str) -> str:
    return (f"<qkd_applications><qkd_app><app_id>{APP}</app_id><app_type>t:CLIENT</app_type>"
            f"<server_app_id>sae-a</server_app_id>{extra}</qkd_app></qkd_applications>")


def iface(extra: str) -> str:
    return f"<qkd_interfaces><qkd_interface><qkdi_id>77</qkdi_id>{extra}</qkd_interface></qkd_interfaces>"


def _text(m, source: str) -> bytes:
    return etree.tostring(m.get_config(source).data, method="c14n")


# (id, body, error-tag, text in the message, last step of error-path)
HOSTILE = [
    ("phys-leaf-on-virt", link("VIRT", "<phys_channel_att>3.5</phys_channel_att>"), "unknown-element",
     'When condition', "phys_channel_att"),
    ("phys-wavelength-on-virt", link("VIRT", "<phys_wavelength>34</phys_wavelength>"), "unknown-element",
     "When condition", "phys_wavelength"),
    ("virt-leaf-on-phys", link("PHYS", f"<virt_prev_hop>{PEER}</virt_prev_hop>"), "unknown-element",
     "When condition", "virt_prev_hop"),
    ("fraction-digits", iface("<qkdi_capabilities><max_absorption>3.0001</max_absorption></qkdi_capabilities>"),
     "invalid-value", "fraction digits", "max_absorption"),
    ("decimal64-range", iface("<qkdi_capabilities><max_absorption>99999999999999999999999.5</max_absorption>"
                              "</qkdi_capabilities>"), "invalid-value", "decimal64", "max_absorption"),
    ("date-and-time", app("<expiration_time>2026-13-45T99:99:99Z</expiration_time>"), "invalid-value",
     "date-and-time", "expiration_time"),
    ("duplicate-leaf-list", app("<client_app_id>sae-b</client_app_id><client_app_id>sae-b</client_app_id>"),
     "invalid-value", "Duplicate instance", "client_app_id"),
    ("uint32-range", app("<app_priority>4294967296</app_priority>"), "invalid-value", "uint32", "app_priority"),
    ("bad-identity", link("NOPE", ""), "invalid-value", "identityref", "qkdl_type"),
    ("pattern", f"<qkd_links><qkd_link><qkdl_id>not-a-uuid</qkdl_id></qkd_link></qkd_links>", "invalid-value",
     "pattern", "qkdl_id"),
    ("state-data", "<qkdn_status>t:OPERATING</qkdn_status>", "invalid-value", "state", "qkdn_status"),
    ("unknown-leaf", "<colour>red</colour>", "unknown-element", "colour", "qkd_node"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
@pytest.mark.parametrize("target", ["running", "candidate"])
def test_hostile_edit_is_refused_and_changes_nothing(nc, case, target) -> None:
    _, body, tag, text, last = case
    before = {s: _text(nc, s) for s in ("running", "candidate")}
    with pytest.raises(RPCError) as err:
        nc.edit_config(target=target, config=cfg(body))
    e = err.value
    assert e.tag == tag, (e.tag, e.message)
    assert text in e.message, e.message
    assert e.path and e.path.strip().startswith("/etsi-qkdn:qkd_node"), e.path
    assert last in e.path, e.path
    assert {s: _text(nc, s) for s in ("running", "candidate")} == before


def test_error_path_is_an_xpath_with_its_prefixes_declared(nc) -> None:
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=cfg(link("VIRT", "<phys_channel_att>3.5</phys_channel_att>")))
    path_el = err.value.xml.find(f"{{{NC}}}error-path")
    assert path_el.nsmap["etsi-qkdn"] == ETSI
    assert path_el.text == (f"/etsi-qkdn:qkd_node/etsi-qkdn:qkd_links/etsi-qkdn:qkd_link[etsi-qkdn:qkdl_id='{LINK}']"
                            "/etsi-qkdn:phys_channel_att")


def test_valid_edits_still_pass_and_read_back_canonical(nc) -> None:
    nc.edit_config(target="running", config=cfg(link("VIRT", "<virt_bandwidth>1000</virt_bandwidth>")))
    nc.edit_config(target="running", config=cfg(app("<expiration_time>2026-12-24T10:00:00Z</expiration_time>")))
    data = nc.get_config("running").data
    lk = data.find(f".//{{{ETSI}}}qkd_link")
    assert lk.findtext(f"{{{ETSI}}}virt_bandwidth") == "1000"
    qkdl_type = lk.find(f"{{{ETSI}}}qkdl_type")
    pfx, name = qkdl_type.text.split(":")
    assert qkdl_type.nsmap[pfx] == TYPES and name == "VIRT"
    assert data.findtext(f".//{{{ETSI}}}expiration_time") == "2026-12-24T10:00:00+00:00"  # RFC 6991: Z is +00:00
    nc.edit_config(target="running", config=cfg(
        f'<qkd_links><qkd_link xmlns:nc="{NC}" nc:operation="delete"><qkdl_id>{LINK}</qkdl_id></qkd_link></qkd_links>'
        f'<qkd_applications><qkd_app xmlns:nc="{NC}" nc:operation="delete"><app_id>{APP}</app_id></qkd_app>'
        "</qkd_applications>"))


@pytest.mark.parametrize("timeout", ["99999999999", "0", "-5", "soon"])
def test_confirm_timeout_is_a_uint32_of_at_least_one(nc, timeout) -> None:
    nc.discard_changes()
    nc.lock("candidate")
    try:
        nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>somewhere</qkdn_location_id>"))
        rpc = to_ele(f'<commit xmlns="{NC}"><confirmed/><confirm-timeout>{timeout}</confirm-timeout></commit>')
        with pytest.raises(RPCError) as err:
            nc.dispatch(rpc)
        assert err.value.tag == "invalid-value" and err.value.type == "protocol", err.value.message
        assert "confirm-timeout" in (err.value.path or "") + err.value.message
        nc.discard_changes()
    finally:
        nc.unlock("candidate")
    nc.lock("running")  # nothing was left pending or locked
    nc.unlock("running")


def test_unknown_rpc_parameter_is_refused(nc) -> None:
    with pytest.raises(RPCError) as err:
        nc.dispatch(to_ele(f'<lock xmlns="{NC}"><target><running/></target><forever/></lock>'))
    assert err.value.tag == "unknown-element" and err.value.type == "protocol"
    nc.lock("running")  # the refused lock took nothing
    nc.unlock("running")
