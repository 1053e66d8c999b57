"""Every module in yang/ is clean under pyang --strict and yanglint, and named for its revision."""
from __future__ import annotations

import re

import pytest

from sdqkd import bindgen, yangmodels
from testlib import run

MODULES = sorted(yangmodels.modules().values(), key=lambda m: m.name)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_pyang_strict_is_silent(module) -> None:
    proc = run(yangmodels.pyang_command("--strict", str(module.path)))
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_yanglint_loads_all_modules_silently(yanglint) -> None:
    files = [str(m.path) for m in MODULES]
    proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), *files])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_file_name_matches_module_and_latest_revision(module) -> None:
    text = module.path.read_text(encoding="utf-8")
    assert re.search(rf"^module {re.escape(module.name)} {{", text, re.M)
    revisions = re.findall(r"^\s*revision\s+\"?(\d{4}-\d{2}-\d{2})\"?", text, re.M)
    assert revisions and max(revisions) == module.revision


def test_ietf_types_are_unmodified_rfc6991_copies(refdir) -> None:
    for name in ("ietf-yang-types", "ietf-inet-types"):
        ours = yangmodels.module_path(name)
        assert ours.read_bytes() == (refdir / "ietf" / ours.name).read_bytes()


def test_every_module_is_in_a_binding_set() -> None:
    """A module added to yang/ must reach bindings/ (directly or as an import)."""
    bound = {m for bset in bindgen.BINDING_SETS for m in bset.modules}
    imported = set()
    for m in MODULES:
        imported |= set(re.findall(r"^\s*import\s+([A-Za-z0-9_.-]+)", m.path.read_text(), re.M))
    assert {m.name for m in MODULES} <= bound | imported | set(bindgen.UNBOUND)
