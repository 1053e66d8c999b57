"""Building pyangbind objects: pyangbind 0.8.7's own factories (a class per object)
against sdqkd.fastbind (classes cached per shape), in the same run. Builds the
sample ETSI 015 node of tests/samples.py N times, keeping the last 16 alive (as an
agent keeps a few decoded entries), after gc.freeze() (as an agent does), and counts
the cyclic GC's collections and pauses per generation: the full (gen2) passes were
the agents' p99 spikes.

    .venv/bin/python bench/bindings_build.py [--n 100]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

import samples  # noqa: E402
from sdqkd import fastbind  # noqa: E402
from latency import p50_p99_ms  # noqa: E402  (bench/ is on sys.path when run as a script)


def measure(factory: Any, n: int) -> dict[str, Any]:
    samples.etsi_qkd_sdn_node = factory
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    gc.collect()
    gc.callbacks.append(on_gc)
    kept: list[Any] = []
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            kept.append(samples.populated_node())
            times.append(time.perf_counter() - t)
            if len(kept) > 16:
                kept.pop(0)
    finally:
        gc.callbacks.remove(on_gc)
    return {"times": times, "pauses": pauses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="sample nodes built per build")
    args = ap.parse_args()
    reference = fastbind.pyangbind_build("etsi_qkd_sdn_node").etsi_qkd_sdn_node
    fast = samples.etsi_qkd_sdn_node
    gc.freeze()
    runs = {"pyangbind 0.8.7 [baseline]": measure(reference, args.n), "sdqkd.fastbind": measure(fast, args.n)}
    base = statistics.median(runs["pyangbind 0.8.7 [baseline]"]["times"])
    table = Table(title=f"Sample ETSI 015 node built {args.n} times (tests/samples.py), same run")
    for col in ("build", "p50 ms", "p99 ms", "vs baseline", "gen0 GCs", "gen1 GCs", "gen2 GCs", "gen2 max pause ms"):
        table.add_column(col)
    for label, r in runs.items():
        p50, p99 = p50_p99_ms(r["times"])
        p = r["pauses"]
        table.add_row(escape(label), f"{p50:.2f}", f"{p99:.2f}", f"{p50 / 1000 / base:.2f}x", str(len(p[0])), str(len(p[1])), str(len(p[2])),
                      f"{max(p[2], default=0.0) * 1000:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
