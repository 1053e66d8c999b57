"""NIST SP 800-90B health tests of a binary noise source, on its raw samples before
conditioning: the continuous Repetition Count Test (4.4.1) and Adaptive Proportion
Test (4.4.2), also run as the start-up tests (4.3) over the first 1024 samples after
power-on or repair, before any output.

Both cutoffs follow from the assessed min-entropy H per sample and the false-positive
probability alpha, exactly as the standard defines them:
- RCT: C = 1 + ceil(-log2(alpha) / H); a run of C identical samples fails.
- APT: window W = 1024 (binary samples), C = 1 + CRITBINOM(W, 2^-H, 1 - alpha), the
  smallest count whose binomial tail is at most alpha; C samples equal to the window's
  first one fail.

`HealthTap` hooks them into the QRNG driver (`Qrng.add_raw_tap(tap, health=True)`):
on a failure it calls `report_failure` with which test, its cutoff and the count seen,
and the driver refuses output until repair() and a passing start-up run.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# alpha = 2^-40, the low end of the standard's range (2^-20 to 2^-40). alpha is a
# probability per sample: at 2^-20 a healthy emulated QRNG making ~12 M raw samples/s
# would raise about ten false alarms a second (measured: one per 4-14 M samples); at
# 2^-40, about one a day. The standard's own tables (alpha = 2^-20) are checked in tests.
ALPHA_LOG2 = 40
STARTUP_SAMPLES = 1024     # 4.3: start-up tests over at least 1024 consecutive samples
BINARY_WINDOW, WINDOW = 1024, 512
RETRY_AFTER = 0.02         # seconds from a failure to the next start-up run


def rct_cutoff(h: float, alpha_log2: int = ALPHA_LOG2) -> int:
    """Repetition Count Test cutoff for min-entropy h (bits per sample), alpha = 2^-alpha_log2."""
    if not 0 < h <= 64:
        raise ValueError("min-entropy must be in (0, 64]")
    return 1 + math.ceil(alpha_log2 / h)


def apt_cutoff(h: float, window: int = BINARY_WINDOW, alpha_log2: int = ALPHA_LOG2) -> int:
    """Adaptive Proportion Test cutoff: 1 + the smallest c with P(X <= c) >= 1 - alpha,
    X ~ Binomial(window, 2^-h). The tail is summed from the top in log space, so it is
    exact to float precision without 1 - (1 - tiny) cancellation."""
    if not 0 < h <= 64:
        raise ValueError("min-entropy must be in (0, 64]")
    p = 2.0 ** -h
    if p >= 1.0:
        return window + 1
    lp, lq, lw = math.log(p), math.log1p(-p), math.lgamma(window + 1)
    alpha = 2.0 ** -alpha_log2
    tail = 0.0  # P(X > c)
    for c in range(window, -1, -1):
        term = math.exp(lw - math.lgamma(c + 1) - math.lgamma(window - c + 1) + c * lp + (window - c) * lq)
        if tail + term > alpha:  # P(X > c - 1) > alpha: c is the smallest with CDF(c) >= 1 - alpha
            return 1 + c
        tail += term
    return 1


@dataclass(frozen=True)
class Failure:
    test: str      # "repetition-count" | "adaptive-proportion"
    phase: str     # "start-up" | "continuous"
    cutoff: int
    observed: int  # the run length / window count that reached the cutoff
    window: int | None
    min_entropy: float

    @property
    def message(self) -> str:
        what = (f"{self.observed} identical samples in a row" if self.test == "repetition-count"
                else f"{self.observed} of {self.window} samples equal to the window's first")
        return f"SP 800-90B {self.test} test failed ({self.phase}): {what}, cutoff {self.cutoff}"

    def details(self) -> dict[str, Any]:
        return {"test": self.test, "phase": self.phase, "cutoff": self.cutoff, "observed": self.observed,
                "window": self.window, "min_entropy": self.min_entropy}


class HealthTests:
    """RCT and APT over one stream of binary samples, fed in chunks of any size.

    Vectorised with numpy: a chunk costs a few array passes, so the tests keep up with
    millions of raw samples per second. After a failure they stop (the source is
    FAILED) until `restart()`."""

    def __init__(self, h: float, window: int = BINARY_WINDOW, alpha_log2: int = ALPHA_LOG2) -> None:
        self.h, self.window, self.alpha_log2 = h, window, alpha_log2
        self.rct_c, self.apt_c = rct_cutoff(h, alpha_log2), apt_cutoff(h, window, alpha_log2)
        self.restart()

    def restart(self) -> None:
        """Power-on or repair: the start-up tests run again on the next samples."""
        self.seen = 0
        self.failure: Failure | None = None
        self._run_value, self._run = -1, 0        # RCT: A and B
        self._win_value, self._win_count, self._win_pos = -1, 0, 0  # APT: A, B, samples seen in the window

    @property
    def ready(self) -> bool:
        """The start-up tests passed and nothing failed since."""
        return self.failure is None and self.seen >= STARTUP_SAMPLES

    def feed(self, bits: np.ndarray) -> Failure | None:
        """Test the next samples (uint8 0/1, in time order); the failure, if one tripped now."""
        if self.failure is not None or len(bits) == 0:
            return None
        phase = "start-up" if self.seen < STARTUP_SAMPLES else "continuous"
        found = self._rct(bits) or self._apt(bits)
        self.seen += len(bits)
        if found is not None:
            test, observed = found
            self.failure = Failure(test, phase, self.rct_c if test == "repetition-count" else self.apt_c,
                                   observed, None if test == "repetition-count" else self.window, round(self.h, 6))
        return self.failure

    def _rct(self, bits: np.ndarray) -> tuple[str, int] | None:
        starts = np.flatnonzero(np.diff(bits)) + 1  # where a new run begins
        bounds = np.concatenate(([0], starts, [len(bits)]))
        runs = np.diff(bounds)
        if bits[0] == self._run_value:
            runs[0] += self._run  # the first run continues the last chunk's
        worst = int(runs.max())
        if worst >= self.rct_c:
            return "repetition-count", worst
        self._run_value, self._run = int(bits[-1]), int(runs[-1])
        return None

    def _apt(self, bits: np.ndarray) -> tuple[str, int] | None:
        w, i = self.window, 0
        if self._win_pos:  # finish the open window
            take = bits[: w - self._win_pos]
            self._win_count += int(np.count_nonzero(take == self._win_value))
            self._win_pos += len(take)
            i = len(take)
            if self._win_count >= self.apt_c:
                return "adaptive-proportion", self._win_count
            if self._win_pos == w:
                self._win_pos = 0
        full = (len(bits) - i) // w
        if full:
            wins = bits[i:i + full * w].reshape(full, w)
            counts = np.count_nonzero(wins == wins[:, :1], axis=1)
            worst = int(counts.max())
            if worst >= self.apt_c:
                return "adaptive-proportion", worst
            i += full * w
        if i < len(bits):  # open a new window with the rest
            rest = bits[i:]
            self._win_value, self._win_count, self._win_pos = int(rest[0]), int(np.count_nonzero(rest == rest[0])), len(rest)
            if self._win_count >= self.apt_c:
                return "adaptive-proportion", self._win_count
        return None


class HealthTap:
    """The tests on a QRNG driver's raw stream (packed bits, first sample = MSB).

    After a failure the source is FAILED and the tap reruns the start-up tests on fresh
    raw samples every RETRY_AFTER seconds (and at once on repair): a stuck or biased
    source fails them again and stays FAILED (one alarm, not one per retry); a false
    alarm, which a healthy source raises at the rate alpha allows, ends when they pass
    (SP 800-90B 4.3 lets the developer treat such intermittent failures this way)."""

    def __init__(self, qrng: Any, h: float) -> None:
        self.qrng = qrng
        self.tests = HealthTests(h)
        self._lock = threading.Lock()
        self._retesting = False
        self._timer: threading.Timer | None = None
        self.samples = 0  # raw samples tested since power-on
        self.passed_at: float | None = None  # when the start-up tests last passed (Unix s)
        qrng.add_raw_tap(self, health=True)

    def describe(self) -> dict[str, Any]:
        """Cutoffs, samples tested and the last start-up pass, for the operational state."""
        t = self.tests
        with self._lock:
            return {"min_entropy": round(t.h, 6), "alpha_log2": t.alpha_log2, "samples": self.samples,
                    "passed_at": self.passed_at if t.ready else None,
                    "cutoffs": {"repetition-count": (t.rct_c, None), "adaptive-proportion": (t.apt_c, t.window)}}

    @property
    def ready(self) -> bool:
        return self.tests.ready

    def restart(self) -> None:
        """Power-on: the start-up tests run on the first samples the source makes."""
        with self._lock:
            self.tests.restart()
            self._retesting = False
            self.samples, self.passed_at = 0, None

    def retest(self) -> None:
        """Start-up tests now, on fresh samples drawn in the device's raw mode; the tap
        reports the recovery if they pass, the failure (and schedules a retry) if not."""
        with self._lock:
            self.tests.restart()
            self._retesting = True
        try:
            self.qrng.read_raw(STARTUP_SAMPLES // 8, timeout=5.0)
        except (OSError, TimeoutError):  # the source was closed: no more retries
            pass

    def __call__(self, raw: bytes) -> None:
        with self._lock:
            was_ready = self.tests.ready
            failure = self.tests.feed(np.unpackbits(np.frombuffer(raw, dtype=np.uint8)))
            self.samples += 8 * len(raw)
            if self.tests.ready and not was_ready:
                self.passed_at = time.time()
            recovered = self._retesting and self.tests.ready
            if recovered:
                self._retesting = False
        if failure is not None:  # outside our lock: the driver takes its own
            self.qrng.report_failure(failure.message, **failure.details())
            self._schedule_retry()
        elif recovered:
            self.qrng.report_recovered("start-up health tests passed")

    def _schedule_retry(self) -> None:
        with self._lock:
            if self._timer is not None and self._timer.is_alive():
                return
            self._timer = threading.Timer(RETRY_AFTER, self._retry)
            self._timer.daemon = True
            self._timer.start()

    def _retry(self) -> None:
        with self._lock:
            failed = self.tests.failure is not None
        if failed:  # not repaired (and retested) meanwhile
            self.retest()
