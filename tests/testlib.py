"""Helpers every test folder imports (not fixtures: those are in conftest.py): the checkout,
the official reference modules, running a command."""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def reference_yang_dir() -> Path | None:
    """The official modules (shared/reference/yang beside the checkout, or $SDQKD_REFERENCE_YANG)."""
    env = os.environ.get("SDQKD_REFERENCE_YANG")
    cand = Path(env) if env else REPO.parent / "shared" / "reference" / "yang"
    return cand if (cand / "etsi-qkd-015").is_dir() else None


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def wait_for(pred: Callable[[], Any], timeout: float, what: str = "condition", poll: float = 0.2,
             explain: Callable[[], str] | None = None) -> Any:
    """pred()'s first true value within `timeout` s; AssertionError naming `what` (and what
    `explain` adds, e.g. where threads were) when it never comes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"{what} not reached in {timeout} s" + (f"; {explain()}" if explain else ""))
