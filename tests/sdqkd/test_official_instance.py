"""What our bindings emit is valid against the official ETSI GS QKD 015 modules.

The official etsi-qkd-sdn-node compares the identityref qkdl_type with unprefixed
'VIRT'/'PHYS' in three `when` expressions, which can never be true under libyang:
every VIRT- or PHYS-specific leaf is then rejected. TeraFlowSDN patches two of the
three; we validate against a temporary copy with the identity prefixed in all three
(the reference files stay untouched), and against the untouched module with a
document that has none of those leaves.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from sdqkd import typed, yangdata
from samples import populated_node
from testlib import run

WHEN_FIXES = {
    "\"qkdl_type = 'VIRT'\"": "\"qkdl_type = 'etsi-qkdn-types:VIRT'\"",
    "\"qkdl_type = 'PHYS'\"": "\"qkdl_type = 'etsi-qkdn-types:PHYS'\"",
    "\"../qkdl_type = 'PHYS'\"": "\"../qkdl_type = 'etsi-qkdn-types:PHYS'\"",
}


def _official(refdir: Path, tmp: Path, patched: bool) -> list[str]:
    src = refdir / "etsi-qkd-015"
    dst = tmp / ("patched" if patched else "official")
    dst.mkdir()
    for f in src.glob("*.yang"):
        shutil.copy(f, dst / f.name)
    if patched:
        path = dst / "etsi-qkd-sdn-node.yang"
        text = path.read_bytes().decode("utf-8")
        for old, new in WHEN_FIXES.items():
            assert text.count(old) == 1, f"upstream text changed: {old}"
            text = text.replace(old, new)
        path.write_bytes(text.encode("utf-8"))
    return ["-p", str(refdir / "ietf"), "-p", str(dst), str(dst / "etsi-qkd-node-types.yang"), str(dst / "etsi-qkd-sdn-node.yang")]


def _write(tmp: Path, root, stem: str) -> list[Path]:
    """Both encodings, as libyang prints a document built with the typed API."""
    doc = yangdata.encode_json(typed.to_json(root))
    xml = tmp / f"{stem}.xml"
    xml.write_text(doc.xml)
    js = tmp / f"{stem}.json"
    js.write_text(json.dumps(doc.json))
    return [xml, js]


def test_full_node_validates_against_official_with_when_fix(tmp_path, refdir, yanglint) -> None:
    schema = _official(refdir, tmp_path, patched=True)
    for doc in _write(tmp_path, populated_node(), "full"):
        proc = run([yanglint, "-t", "data", *schema, str(doc)])
        assert proc.returncode == 0 and "err" not in proc.stderr, proc.stderr


def test_node_validates_against_untouched_official(tmp_path, refdir, yanglint) -> None:
    schema = _official(refdir, tmp_path, patched=False)
    for doc in _write(tmp_path, populated_node(with_virt=False), "plain"):
        proc = run([yanglint, "-t", "data", *schema, str(doc)])
        assert proc.returncode == 0, proc.stderr


def test_untouched_official_rejects_virt_leaves(tmp_path, refdir, yanglint) -> None:
    """Documents the upstream defect that the patched copy works around."""
    schema = _official(refdir, tmp_path, patched=False)
    xml = _write(tmp_path, populated_node(), "full")[0]
    proc = run([yanglint, "-t", "data", *schema, str(xml)])
    assert proc.returncode != 0
    assert "When condition" in proc.stderr
