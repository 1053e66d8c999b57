"""Cost of the SP 800-90B health tests (agents/emulation/health.py) on the emulated QRNG.

Measures, in the same run: the health tests alone on raw samples (samples/s), and
`Qrng.read` output with and without the health tap on a device whose modelled rate is
set far above what Python can produce (so the sampler and conditioning, not the token
bucket, are the limit): the ratio says what the tests cost the source, false alarms
(alpha = 2^-40 per sample: rare now) and their start-up reruns included. The lab's QRNG runs at
4 Mbit/s of output, i.e. 12 M raw samples/s to test.

    .venv/bin/python bench/qrng_health.py [--seconds 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from sdqkd.agents.emulation.health import HealthTap, HealthTests
from sdqkd.agents.drivers.qrng import RAW_PER_BLOCK, BLOCK_BITS, NoiseModel, Qrng, QrngFailure


def tests_alone(seconds: float) -> float:
    """Raw samples per second through RCT + APT, in 768 * 64-sample chunks."""
    model = NoiseModel(0.02, 0.1)
    chunk = 768 * 64
    raw = [np.unpackbits(np.frombuffer(model.samples(chunk).to_bytes(chunk // 8, "big"), dtype=np.uint8))
           for _ in range(16)]
    t, n, t0 = HealthTests(model.min_entropy()), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for r in raw:
            if t.feed(r) is not None:
                t.restart()
            n += len(r)
    return n / (time.perf_counter() - t0)


def read_rate(seconds: float, health: bool, size: int) -> tuple[float, int]:
    """Output bytes per second of Qrng.read(size), and the health tests' false alarms
    (each costs the reads until the start-up rerun clears it, RETRY_AFTER later)."""
    q = Qrng("bench", "emulated", rate=1e10, fifo_bits=1 << 24)
    if health:
        HealthTap(q, q.min_entropy())
    q.open(lambda e: None)
    n, alarms, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            n += len(q.read(size, timeout=None))
        except QrngFailure:
            alarms += 1
            while q.state()["qrng"]["status"] != "ENABLED":
                time.sleep(0.005)
    return n / (time.perf_counter() - t0), alarms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    table = Table(title="SP 800-90B health tests on the emulated QRNG")
    for col in ("what", "rate", "ratio", "false alarms"):
        table.add_column(col, justify="right" if col != "what" else "left")
    s = tests_alone(args.seconds)
    table.add_row("health tests alone", f"{s / 1e6:.1f} M samples/s", f"{s / 12e6:.1f}x the lab QRNG's raw rate", "")
    for size in (32, 4096):
        base, _ = read_rate(args.seconds, False, size)
        tested, alarms = read_rate(args.seconds, True, size)
        raw = tested * args.seconds * 8 * RAW_PER_BLOCK / BLOCK_BITS
        table.add_row(f"read({size}) without tests", f"{8 * base / 1e6:.2f} Mbit/s", "1.00", "")
        table.add_row(f"read({size}) with tests", f"{8 * tested / 1e6:.2f} Mbit/s", f"{tested / base:.2f}",
                      f"{alarms} in {raw / 1e6:.0f} M samples")
    Console().print(table)


if __name__ == "__main__":
    main()
