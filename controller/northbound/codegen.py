"""The one way sdqkd_pb2.py / sdqkd_pb2_grpc.py are made from sdqkd.proto.

Same shape as sdqkd.yangmodels for bindings/: `generate()` writes the files,
`drift()` says how the checked-in files differ from a fresh generation (the drift
test runs it). Output is deterministic for a given grpcio-tools version (pinned in
setup.cfg); the only post-processing (_FIXES) makes the generated gRPC module import its messages
package-relatively (protoc writes `import sdqkd_pb2`, which only works when this
folder is on sys.path) and gives the message classes their real module name.
"""
from __future__ import annotations

import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "sdqkd.proto"
OUTPUTS = ("sdqkd_pb2.py", "sdqkd_pb2_grpc.py")

PACKAGE = "sdqkd.controller.northbound"

# (file, what protoc writes, what we keep): each must occur exactly once.
_FIXES = (
    # the gRPC module imports its messages from this package, not from sys.path
    ("sdqkd_pb2_grpc.py", "import sdqkd_pb2 as sdqkd__pb2\n", "from . import sdqkd_pb2 as sdqkd__pb2\n"),
    # message classes report their real module (repr, pickle)
    ("sdqkd_pb2.py", "BuildTopDescriptorsAndMessages(DESCRIPTOR, 'sdqkd_pb2', _globals)",
     f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PACKAGE}.sdqkd_pb2', _globals)"),
)


def _postprocess(name: str, text: str) -> str:
    """Apply _FIXES; fail loudly if protoc's output no longer has the expected line."""
    for file, old, new in _FIXES:
        if file == name:
            if text.count(old) != 1:
                raise RuntimeError(f"protoc's {name} no longer contains {old.strip()!r}")
            text = text.replace(old, new)
    return text


def protoc(*args: str) -> subprocess.CompletedProcess[str]:
    """grpc_tools' bundled protoc (with the well-known types on its include path)."""
    return subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], capture_output=True, text=True)


def expected_files(proto: Path = PROTO) -> dict[str, str]:
    """What the generated files must contain, file name -> text."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = protoc(f"-I{proto.parent}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", proto.name)
        if proc.returncode != 0:
            raise RuntimeError(f"protoc failed for {proto.name}:\n{proc.stderr}")
        return {name: _postprocess(name, (Path(tmp) / name).read_text(encoding="utf-8")) for name in OUTPUTS}


def generate(target: Path = HERE) -> list[str]:
    """Write the generated modules into `target`; return the names written."""
    files = expected_files()
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8")
    return sorted(files)


def drift(target: Path = HERE) -> list[str]:
    """Unified diffs between `target`'s generated modules and a fresh generation; empty when in sync."""
    problems: list[str] = []
    for name, text in expected_files().items():
        path = target / name
        have = path.read_text(encoding="utf-8") if path.exists() else ""
        if have != text:
            diff = difflib.unified_diff(have.splitlines(True), text.splitlines(True),
                                        f"controller/northbound/{name}", f"generated/{name}", n=1)
            problems.append("".join(list(diff)[:40]) or f"controller/northbound/{name}: differs")
    return problems


if __name__ == "__main__":
    for written in generate():
        print(f"wrote controller/northbound/{written}")
