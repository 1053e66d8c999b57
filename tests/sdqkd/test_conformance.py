"""Our YANG modules against the official ones (../shared/reference/yang).

- ETSI GS QKD 015: re-authored, so it must be the same schema as upstream,
  except for the three `when` expressions we fix (identity prefix).
- ONF TAPI v2.1.3: a subset, so every node we define must be defined the same
  way upstream and nothing upstream requires may be left out.
The last test mutates our modules to prove the checker can fail.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from testlib import REPO, run
from sdqkd.yangmodels import YANG_DIR
from yang_compat import compare

PYANG = str(Path(sys.executable).with_name("pyang"))
TAPI_INSTANCE = REPO / "tests" / "data" / "tapi_instance.xml"

ETSI = ("etsi-qkd-node-types", "etsi-qkd-sdn-node")
ETSI_REVISION = "2022-01-30"
TAPI = ("tapi-common@2020-04-23", "tapi-topology@2020-04-23",
        "tapi-connectivity@2020-06-16", "tapi-photonic-media@2020-06-16")

# Our `when` -> upstream's. Upstream compares the identityref qkdl_type with
# unprefixed names, which do not match any identity (yanglint warns about it).
ETSI_WHEN_FIXES = {
    "qkdl_type = 'etsi-qkdn-types:VIRT'": "qkdl_type = 'VIRT'",
    "qkdl_type = 'etsi-qkdn-types:PHYS'": "qkdl_type = 'PHYS'",
    "../qkdl_type = 'etsi-qkdn-types:PHYS'": "../qkdl_type = 'PHYS'",
}


def etsi_compare(refdir: Path, ours: Path = YANG_DIR) -> list[str]:
    return compare([ours / f"{m}@{ETSI_REVISION}.yang" for m in ETSI], ours,
                   [refdir / "etsi-qkd-015" / f"{m}.yang" for m in ETSI],
                   [refdir / "etsi-qkd-015", refdir / "ietf"],
                   mode="equal", allowed=ETSI_WHEN_FIXES)


def tapi_compare(refdir: Path, ours: Path = YANG_DIR, mode: str = "subset") -> list[str]:
    return compare([ours / f"{m}.yang" for m in TAPI], ours,
                   [refdir / "tapi" / f"{m}.yang" for m in TAPI], refdir / "tapi",
                   mode=mode)


@pytest.mark.parametrize("module", ETSI)
def test_etsi_tree_identical(refdir, module):
    ours = run([PYANG, "-f", "tree", "-p", str(YANG_DIR),
                str(YANG_DIR / f"{module}@{ETSI_REVISION}.yang")])
    official = run([PYANG, "-f", "tree",
                    "-p", f"{refdir / 'ietf'}:{refdir / 'etsi-qkd-015'}",
                    str(refdir / "etsi-qkd-015" / f"{module}.yang")])
    assert (ours.returncode, ours.stderr) == (0, ""), ours.stderr
    assert (official.returncode, official.stderr) == (0, ""), official.stderr
    assert ours.stdout == official.stdout


def test_etsi_equal_but_for_the_when_fixes(refdir):
    assert etsi_compare(refdir) == []


def test_tapi_subset(refdir):
    assert tapi_compare(refdir) == []


def test_tapi_is_not_equal(refdir):
    """The modes differ: our TAPI leaves out official optional nodes."""
    errors = tapi_compare(refdir, mode="equal")
    assert any(e.startswith("node missing in ours: ") for e in errors)


@pytest.mark.parametrize("where", ["ours", "official"])
def test_tapi_instance_validates(refdir, yanglint, where):
    d = YANG_DIR if where == "ours" else refdir / "tapi"
    res = run([yanglint, "-t", "data", "-p", str(d),
               *(str(d / f"{m}.yang") for m in TAPI), str(TAPI_INSTANCE)])
    assert (res.returncode, res.stderr) == (0, ""), res.stderr


# (module file, text to replace (must occur once), replacement, expected message)
MUTATIONS = {
    # TAPI, subset mode
    "leaf-type": ("tapi-photonic-media@2020-06-16",
                  "leaf number-of-mc {\n      type uint64;",
                  "leaf number-of-mc {\n      type uint32;", "type differs"),
    "drop-min-elements": ("tapi-common@2020-04-23", "      min-elements 1;\n", "",
                          "min-elements differs"),
    "flip-config": ("tapi-common@2020-04-23",
                    "leaf layer-protocol-name {\n      type layer-protocol-name;\n"
                    "      config false;",
                    "leaf layer-protocol-name {\n      type layer-protocol-name;\n"
                    "      config true;", "config differs"),
    "rename-enum": ("tapi-common@2020-04-23", "enum LOCKED {", "enum LOCKED_OUT {",
                    "type differs"),
    "add-leaf": ("tapi-common@2020-04-23", "  grouping admin-state-pac {\n",
                 "  grouping admin-state-pac {\n    leaf sdqkd-extra {\n"
                 "      type string;\n    }\n", "node missing in official"),
    "add-mandatory": ("tapi-common@2020-04-23",
                      "leaf direction {\n      type port-direction;\n",
                      "leaf direction {\n      type port-direction;\n"
                      "      mandatory true;\n", "mandatory differs"),
    "omit-required": ("tapi-common@2020-04-23",
                      "    leaf-list supported-layer-protocol-qualifier {\n"
                      "      type layer-protocol-qualifier;\n      config false;\n"
                      "      min-elements 1;\n      description\n"
                      '        "Layer protocol qualifiers supported at the SIP.";\n'
                      "    }\n", "", "required official node omitted"),
    "augment-when": ("tapi-photonic-media@2020-06-16",
                     '    description\n      "Adds OTSi capabilities to a service',
                     "    when \"tapi-common:layer-protocol-name = 'PHOTONIC_MEDIA'\";\n"
                     '    description\n      "Adds OTSi capabilities to a service',
                     "when differs"),
    # ETSI, equal mode
    "change-default": ("etsi-qkd-sdn-node@2022-01-30",
                       'type uint32;\n      default "0";',
                       'type uint32;\n      default "1";', "default differs"),
    "drop-optional-leaf": ("etsi-qkd-sdn-node@2022-01-30",
                           "        leaf-list qkdl_applications {\n"
                           "          type yang:uuid;\n          description\n"
                           '            "Applications using keys from the link.";\n'
                           "        }\n", "", "node missing in ours"),
    "identity-base": ("etsi-qkd-node-types@2022-01-30",
                      "identity DV-QKD-COW {\n    base QKD-TECHNOLOGY-TYPES;",
                      "identity DV-QKD-COW {\n    base DV-QKD;",
                      "identity DV-QKD-COW differs"),
    "other-when": ("etsi-qkd-sdn-node@2022-01-30",
                   "\"../qkdl_type = 'etsi-qkdn-types:PHYS'\"",
                   "\"../qkdl_type = 'etsi-qkdn-types:VIRT'\"", "when differs"),
    "when-fix-reverted": ("etsi-qkd-sdn-node@2022-01-30",
                          "\"qkdl_type = 'etsi-qkdn-types:VIRT'\"", "\"qkdl_type = 'VIRT'\"",
                          "allowed when difference no longer present"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_checker_catches_mutation(refdir, tmp_path, name):
    module, old, new, expected = MUTATIONS[name]
    for f in YANG_DIR.glob("*.yang"):
        shutil.copy(f, tmp_path)
    target = tmp_path / f"{module}.yang"
    text = target.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"mutation {name!r} no longer applies to {module}"
    target.write_text(text.replace(old, new), encoding="utf-8")
    errors = (tapi_compare if module.startswith("tapi-") else etsi_compare)(refdir, tmp_path)
    assert any(expected in e for e in errors), errors
