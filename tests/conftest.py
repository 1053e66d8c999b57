"""Shared fixtures: where the official reference modules are, and how to call yanglint."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def reference_yang_dir() -> Path | None:
    """The official modules (shared/reference/yang beside the checkout, or $SDQKD_REFERENCE_YANG)."""
    env = os.environ.get("SDQKD_REFERENCE_YANG")
    cand = Path(env) if env else REPO.parent / "shared" / "reference" / "yang"
    return cand if (cand / "etsi-qkd-015").is_dir() else None


@pytest.fixture(scope="session")
def refdir() -> Path:
    found = reference_yang_dir()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the official YANG modules (../shared/reference/yang) are missing in CI")
        pytest.skip("official YANG modules not found: set SDQKD_REFERENCE_YANG")
    return found


@pytest.fixture(scope="session")
def yanglint() -> str:
    exe = shutil.which("yanglint")
    if exe is None:
        pytest.fail("yanglint is not installed (make test installs Debian's libyang-tools)")
    return exe


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)
