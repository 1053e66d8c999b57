"""bindings/ is what yang/ generates, and the codec writes standard XML and RFC 7951 JSON."""
from __future__ import annotations

import json
import shutil

import pytest
from lxml import etree

from sdqkd import yangcodec, yangmodels, yangschema
from sdqkd.bindings.etsi_qkd_sdn_node import etsi_qkd_sdn_node
from samples import APP_ID, PHYS_LINK, populated_node
from conftest import run

ETSI = yangschema.load("etsi-qkd-sdn-node")
NS = "urn:etsi:qkd:yang:etsi-qkd-node"


def test_bindings_match_yang_sources() -> None:
    problems = yangmodels.drift()
    assert problems == [], "bindings/ drifted from yang/ (run `make bindings`):\n" + "\n".join(problems)


def test_drift_is_detected(tmp_path) -> None:
    copy = tmp_path / "bindings"
    shutil.copytree(yangmodels.BINDINGS_DIR, copy)
    target = copy / "sdqkd_optical_switch.py"
    target.write_text(target.read_text().replace("port-count", "port-kount", 1))
    (copy / "handmade.py").write_text("x = 1\n")
    problems = yangmodels.drift(copy)
    assert any("sdqkd_optical_switch.py" in p for p in problems)
    assert any("handmade.py" in p for p in problems)


def _xml(root) -> str:
    return yangcodec.to_xml_string(yangcodec.encode_xml(root, ETSI))


def test_xml_round_trip() -> None:
    text = _xml(populated_node())
    back = yangcodec.decode_xml([etree.fromstring(text)], etsi_qkd_sdn_node(), ETSI)
    assert _xml(back) == text


def test_json_round_trip_and_cross_encoding() -> None:
    node = populated_node()
    data = yangcodec.encode_json(node, ETSI)
    again = yangcodec.decode_json(json.loads(json.dumps(data)), etsi_qkd_sdn_node(), ETSI)
    assert yangcodec.encode_json(again, ETSI) == data
    # XML -> bindings -> JSON gives the same document as bindings -> JSON
    via_xml = yangcodec.decode_xml([etree.fromstring(_xml(node))], etsi_qkd_sdn_node(), ETSI)
    assert yangcodec.encode_json(via_xml, ETSI) == data


def test_json_follows_rfc7951() -> None:
    data = yangcodec.encode_json(populated_node(), ETSI)
    node = data["etsi-qkd-sdn-node:qkd_node"]
    assert node["qkdn_status"] == "etsi-qkd-node-types:OPERATING"  # module name, not prefix
    iface = node["qkd_interfaces"]["qkd_interface"][0]
    assert iface["qkdi_id"] == 1  # uint32 is a number
    assert iface["qkdi_capabilities"]["max_absorption"] == "12.5"  # decimal64 is a string
    link = next(lk for lk in node["qkd_links"]["qkd_link"] if lk["qkdl_id"] == PHYS_LINK)
    assert link["qkdl_enable"] is True
    assert link["qkdl_performance"]["phys_perf"][0]["perf_type"] == "etsi-qkd-node-types:QBER"
    assert list(link)[0] == "qkdl_id"


def test_xml_declares_identity_prefixes() -> None:
    el = etree.fromstring(_xml(populated_node()))
    status = el.find(f"{{{NS}}}qkdn_status")
    prefix, ident = status.text.split(":")
    assert status.nsmap[prefix] == "urn:etsi:qkd:yang:etsi-qkd-node-types"
    assert ident == "OPERATING"


def test_config_only_drops_state() -> None:
    text = yangcodec.to_xml_string(yangcodec.encode_xml(populated_node(), ETSI, config_only=True))
    for state_leaf in ("qkdn_status", "app_status", "creation_time", "statistics", "qkdi_status", "skr", "phys_perf"):
        assert f"<{state_leaf}>" not in text and f"<{state_leaf} " not in text
    assert "<qkdl_status" in text  # config true in ETSI 015
    assert APP_ID in text


def test_encoded_documents_validate_with_yanglint(tmp_path, yanglint) -> None:
    """Our modules accept what the codec writes, in both encodings (the official
    modules are checked in test_conformance.py)."""
    node = populated_node()
    (tmp_path / "node.xml").write_text(_xml(node))
    (tmp_path / "node.json").write_text(json.dumps(yangcodec.encode_json(node, ETSI)))
    mods = [str(yangmodels.module_path(m)) for m in ("etsi-qkd-node-types", "etsi-qkd-sdn-node")]
    for name in ("node.xml", "node.json"):
        proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), "-t", "data", *mods, str(tmp_path / name)])
        assert proc.returncode == 0 and not proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "body, kind, path_part",
    [
        ("<qkdn_id>9f2c1a54-0b6e-4d7a-8c3e-2f1b5a6d7e80</qkdn_id><bogus>1</bogus>", "unknown-element", "bogus"),
        ("<qkd_interfaces><qkd_interface><qkdi_id>abc</qkdi_id></qkd_interface></qkd_interfaces>", "invalid-value", "qkdi_id"),
        ("<qkd_interfaces><qkd_interface><qkdi_model>x</qkdi_model></qkd_interface></qkd_interfaces>", "missing-element", "qkdi_id"),
        ("<qkdn_capabilities><link_stats_support>yes</link_stats_support></qkdn_capabilities>", "invalid-value", "link_stats_support"),
        ("<qkd_links><qkd_link><qkdl_id>11111111-2222-4333-8444-555555555555</qkdl_id>"
         "<qkdl_type xmlns:t='urn:etsi:qkd:yang:etsi-qkd-node-types'>t:NOPE</qkdl_type></qkd_link></qkd_links>", "invalid-value", "qkdl_type"),
        ("<qkdn_id>not-a-uuid</qkdn_id>", "invalid-value", "qkdn_id"),
        ("<x:other xmlns:x='urn:example:other'/>", "unknown-namespace", "other"),
    ],
)
def test_xml_decode_errors(body: str, kind: str, path_part: str) -> None:
    doc = etree.fromstring(f'<qkd_node xmlns="{NS}">{body}</qkd_node>')
    with pytest.raises(yangcodec.CodecError) as err:
        yangcodec.decode_xml([doc], etsi_qkd_sdn_node(), ETSI)
    assert err.value.kind == kind
    assert path_part in err.value.path
    assert err.value.path.startswith("/etsi-qkdn:qkd_node")


def test_state_data_rejected_where_config_is_expected() -> None:
    doc = etree.fromstring(f'<qkd_node xmlns="{NS}"><qkdn_status>UP</qkdn_status></qkd_node>')
    with pytest.raises(yangcodec.CodecError) as err:
        yangcodec.decode_xml([doc], etsi_qkd_sdn_node(), ETSI, config_only=True)
    assert err.value.kind == "state-data"


@pytest.mark.parametrize(
    "member, value",
    [
        ("qkdn_version", 7),  # string given as a number
        ("qkdn_capabilities", {"link_stats_support": "true"}),  # boolean given as a string
        ("qkd_interfaces", {"qkd_interface": [{"qkdi_id": "1"}]}),  # uint32 given as a string
        ("qkd_interfaces", {"qkd_interface": [{"qkdi_id": 1, "qkdi_capabilities": {"max_absorption": 12.5}}]}),
    ],
)
def test_json_decode_is_strict_about_rfc7951_types(member: str, value: object) -> None:
    with pytest.raises(yangcodec.CodecError) as err:
        yangcodec.decode_json({"etsi-qkd-sdn-node:qkd_node": {member: value}}, etsi_qkd_sdn_node(), ETSI)
    assert err.value.kind == "invalid-value"


def test_json_requires_module_qualified_top_level() -> None:
    with pytest.raises(yangcodec.CodecError) as err:
        yangcodec.decode_json({"qkd_node": {}}, etsi_qkd_sdn_node(), ETSI)
    assert err.value.kind == "malformed"


def test_identityref_accepts_any_declared_prefix() -> None:
    doc = etree.fromstring(
        f'<qkd_node xmlns="{NS}" xmlns:zz="urn:etsi:qkd:yang:etsi-qkd-node-types">'
        "<qkd_links><qkd_link><qkdl_id>11111111-2222-4333-8444-555555555555</qkdl_id>"
        "<qkdl_type>zz:VIRT</qkdl_type></qkd_link></qkd_links></qkd_node>"
    )
    root = yangcodec.decode_xml([doc], etsi_qkd_sdn_node(), ETSI)
    data = yangcodec.encode_json(root, ETSI)
    assert data["etsi-qkd-sdn-node:qkd_node"]["qkd_links"]["qkd_link"][0]["qkdl_type"] == "etsi-qkd-node-types:VIRT"
