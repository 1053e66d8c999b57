"""sdqkd.fastbind: bindings built with cached classes behave as pyangbind's own.

A second copy of each bindings module is loaded with pyangbind's original factories;
the same data goes through both and every serialisation, error and copy must match."""
from __future__ import annotations

import copy
import json
import threading
from decimal import Decimal

import pytest
from pyangbind.lib import pybindJSON, yangtypes

import samples
from sdqkd import fastbind, yangcodec, yangmodels, yangschema
from sdqkd.bindings.etsi_qkd_sdn_node import etsi_qkd_sdn_node
from sdqkd.bindings.sdqkd_lab import sdqkd_lab

TOPO_DIR = yangmodels.BINDINGS_DIR.parent / "lab" / "topologies"


@pytest.fixture(scope="module")
def slow():
    return {m: fastbind.pyangbind_build(m) for m in ("etsi_qkd_sdn_node", "sdqkd_lab")}


def _serialisations(root, schema) -> tuple:
    return (
        yangcodec.to_xml_string(yangcodec.encode_xml(root, schema)),
        yangcodec.to_xml_string(yangcodec.encode_xml(root, schema, config_only=True)),
        json.dumps(yangcodec.encode_json(root, schema), sort_keys=True),
        pybindJSON.dumps(root, mode="ietf"),
        pybindJSON.dumps(root),
        repr(root.get(filter=True)),
    )


def test_fast_path_is_installed_for_the_project_bindings() -> None:
    assert yangtypes.YANGDynClass is fastbind.YANGDynClass
    a, b = etsi_qkd_sdn_node(), etsi_qkd_sdn_node()
    assert type(a.qkd_node.qkdn_id) is type(b.qkd_node.qkdn_id)  # one class, not one per object


@pytest.mark.parametrize("with_virt", [True, False])
def test_sample_node_serialises_identically(slow, monkeypatch, with_virt) -> None:
    schema = yangschema.load("etsi-qkd-sdn-node")
    fast = samples.populated_node(with_virt)
    monkeypatch.setattr(samples, "etsi_qkd_sdn_node", slow["etsi_qkd_sdn_node"].etsi_qkd_sdn_node)
    ref = samples.populated_node(with_virt)
    assert type(ref.qkd_node).__module__ == "pyangbind.lib.yangtypes"
    assert type(ref.qkd_node).__mro__[1].__module__ == "_pyangbind_etsi_qkd_sdn_node"
    assert type(fast.qkd_node).__module__ == "sdqkd.fastbind"
    assert _serialisations(fast, schema) == _serialisations(ref, schema)
    # decoding what was encoded gives the same again, through both builds
    xml = yangcodec.encode_xml(fast, schema)
    again_fast = yangcodec.decode_xml(xml, etsi_qkd_sdn_node(), schema)
    again_ref = yangcodec.decode_xml(xml, slow["etsi_qkd_sdn_node"].etsi_qkd_sdn_node(), schema)
    assert _serialisations(again_fast, schema) == _serialisations(again_ref, schema)
    assert _serialisations(again_fast, schema)[:3] == _serialisations(fast, schema)[:3]
    # pyangbind cannot deep-copy a node with unset restricted leaves: nor can the fast path
    assert _outcome(lambda: _serialisations(copy.deepcopy(fast), schema)) == \
        _outcome(lambda: _serialisations(copy.deepcopy(ref), schema))


def test_lab_topologies_serialise_identically(slow) -> None:
    schema = yangschema.load("sdqkd-lab")
    for path in sorted(TOPO_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        fast = yangcodec.decode_json(data, sdqkd_lab(), schema)
        ref = yangcodec.decode_json(data, slow["sdqkd_lab"].sdqkd_lab(), schema)
        assert _serialisations(fast, schema) == _serialisations(ref, schema), path.name


def _outcome(fn):
    try:
        return ("ok", repr(fn()))
    except Exception as exc:  # the exception itself is what is compared
        return (type(exc).__name__, str(exc))


BAD_VALUES = [
    ("qkdn_id", "not-a-uuid"), ("qkdn_id", samples.NODE_ID), ("qkdn_version", 7),
    ("qkdn_location_id", ""), ("qkdn_status", "nonsense"), ("qkdn_status", "etsi-qkdn-types:OPERATING"),
]


def test_checks_and_errors_are_pyangbind_s(slow) -> None:
    for factory in (etsi_qkd_sdn_node, slow["etsi_qkd_sdn_node"].etsi_qkd_sdn_node):
        assert factory  # both importable
    results = []
    for factory in (etsi_qkd_sdn_node, slow["etsi_qkd_sdn_node"].etsi_qkd_sdn_node):
        n = factory().qkd_node
        out = [_outcome(lambda a=a, v=v: yangcodec.set_leaf(n, a, v)) for a, v in BAD_VALUES]
        app = n.qkd_applications.qkd_app.add(samples.APP_ID)
        iface = n.qkd_interfaces.qkd_interface.add(1)
        out += [
            _outcome(lambda: n.qkd_applications.qkd_app.add(samples.APP_ID)),
            _outcome(lambda: n.qkd_applications.qkd_app.add("x")),
            _outcome(lambda: setattr(app, "app_priority", -1)),
            _outcome(lambda: setattr(app, "app_priority", "high")),
            _outcome(lambda: setattr(app, "app_type", "NOPE")),
            _outcome(lambda: setattr(app, "app_type", "INTERNAL")),
            _outcome(lambda: app.client_app_id.append(3)),
            _outcome(lambda: app.backing_qkdl_id.append("bad")),
            _outcome(lambda: setattr(iface.qkdi_capabilities, "max_absorption", Decimal("1.123456789"))),
            _outcome(lambda: setattr(iface.qkdi_capabilities, "max_absorption", "x")),
            _outcome(lambda: setattr(iface, "qkdi_type", "etsi-qkd-node-types:NOPE")),
            _outcome(lambda: n.qkd_interfaces.qkd_interface.add(-5)),
            _outcome(lambda: (app.app_priority._changed(), app.app_priority._path(), app.app_priority.default())),
            _outcome(lambda: (str(app.app_type), app.app_type._pybind_base_class, app._yang_path())),
        ]
        results.append(out)
    assert results[0] == results[1]
    assert any(kind != "ok" for kind, _ in results[0])


def test_shared_classes_check_values_under_threads() -> None:
    """Classes are shared now: concurrent builds must not disturb each other's checks."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                n = etsi_qkd_sdn_node().qkd_node
                n.qkdn_id = samples.NODE_ID
                with pytest.raises(ValueError):
                    n.qkdn_id = "not-a-uuid"
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
