"""bindings/ is what yang/ generates, and the typed API (sdqkd.typed) round-trips through
libyang: a document built with the generated classes is valid RFC 7951 JSON, and what
libyang prints reads back into the same classes."""
from __future__ import annotations

import json
import shutil

from samples import APP_ID, PHYS_LINK, populated_node

from testlib import run
from sdqkd import bindgen, typed, yangdata, yangmodels


def test_bindings_match_yang_sources() -> None:
    problems = bindgen.drift()
    assert problems == [], "bindings/ drifted from yang/ (run `make bindings`):\n" + "\n".join(problems)


def test_drift_is_detected(tmp_path) -> None:
    copy = tmp_path / "bindings"
    shutil.copytree(bindgen.BINDINGS_DIR, copy)
    target = copy / "sdqkd_optical_switch.py"
    target.write_text(target.read_text().replace("port-count", "port-kount", 1))
    (copy / "handmade.py").write_text("x = 1\n")
    problems = bindgen.drift(copy)
    assert any("sdqkd_optical_switch.py" in p for p in problems)
    assert any("handmade.py" in p for p in problems)


def test_typed_documents_round_trip_through_libyang() -> None:
    data = typed.to_json(populated_node())
    doc = yangdata.validate_json(data, config=False)  # every constraint, state included
    node = doc.json["etsi-qkd-sdn-node:qkd_node"]
    assert node["qkdn_status"] == "etsi-qkd-node-types:OPERATING"  # RFC 7951: the module's name
    app = next(a for a in node["qkd_applications"]["qkd_app"] if a["app_id"] == APP_ID)
    assert app["app_status"] == "etsi-qkd-node-types:ON"  # set bare in the bindings
    back = typed.from_json(doc.json, "etsi_qkd_sdn_node")
    assert yangdata.validate_json(typed.to_json(back), config=False).json == doc.json
    link = next(lk for lk in node["qkd_links"]["qkd_link"] if lk["qkdl_id"] == PHYS_LINK)
    assert link["qkdl_performance"]["phys_perf"][0]["perf_type"] == "etsi-qkd-node-types:QBER"


def test_typed_documents_validate_with_yanglint(tmp_path, yanglint) -> None:
    """yanglint, a second reader, takes the libyang-printed forms (official modules: test_conformance.py)."""
    doc = yangdata.validate_json(typed.to_json(populated_node()), config=False)
    (tmp_path / "node.xml").write_text(doc.xml)
    (tmp_path / "node.json").write_text(json.dumps(doc.json))
    mods = [str(yangmodels.module_path(m)) for m in ("etsi-qkd-node-types", "etsi-qkd-sdn-node")]
    for name in ("node.xml", "node.json"):
        proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), "-t", "data", *mods, str(tmp_path / name)])
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
