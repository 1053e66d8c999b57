"""Bringing up a large lab, and what an idle agent costs (issue 14, item 4): an N-node ring
(default 30; each node a KMS with one SAE and two HEQA DV O-band modules, one per
neighbour, 3 dB fibres) brought up with `sdqkd lab up` in-process (launcher.up: PKI,
configs, N agents, the controller, N channels ACTIVE), timed per stage; then, after the
lab settles, every agent's resident memory (VmRSS) and CPU share while idle. The same-run
baseline is the 3-node cloud lab without hosts brought up the same way (per-node cost);
targets are the issue's: bring-up < 25 s for 30 nodes (67 s measured before libyang),
idle agent <= 60 MB RSS (~110 MB before).

    .venv/bin/python bench/labscale.py [--nodes 30] [--settle 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sdqkd.lab import launcher

ROOT = Path(__file__).resolve().parent.parent
console = Console()
BRINGUP_TARGET_S, RSS_TARGET_MB = 25.0, 60.0
RECORDED = {"bring-up 30 nodes (s)": 67.0, "idle agent RSS (MB)": 110.0}


def ring(n: int) -> dict:
    cloud = json.loads((ROOT / "lab" / "topologies" / "cloud.json").read_text())["sdqkd-lab:lab"]
    profile = next(p for p in cloud["profile"] if p["name"] == "heqa-dv-o")
    names = [f"N{i:02d}" for i in range(n)]
    nodes = [{"name": nm, "kms": True, "sae": [{"id": f"sae-{nm.lower()}"}],
              "qkd-interface": [{"id": 1, "profile": "heqa-dv-o", "role": "etsi-qkd-node-types:TRANSMITTER"},
                                {"id": 2, "profile": "heqa-dv-o", "role": "etsi-qkd-node-types:RECEIVER"}]} for nm in names]
    fibres, links = [], []
    for i, a in enumerate(names):
        b = names[(i + 1) % n]
        fibres.append({"name": f"f-{a}-{b}", "a-end": {"node": a}, "b-end": {"node": b}, "length": "10.0", "loss": "3.0"})
        links.append({"name": f"{a}-{b}", "endpoints": [f"{a}:1", f"{b}:2"], "path": [f"f-{a}-{b}"], "loss": "3.0"})
    return {"sdqkd-lab:lab": {"name": f"ring{n}", "description": f"{n}-node ring for bench/labscale.py",
                              "defaults": {"address": "127.0.0.1"}, "profile": [profile], "node": nodes,
                              "fibre": fibres, "link": links}}


def small() -> dict:
    lab = json.loads((ROOT / "lab" / "topologies" / "cloud.json").read_text())
    lab["sdqkd-lab:lab"]["name"] = "cloud-nohost"
    for node in lab["sdqkd-lab:lab"]["node"]:
        node.pop("host", None)
    return lab


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bring_up(topology: dict, tmp: Path, settle: float) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{topology['sdqkd-lab:lab']['name']}.json"
    path.write_text(json.dumps(topology))
    root = tmp / "lab"
    t = time.perf_counter()
    data = launcher.up(path, root, free_ports=True, console=Console(file=open(os.devnull, "w")))
    took = time.perf_counter() - t
    try:
        time.sleep(settle)
        pids = [n["pid"] for n in data["nodes"]]
        cpu0 = {p: _cpu_s(p) for p in pids}
        time.sleep(5.0)
        cpu = [(_cpu_s(p) - cpu0[p]) / 5.0 * 100 for p in pids]
        rss = [_rss_mb(p) for p in pids]
        ctl = _rss_mb(data["controller"]["pid"])
    finally:
        launcher.down(data["name"], root)
    return {"nodes": len(pids), "bring-up s": took, "rss": rss, "cpu": cpu, "controller rss": ctl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after bring-up before measuring idle")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = bring_up(small(), Path(tmp) / "small", args.settle)
        big = bring_up(ring(args.nodes), Path(tmp) / "big", args.settle)
    table = Table(title=f"lab bring-up and idle agents, same run (3-node baseline, {args.nodes}-node ring)")
    for col in ("lab", "nodes", "bring-up s", "s per node", "agent RSS MB median/max", "agent CPU % median/max",
                "controller RSS MB"):
        table.add_column(col)
    for name, r in (("cloud, no hosts [baseline]", base), (f"ring of {args.nodes}", big)):
        table.add_row(name, str(r["nodes"]), f"{r['bring-up s']:.1f}", f"{r['bring-up s'] / r['nodes']:.2f}",
                      f"{statistics.median(r['rss']):.0f} / {max(r['rss']):.0f}",
                      f"{statistics.median(r['cpu']):.1f} / {max(r['cpu']):.1f}", f"{r['controller rss']:.0f}")
    console.print(table)
    per_node = (big["bring-up s"] / big["nodes"]) / (base["bring-up s"] / base["nodes"])
    console.print(f"per-node bring-up cost, ring vs baseline: {per_node:.2f}x")
    console.print(f"bring-up: {big['bring-up s']:.1f} s for {args.nodes} nodes (target < {BRINGUP_TARGET_S:.0f} s; "
                  f"recorded before libyang: {RECORDED['bring-up 30 nodes (s)']:.0f} s): "
                  f"{'met' if big['bring-up s'] < BRINGUP_TARGET_S else 'missed'}")
    rss = statistics.median(big["rss"])
    console.print(f"idle agent RSS: median {rss:.0f} MB (target <= {RSS_TARGET_MB:.0f} MB; recorded before: "
                  f"~{RECORDED['idle agent RSS (MB)']:.0f} MB): {'met' if max(big['rss']) <= RSS_TARGET_MB else 'missed'}")


if __name__ == "__main__":
    main()
