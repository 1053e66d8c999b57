"""The YANG modules sdqkd ships, and the one way Python bindings are made from them.

Every consumer (binding generator, drift test, NETCONF capabilities, codec) reads
the module list from here, so adding a module is a one-line change.
"""
from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyangbind

YANG_DIR = Path(__file__).resolve().parent.parent / "yang"
BINDINGS_DIR = Path(__file__).resolve().parent.parent / "bindings"

_FILE_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+?)(@(?P<rev>\d{4}-\d{2}-\d{2}))?\.yang$")


@dataclass(frozen=True)
class YangModule:
    """One module file of yang/."""

    name: str
    revision: str | None
    path: Path

    def read_header(self) -> tuple[str, str]:
        """Namespace and prefix, read from the file (no full parse needed)."""
        text = self.path.read_text(encoding="utf-8")
        ns = re.search(r'^\s*namespace\s+"([^"]+)"', text, re.M)
        pfx = re.search(r'^\s*prefix\s+"?([A-Za-z0-9_.-]+)"?\s*;', text, re.M)
        if not ns or not pfx:
            raise ValueError(f"{self.path}: no namespace or prefix")
        return ns.group(1), pfx.group(1)


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
    "ietf-netconf-monitoring": "pyangbind cannot map instance-identifier; the agent builds "
    "its state as XML and tests check it with yanglint",
    "sdqkd-qrng": "notifications only (no data to bind); agents/events.py builds them as XML "
    "and tests check them with yanglint",
}

_INIT = '''"""Python classes generated from yang/ by pyangbind (`make bindings`).

Generated, never edited by hand: tests/test_bindings.py regenerates them and fails
on any difference.
"""
'''


def modules() -> dict[str, YangModule]:
    """All modules in yang/, by name."""
    found: dict[str, YangModule] = {}
    for path in sorted(YANG_DIR.glob("*.yang")):
        m = _FILE_RE.match(path.name)
        if not m:
            raise ValueError(f"{path}: not a 'name@revision.yang' file name")
        found[m["name"]] = YangModule(m["name"], m["rev"], path)
    return found


def imports(module: YangModule) -> list[str]:
    """Names of the modules `module` imports."""
    return re.findall(r"^\s*import\s+([A-Za-z0-9_.-]+)", module.path.read_text(encoding="utf-8"), re.M)


def module_path(name: str) -> Path:
    """The file of module `name`."""
    return modules()[name].path


def pyang_command(*args: str) -> list[str]:
    """pyang from this environment, with yang/ as the only search path."""
    pyang = Path(sys.executable).with_name("pyang")
    exe = [str(pyang)] if pyang.exists() else [sys.executable, "-m", "pyang"]
    return [*exe, "-p", str(YANG_DIR), *args]


def _pybind_plugin_dir() -> str:
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
