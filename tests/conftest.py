"""Shared fixtures: where the official reference modules are, and how to call yanglint."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from testlib import reference_yang_dir


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
        pytest.fail("yanglint is not installed (make test installs Debian's libyang2-tools)")
    return exe
