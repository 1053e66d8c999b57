"""How fast keys flow again after failures, on the MadQCI lab, in one run: a fibre cut, a
transit node's death (kill -9), an agent restart, and the move back onto the better path
once the fibre is spliced or the node is back.

An application (ETSI 014, SAE of Norte -> SAE of Distrito) takes a 128-bit key every
250 ms the whole time: more than the slow detour carries with the relay's MAC keys, so
requests fail while on the detour; the move back is judged by the requests that fail
around the moment the path switches. Norte - Concepcion - Distrito is the fast path (~240 kb/s);
Norte - Distrito directly is the slow detour (~1.4 kb/s). For each event the bench
prints the time from the event to the first key after it (0 when no request failed),
the failed requests, and, for the returns, the time until the application's path is the
fast one again and how many requests failed meanwhile (target: none).

    .venv/bin/python bench/recovery.py [--topology lab/topologies/madqci.json]

Targets on 2 cores: fibre cut < 2 s, node death < 5 s, agent restart < 10 s, no key
request failing during a move back.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.keysource import KeySourceError
from sdqkd.lab import failures, keys, launcher

MASTER, SLAVE = "Norte", "Distrito"
FAST_VIA = "Concepcion"
FIBRE = "f-concepcion-norte"


@dataclass
class Probe:
    """Takes a key every `period` seconds and records (time, ok)."""

    lab: dict
    period: float = 0.25
    log: list[tuple[float, bool]] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                keys.get(self.lab, MASTER, SLAVE, size=128, wait=0)
                ok = True
            except (KeySourceError, OSError) as exc:
                ok = False
                why = str(exc)[:90]
                self.reasons[why] = self.reasons.get(why, 0) + 1
            self.log.append((t, ok))
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t)))

    def start(self) -> None:
        threading.Thread(target=self.run, daemon=True, name="probe").start()

    def stop(self) -> None:
        self._stop.set()

    def since(self, t0: float, until: float | None = None) -> list[tuple[float, bool]]:
        return [(t, ok) for t, ok in self.log if t >= t0 and (until is None or t < until)]


def recovery(probe: Probe, t0: float, timeout: float = 60.0) -> tuple[float | None, int]:
    """(seconds from t0 to the first key after the first failure, or 0 if none failed;
    failed requests), waiting at most `timeout`."""
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        seen = probe.since(t0)
        failed = [t for t, ok in seen if not ok]
        if failed:
            after = [t for t, ok in seen if ok and t > failed[0]]
            if after:
                return after[0] - t0, sum(1 for t, ok in seen if not ok and t < after[0])
        elif seen and time.monotonic() - t0 > 3.0:
            return 0.0, 0
        time.sleep(0.05)
    return None, len([1 for _, ok in probe.since(t0) if not ok])


def on_fast_path(stub, names: dict[str, str]) -> bool:
    apps = stub.ListApplications(pb.ListApplicationsRequest(), timeout=5).applications
    for app in apps:
        for path in app.paths:
            hops = [names.get(n.qkdn_id, n.name) for n in path.nodes]
            if hops and hops[0] == MASTER and hops[-1] == SLAVE:
                return FAST_VIA in hops
    return False


def back_on_fast_path(probe: Probe, stub, names: dict[str, str], t0: float,
                      timeout: float = 90.0) -> tuple[float | None, int, int]:
    """(seconds from t0 until the application's path is the fast one again; requests that
    failed before that, on the detour; requests that failed from 0.3 s before the switch
    was seen (the path is polled every 100 ms) to 2 s after it: the move's own failures)."""
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if on_fast_path(stub, names):
            t = time.monotonic()
            time.sleep(2.0)
            before = sum(1 for tt, ok in probe.since(t0, t - 0.3) if not ok)
            during = sum(1 for tt, ok in probe.since(t - 0.3, t + 2.0) if not ok)
            return t - t0, before, during
        time.sleep(0.1)
    return None, sum(1 for _, ok in probe.since(t0) if not ok), 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default=str(Path(__file__).resolve().parent.parent / "lab/topologies/madqci.json"))
    args = ap.parse_args()
    console = Console(stderr=True)
    root = Path(tempfile.mkdtemp(prefix="sdqkd-recovery-"))
    lab = launcher.up(Path(args.topology), root, free_ports=True, console=console)
    name = lab["name"]
    rows: list[tuple[str, str, str, str]] = []
    probe = Probe(lab)
    try:
        keys.get(lab, MASTER, SLAVE, wait=60)  # the controller makes the application
        stub = launcher.controller_stub(lab["controller"])
        names = {n.qkdn_id: n.name for n in stub.GetTopology(pb.GetTopologyRequest(), timeout=5).topology.nodes}
        if not on_fast_path(stub, names):
            console.print("[yellow]the application is not on the fast path at the start")
        probe.start()
        time.sleep(2.0)

        def row(what: str, result: tuple[float | None, int], target: str) -> None:
            secs, failed = result
            rows.append((what, "never" if secs is None else f"{secs:.2f}", str(failed), target))

        def move_row(what: str, result: tuple[float | None, int, int]) -> None:
            secs, before, during = result
            rows.append((what, "never" if secs is None else f"{secs:.2f}",
                         f"{during} during the move ({before} before it, on the detour)", "0 during the move"))

        t0 = time.monotonic()
        failures.cut(FIBRE, name, root)
        row(f"fibre cut ({FIBRE})", recovery(probe, t0), "< 2 s")
        time.sleep(2.0)
        t0 = time.monotonic()
        failures.cut(FIBRE, name, root, splice=True)
        move_row("back on the fast path after the splice", back_on_fast_path(probe, stub, names, t0))

        time.sleep(2.0)
        t0 = time.monotonic()
        failures.kill(FAST_VIA, name, root)
        row(f"transit node death ({FAST_VIA}, kill -9)", recovery(probe, t0), "< 5 s")
        time.sleep(2.0)
        t0 = time.monotonic()
        failures.start(FAST_VIA, name, root)
        move_row("back on the fast path after the node returns", back_on_fast_path(probe, stub, names, t0))

        time.sleep(2.0)
        t0 = time.monotonic()
        failures.kill(FAST_VIA, name, root)
        failures.start(FAST_VIA, name, root)
        row(f"agent restart ({FAST_VIA}: kill -9, start)", recovery(probe, t0), "< 10 s")
        probe.stop()
    finally:
        launcher.down(name, root)
    table = Table(title=f"Recovery on {name}: keys {MASTER} -> {SLAVE}, one request every 250 ms")
    for col in ("event", "seconds until keys flow / path is back", "failed requests", "target"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    for why, n in sorted(probe.reasons.items(), key=lambda x: -x[1]):
        print(f"  {n:4d} x {why}")


if __name__ == "__main__":
    sys.exit(main())
