"""The YANG modules sdqkd ships (yang/): names, revisions, imports, and pyang over them.

Every consumer (the runtime engine, NETCONF capabilities and <get-schema>, the bindings
generator in sdqkd/bindgen.py, the tests) reads the module list from here.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path


YANG_DIR = Path(__file__).resolve().parent.parent / "yang"

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
