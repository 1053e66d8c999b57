"""Provisioning over NETCONF and RESTCONF (issue 19, item 3): a DV line A - B - C of real
agents and an in-process Controller, the two links ACTIVE; N times create_application
A -> C (relay computation and one transaction over the three hops) and
delete_application, first with every node managed over NETCONF, then with B over RESTCONF.
Prints p50/p99 per operation and of each transaction phase on B.

    .venv/bin/python bench/southbound.py [--n 30]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labrun import running_lab  # noqa: E402  (also puts tests/ on sys.path)
from labnets import line_topology  # noqa: E402
from latency import p50_p99_ms  # noqa: E402
from sdqkd.controller.provisioning import txn  # noqa: E402


def run(n: int, southbound: dict[str, str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create": [], "delete": []}
    topo = line_topology("sb", ["A", "B", "C"], southbound=southbound, **{"link-key-limit": 3000})
    with running_lab(topo, "sdqkd-bench-southbound-") as lab:
        b = lab.ids["B"]
        original = txn.apply

        def timed_apply(plan, conns, **kw):  # noqa: ANN001, ANN003, ANN202 - records B's phases
            report = original(plan, conns, **kw)
            for phase, per in report.hops.items():
                if "B" in per and b in plan.edits:
                    out.setdefault(f"B {phase}", []).append(per["B"])
            return report

        txn.apply = timed_apply
        try:
            for _ in range(n):
                t = time.perf_counter()
                app = lab.ctl.create_application("sae-a", "sae-c")
                out["create"].append(time.perf_counter() - t)
                t = time.perf_counter()
                lab.ctl.delete_application(app.app_id)
                out["delete"].append(time.perf_counter() - t)
        finally:
            txn.apply = original
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    for label, sb in (("B over NETCONF", {}), ("B over RESTCONF", {"B": "restconf"})):
        res = run(args.n, sb)
        print(label)
        for op, xs in res.items():
            p50, p99 = p50_p99_ms(xs)
            print(f"  {op:<12} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  (n={len(xs)})")


if __name__ == "__main__":
    main()
