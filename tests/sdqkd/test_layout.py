"""The architecture the layout shows is the one the imports have: import-linter's contracts
(pyproject.toml) hold, and they would catch a module that broke them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testlib import REPO

# The repository's top-level folders are sub-packages of sdqkd (setup.cfg package_dir);
# import-linter walks one folder per package, so it reads a copy laid out as installed.
FOLDERS = {"agents": "agents", "controller": "controller", "lab": "lab", "tapi": "tapi", "bindings": "bindings"}


def installed_layout(dst: Path) -> Path:
    pkg = dst / "sdqkd"
    shutil.copytree(REPO / "sdqkd", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub, folder in FOLDERS.items():
        shutil.copytree(REPO / folder, pkg / sub, ignore=shutil.ignore_patterns("__pycache__", "*.proto"))
    return dst


def lint(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(exe), "--no-cache", str(REPO / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold(tmp_path: Path) -> None:
    res = lint(installed_layout(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "BROKEN" not in res.stdout and res.stdout.count("KEPT") >= 2


@pytest.mark.parametrize("where, line, contract", [
    ("tapi/context.py", "from sdqkd.controller import core  # noqa", "Layers"),
    ("agents/netconf/rpcs.py", "from sdqkd.bindings import etsi_qkd_sdn_node  # noqa", "No pyangbind"),
    ("controller/controller.py", "from sdqkd.agents import operational  # noqa", "Layers"),
])
def test_a_broken_contract_is_caught(tmp_path: Path, where: str, line: str, contract: str) -> None:
    root = installed_layout(tmp_path)
    target = root / "sdqkd" / where
    target.write_text(target.read_text() + f"\n{line}\n")
    res = lint(root)
    assert res.returncode != 0
    broken = [ln for ln in res.stdout.splitlines() if "BROKEN" in ln]
    assert any(contract in ln for ln in broken) or contract in res.stdout.split("Broken contracts")[-1], res.stdout[-2000:]
