"""Helpers every test folder imports (not fixtures: those are in conftest.py): the checkout,
the official reference modules, running a command."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def reference_yang_dir() -> Path | None:
    """The official modules (shared/reference/yang beside the checkout, or $SDQKD_REFERENCE_YANG)."""
    env = os.environ.get("SDQKD_REFERENCE_YANG")
    cand = Path(env) if env else REPO.parent / "shared" / "reference" / "yang"
    return cand if (cand / "etsi-qkd-015").is_dir() else None


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)
