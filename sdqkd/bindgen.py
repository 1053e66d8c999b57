"""The typed Python API's classes (bindings/), generated from yang/ by pyangbind: the one way
they are made (`make bindings`), and the drift test's comparison.
"""
from __future__ import annotations

import difflib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdqkd.yangmodels import module_path, pyang_command

BINDINGS_DIR = Path(__file__).resolve().parent.parent / "bindings"


@dataclass(frozen=True)
class BindingSet:
    """One generated Python module: which YANG modules it is built from."""

    output: str  # file name under bindings/
    modules: tuple[str, ...]  # module names given to pyang (their imports follow)


# What bindings/ holds. The TAPI modules augment each other, so they are one set.
BINDING_SETS: tuple[BindingSet, ...] = (
    BindingSet("etsi_qkd_sdn_node.py", ("etsi-qkd-sdn-node",)),
    BindingSet("sdqkd_lab.py", ("sdqkd-lab",)),
    BindingSet("sdqkd_optical_switch.py", ("sdqkd-optical-switch",)),
    BindingSet(
        "tapi.py",
        ("tapi-common", "tapi-topology", "tapi-connectivity", "tapi-photonic-media"),
    ),
)

# Modules served without bindings, and why.
UNBOUND: dict[str, str] = {
    "ietf-netconf": "the base protocol's operations: libyang checks their parameters (e.g. "
    "confirm-timeout), there is no data to bind",
    "ietf-netconf-with-defaults": "only the <with-defaults> parameter of get, get-config and copy-config "
    "(RFC 6243): libyang checks it, there is no data to bind",
    "ietf-netconf-monitoring": "pyangbind cannot map instance-identifier; the agent states "
    "/netconf-state as RFC 7951 JSON and libyang encodes it",
    "notifications": "RFC 5277 create-subscription only: libyang checks its parameters, there is no data to bind",
    "nc-notifications": "RFC 5277 /netconf/streams (state the agent states as RFC 7951 JSON, libyang encodes "
    "it) and two notifications the hub sends as they are",
    "ietf-restconf": "RFC 8040 yang-data (errors) and the API root only: agents/restconf/ writes them, "
    "there is no datastore data to bind",
    "ietf-restconf-monitoring": "RFC 8040 restconf-state: state agents/restconf/ states as RFC 7951 JSON",
    "sdqkd-qrng": "notifications only (no data to bind); agents/device_notifications.py states them as JSON "
    "and libyang validates and encodes them",
}

_INIT = '''"""Python classes generated from yang/ by pyangbind (`make bindings`).

Generated, never edited by hand: tests/test_bindings.py regenerates them and fails
on any difference.
"""
'''


def _pybind_plugin_dir() -> str:
    import pyangbind

    return os.path.join(os.path.dirname(pyangbind.__file__), "plugin")


def render(bset: BindingSet) -> str:
    """Source text of one bindings module, as pyangbind writes it."""
    files = [str(module_path(n)) for n in bset.modules]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / bset.output
        cmd = pyang_command("--plugindir", _pybind_plugin_dir(), "-f", "pybind", "-o", str(out), *files)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pyang failed for {bset.output}:\n{proc.stderr}")
        return out.read_text(encoding="utf-8")


def expected_files() -> dict[str, str]:
    """Everything bindings/ must contain, file name -> text."""
    files = {"__init__.py": _INIT}
    for bset in BINDING_SETS:
        files[bset.output] = render(bset)
    return files


def generate(target: Path = BINDINGS_DIR) -> list[str]:
    """Write bindings/ afresh; return the names written."""
    target.mkdir(exist_ok=True)
    files = expected_files()
    for stale in target.glob("*.py"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8")
    return sorted(files)


def drift(target: Path = BINDINGS_DIR) -> list[str]:
    """Unified diffs between bindings/ and a fresh generation; empty when in sync."""
    problems: list[str] = []
    files = expected_files()
    present = {p.name for p in target.glob("*.py")}
    for extra in sorted(present - set(files)):
        problems.append(f"bindings/{extra}: not generated from yang/")
    for name, text in files.items():
        path = target / name
        have = path.read_text(encoding="utf-8") if path.exists() else ""
        if have != text:
            diff = difflib.unified_diff(
                have.splitlines(True), text.splitlines(True), f"bindings/{name}", f"generated/{name}", n=1
            )
            problems.append("".join(list(diff)[:40]))
    return problems
