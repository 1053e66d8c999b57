"""A lab's files are for its owner only (issue 17 item 3): after `lab up` and a key
relayed end to end, nothing under the lab directory (key stores and their WAL, the
plant and controller stores, configs with the NETCONF password, password hashes and the
service key, private keys, running configs, logs, lab.json) is group/world readable, and
no directory there is group/world accessible, even when `lab up` runs under umask 022."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from rich.console import Console

from sdqkd.lab import failures, keys, launcher
from test_lab_cli import small_lab


def _loose(root: Path) -> list[str]:
    """Entries under `root` (and root itself) with any group or other permission bit."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_IMODE(st.st_mode) & 0o077 and not stat.S_ISLNK(st.st_mode):
                out.append(f"{p.relative_to(root.parent)} {oct(stat.S_IMODE(st.st_mode))}")
    return sorted(set(out))


def test_a_lab_directory_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a shell's default: what is not created private would be 0644/0755
    try:
        topo = small_lab(tmp_path / "p.json", "private")
        data = launcher.up(topo, root=tmp_path / "labs", free_ports=True, console=Console(file=open(os.devnull, "w")))
    finally:
        os.umask(old)
    lab_dir = Path(data["dir"])
    try:
        res = keys.get(data, "CAIT", "Rectorado")  # a key relayed and delivered: stores with their WAL
        assert len(res.key) == 32
        files = {p.relative_to(lab_dir).as_posix() for p in lab_dir.rglob("*") if p.is_file()}
        for expected in ("lab.json", "controller.json", "plant.sqlite", "controller/controller.sqlite",
                         "nodes/CAIT/agent.json", "nodes/CAIT/state/keys.sqlite", "nodes/CAIT/state/keys.sqlite-wal",
                         "nodes/CAIT/ssh_host_ed25519_key", "nodes/CAIT/agent.log", "controller.log"):
            assert expected in files, sorted(files)
        assert any(f.endswith(".key") for f in files) and any("running" in f for f in files)
        assert _loose(lab_dir) == []

        # a lab an older version brought up (files 0644, directories 0755), a node restarted:
        # `lab start` tightens the lab directory, the agent its state, before anything runs
        failures.kill("Rectorado", "private", tmp_path / "labs")
        for dirpath, dirnames, filenames in os.walk(lab_dir):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(Path(dirpath) / f, 0o644)
        assert len(_loose(lab_dir)) > 50
        failures.start("Rectorado", "private", tmp_path / "labs")
        assert keys.get(data, "CAIT", "Rectorado").key
        assert _loose(lab_dir) == []
    finally:
        launcher.down("private", tmp_path / "labs")
    assert _loose(lab_dir) == []
