"""The runtime YANG engine (sdqkd.yangdata over libyang): what it accepts and refuses in
both encodings, how it names what is wrong, and the rpc-errors agents make of that."""
from __future__ import annotations

import threading

import pytest
from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import errors

NS = "urn:etsi:qkd:yang:etsi-qkd-node"
TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"
NODE = "9f2c1a54-0b6e-4d7a-8c3e-2f1b5a6d7e80"
LINK = "11111111-2222-4333-8444-555555555555"


def xml(body: str) -> str:
    return f'<qkd_node xmlns="{NS}"><qkdn_id>{NODE}</qkdn_id>{body}</qkd_node>'


def problem(text: str, fmt: str = "xml", config: bool = True) -> yangdata.Problem:
    with pytest.raises(yangdata.YangError) as err:
        yangdata.validate(text, fmt, config=config)
    return err.value.problems[0]


@pytest.mark.parametrize("body, kind, node", [
    ("<bogus>1</bogus>", "unknown", "bogus"),
    ("<qkd_interfaces><qkd_interface><qkdi_id>abc</qkdi_id></qkd_interface></qkd_interfaces>", "type", "qkdi_id"),
    ("<qkdn_capabilities><link_stats_support>yes</link_stats_support></qkdn_capabilities>", "type", "link_stats_support"),
    (f"<qkd_links><qkd_link><qkdl_id>{LINK}</qkdl_id><qkdl_type xmlns:t='{TYPES}'>t:NOPE</qkdl_type></qkd_link></qkd_links>",
     "type", "qkdl_type"),
    ("<qkdn_status xmlns:t='urn:etsi:qkd:yang:etsi-qkd-node-types'>t:UP</qkdn_status>", "state", "qkdn_status"),
    (f"<qkd_links><qkd_link><qkdl_id>{LINK}</qkdl_id><qkdl_type xmlns:t='{TYPES}'>t:VIRT</qkdl_type>"
     "<phys_wavelength>3</phys_wavelength></qkd_link></qkd_links>", "when", "phys_wavelength"),
])
def test_xml_problems_name_their_kind_and_node(body: str, kind: str, node: str) -> None:
    p = problem(xml(body))
    assert (p.kind, p.node) == (kind, node), p
    assert p.path and p.path.startswith("/etsi-qkd-sdn-node:qkd_node")


def test_a_foreign_namespace_is_unknown() -> None:
    p = problem('<other xmlns="urn:example:other"/>')
    assert p.kind in ("unknown", "unknown-namespace")


@pytest.mark.parametrize("member, value", [
    ("qkdn_version", 7),  # a string given as a number
    ("qkdn_capabilities", {"link_stats_support": "true"}),  # a boolean given as a string
    ("qkd_interfaces", {"qkd_interface": [{"qkdi_id": "1"}]}),  # uint32 given as a string
    ("qkd_interfaces", {"qkd_interface": [{"qkdi_id": 1, "qkdi_capabilities": {"max_absorption": 12.5}}]}),  # decimal64 as a number
])
def test_json_is_strict_about_rfc7951_types(member: str, value: object) -> None:
    with pytest.raises(yangdata.YangError):
        yangdata.validate_json({"etsi-qkd-sdn-node:qkd_node": {"qkdn_id": NODE, member: value}})


def test_json_needs_module_qualified_top_level() -> None:
    with pytest.raises(yangdata.YangError):
        yangdata.validate_json({"qkd_node": {"qkdn_id": NODE}})


def test_identityref_takes_any_declared_prefix_and_prints_canonically() -> None:
    doc = yangdata.validate(xml(f"<qkd_links><qkd_link><qkdl_id>{LINK}</qkdl_id>"
                                f"<qkdl_type xmlns:zz='{TYPES}'>zz:VIRT</qkdl_type></qkd_link></qkd_links>"))
    assert doc.json["etsi-qkd-sdn-node:qkd_node"]["qkd_links"]["qkd_link"][0]["qkdl_type"] == "etsi-qkd-node-types:VIRT"
    [el] = doc.elements()
    t = el.find(f".//{{{NS}}}qkdl_type")
    pfx, name = t.text.split(":")
    assert t.nsmap[pfx] == TYPES and name == "VIRT"


def test_xml_comes_back_in_schema_order_and_json_follows_rfc7951() -> None:
    doc = yangdata.validate(xml("<qkd_interfaces><qkd_interface><qkdi_capabilities><max_absorption>12.5</max_absorption>"
                                "</qkdi_capabilities><qkdi_id>1</qkdi_id></qkd_interface></qkd_interfaces>"))
    iface = doc.json["etsi-qkd-sdn-node:qkd_node"]["qkd_interfaces"]["qkd_interface"][0]
    assert iface["qkdi_id"] == 1 and iface["qkdi_capabilities"]["max_absorption"] == "12.5"
    [el] = doc.elements()
    assert [etree.QName(c).localname for c in el.find(f".//{{{NS}}}qkd_interface")] == ["qkdi_id", "qkdi_capabilities"]
    assert yangdata.validate_json(doc.json).xml == doc.xml  # the same document either way


@pytest.mark.parametrize("value, ok", [
    ("2026-12-04T10:00:00Z", True), ("2026-12-04T10:00:00.25+05:30", True), ("2016-12-31T23:59:60Z", True),
    ("2026-13-45T99:99:99Z", False), ("2026-02-30T10:00:00Z", False), ("2026-12-04T24:00:00Z", False),
    ("2026-12-04T10:00:00+25:00", False),
])
def test_date_and_time_is_a_real_instant(value: str, ok: bool) -> None:
    body = f"<qkd_applications><qkd_app><app_id>{LINK}</app_id><expiration_time>{value}</expiration_time></qkd_app></qkd_applications>"
    if ok:
        yangdata.validate(xml(body))
    else:
        assert "date-and-time" in problem(xml(body)).message


def test_type_errors_say_which_restriction() -> None:
    p = problem(xml("<qkd_interfaces><qkd_interface><qkdi_id>1</qkdi_id><qkdi_capabilities>"
                    "<max_absorption>1.2345</max_absorption></qkdi_capabilities></qkd_interface></qkd_interfaces>"))
    assert "max_absorption: decimal64 (fraction-digits 3)" in p.message


@pytest.mark.parametrize("kind, tag, app_tag", [
    ("when", "unknown-element", None), ("must", "operation-failed", "must-violation"),
    ("unique", "operation-failed", "data-not-unique"), ("too-many", "operation-failed", "too-many-elements"),
    ("too-few", "operation-failed", "too-few-elements"), ("leafref", "data-missing", "instance-required"),
    ("mandatory", "data-missing", None), ("type", "invalid-value", None), ("unknown", "unknown-element", None),
])
def test_rpc_errors_follow_rfc7950_section_15(kind: str, tag: str, app_tag: str | None) -> None:
    err = errors.from_yang(yangdata.YangError([yangdata.Problem(kind, "m", "/etsi-qkd-sdn-node:qkd_node/qkdn_id")]))
    assert (err.tag, err.app_tag) == (tag, app_tag)
    assert err.path == "/etsi-qkdn:qkd_node/etsi-qkdn:qkdn_id"


def test_prefixed_path_keeps_keys_and_value_predicates() -> None:
    assert yangdata.prefixed_path("/etsi-qkd-sdn-node:qkd_node/qkd_applications/qkd_app[app_id='a/b']/client_app_id[.='x']") == (
        "/etsi-qkdn:qkd_node/etsi-qkdn:qkd_applications/etsi-qkdn:qkd_app[etsi-qkdn:app_id='a/b']/etsi-qkdn:client_app_id[.='x']")


def test_threads_keep_their_errors_apart() -> None:
    """libyang stores errors per thread: concurrent validations each see their own."""
    seen: list[str] = []

    def run(i: int) -> None:
        for _ in range(50):
            try:
                yangdata.validate(xml(f"<qkd_interfaces><qkd_interface><qkdi_id>x{i}</qkdi_id></qkd_interface></qkd_interfaces>"))
            except yangdata.YangError as e:
                seen.append(f"x{i}" if f'"x{i}"' in e.problems[0].message else "mixed")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "mixed" not in seen and len(seen) == 200
