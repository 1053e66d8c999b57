"""The lab as an operator runs it: `lab up` on the shipped topologies (real agent and
controller processes), a key relayed end to end through ETSI 014 with both ends
holding the same key, `lab status`, `lab down` leaving no process behind."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from sdqkd.keysource import KeySourceError
from sdqkd.lab import keys, launcher, plot
from sdqkd.lab import labjson
from testlib import REPO

TOPOLOGIES = REPO / "lab" / "topologies"


def _alive(pid: int) -> bool:
    return launcher.is_lab_process(pid)


@pytest.mark.parametrize("name, src, dst, hops", [
    ("madqci", "Quintin", "Distrito", 4),  # across the RM/TID border
    ("cloud", "CAIT", "Rectorado", 2),  # through CCS
])
def test_lab_up_key_down(tmp_path, name, src, dst, hops) -> None:
    console = Console(file=open(os.devnull, "w"))
    data = launcher.up(TOPOLOGIES / f"{name}.json", root=tmp_path, free_ports=True, console=console)
    pids = [n["pid"] for n in data["nodes"]] + [data["controller"]["pid"]]
    try:
        assert labjson.find(name, tmp_path) == tmp_path / name / "lab.json"
        st = launcher.status(name, tmp_path)
        assert all(n["up"] for n in st["nodes"]) and st["links"]
        assert all(lk["status"] == "ACTIVE" and lk["skr_kbps"] > 0 for lk in st["links"])
        res = keys.get(data, src, dst)  # raises unless both ends return the same key
        assert len(res.key) == 32
        again = keys.get(data, src, dst)
        assert again.key_id != res.key_id and again.key != res.key
        if name == "madqci":  # Quiron has no QKD link: no key path, said at once with wait=0
            with pytest.raises(KeySourceError, match="HTTP 503 no key path"):
                keys.get(data, src, "Quiron", wait=0)
        # the controller built the path over the relay nodes: it is in the agents' running config
        png = plot.plot(data, tmp_path / "topology.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        log = Path(data["controller"]["log"]).read_text()
        assert f"-> sae-{dst.lower()}) over {src}" in log and log.count("-") >= hops
    finally:
        launcher.down(name, tmp_path)
    assert not any(_alive(p) for p in pids)
    with pytest.raises(FileNotFoundError):
        labjson.find(name, tmp_path)
