"""NIST SP 800-90B health tests (RCT, APT, start-up) on the QRNG's raw samples: exact
cutoffs, stuck and biased sources trip them, a good source raises false alarms no more
often than the standard's alpha, and the driver withholds output around a failure."""
from __future__ import annotations

import math
import os
import time
from fractions import Fraction

import numpy as np
import pytest

from sdqkd.agents.drivers.base import Event
from sdqkd.agents.emulation.health import (RETRY_AFTER, STARTUP_SAMPLES, HealthTap, HealthTests, apt_cutoff,
                                         rct_cutoff)
from sdqkd.agents.drivers.qrng import NoiseModel, Qrng, QrngFailure

WAIT = 15.0  # s: an upper bound for what takes milliseconds, so a loaded machine cannot fail a test


def bits(data: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def test_cutoffs_follow_the_standard_exactly() -> None:
    # the standard's worked values are for alpha = 2^-20; the node runs at 2^-40
    assert rct_cutoff(1.0, 20) == 21 and rct_cutoff(0.5, 20) == 41 and rct_cutoff(0.816, 20) == 26
    assert rct_cutoff(1.0) == 41 and rct_cutoff(0.816) == 51
    # APT, binary, W = 1024, H = 1 (SP 800-90B table 2: 589); exact tail with integers
    c = apt_cutoff(1.0, 1024, 20)
    tail = lambda k: Fraction(sum(math.comb(1024, i) for i in range(k, 1025)), 2 ** 1024)  # noqa: E731
    assert c == 589 and tail(c) <= Fraction(1, 2 ** 20) < tail(c - 1)
    # any H: P(X >= C) <= 2^-20 < P(X >= C - 1), X ~ Binomial(W, 2^-H), checked in exact rationals
    for h, w, a in ((2.0, 512, 20), (3.0, 1024, 20), (1.0, 1024, 40), (2.0, 512, 40)):
        p = Fraction(1, 2 ** int(h))
        c = apt_cutoff(h, w, a)
        ptail = lambda k: sum(math.comb(w, i) * p ** i * (1 - p) ** (w - i) for i in range(k, w + 1))  # noqa: E731
        assert ptail(c) <= Fraction(1, 2 ** a) < ptail(c - 1), (h, w, a, c)
    with pytest.raises(ValueError):
        rct_cutoff(0)


def test_a_stuck_run_trips_the_rct_at_its_cutoff_even_across_chunks() -> None:
    t = HealthTests(1.0)
    t.feed(np.array([0, 1] * 600, dtype=np.uint8))  # start-up passes on alternating samples
    assert t.ready and t.failure is None
    for _ in range(rct_cutoff(1.0) - 1):  # C - 1 zeros, one at a time: no failure
        assert t.feed(np.zeros(1, dtype=np.uint8)) is None
    f = t.feed(np.zeros(1, dtype=np.uint8))
    c = rct_cutoff(1.0)
    assert f is not None and (f.test, f.phase, f.observed, f.cutoff) == ("repetition-count", "continuous", c, c)
    assert f"{c} identical samples in a row" in f.message and not t.ready
    assert t.feed(np.array([0, 1], dtype=np.uint8)) is None  # stopped until restart
    t.restart()
    assert not t.ready and t.failure is None


def test_a_biased_source_trips_the_apt_and_chunking_does_not_matter() -> None:
    h = NoiseModel(0.02, 0.1).min_entropy()
    # 80 % ones in runs of 8: too short for the RCT (cutoff 51), too many for the APT (693 / 1024)
    raw = np.tile(np.array([1] * 8 + [0] * 2, dtype=np.uint8), 300)[3:]
    whole = HealthTests(h).feed(raw)
    assert whole is not None and (whole.test, whole.phase, whole.window) == ("adaptive-proportion", "start-up", 1024)
    assert whole.observed >= whole.cutoff == apt_cutoff(h) == 693
    pieces = HealthTests(h)
    rng = np.random.default_rng(7)
    i, got = 0, None
    while got is None and i < len(raw):
        n = int(rng.integers(1, 300))
        got = pieces.feed(raw[i:i + n])
        i += n
    assert got is not None and got.test == "adaptive-proportion"
    # the modelled "biased" failure (P(1) = 0.85, correlated) trips one test or the other
    model = NoiseModel(0.02, 0.1)
    model.fault = "biased"
    assert HealthTests(h).feed(bits(model.samples(8 * 1024).to_bytes(1024, "big"))) is not None


def test_good_sources_raise_false_alarms_at_most_at_the_standards_rate() -> None:
    """alpha per sample bounds the false-alarm rate: at the standard's 2^-20, over 2^24
    samples the expected count is at most 16; more than 40 would happen with probability
    < 1e-7. At the node's 2^-40 there is none."""
    model = NoiseModel(0.02, 0.1)
    for h, source in ((1.0, lambda n: os.urandom(n)),
                      (model.min_entropy(), lambda n: model.samples(8 * n).to_bytes(n, "big"))):
        t, alarms, t40 = HealthTests(h, alpha_log2=20), 0, HealthTests(h)
        for _ in range(64):
            raw = bits(source(1 << 15))  # 2^18 samples
            for chunk in np.split(raw, 8):
                if t.feed(chunk) is not None:
                    alarms += 1
                    t.restart()
                assert t40.feed(chunk) is None, (h, t40.failure)
        assert alarms <= 40, (h, alarms)


def qrng(rate: float = 2_000_000) -> tuple[Qrng, HealthTap, list[Event], list[bytes]]:
    events: list[Event] = []
    raw: list[bytes] = []
    q = Qrng("alice", "emulated", rate=rate, fifo_bits=1 << 16)
    q.add_raw_tap(raw.append)
    tap = HealthTap(q, q.min_entropy())
    q.open(events.append)
    return q, tap, events, raw


def test_no_output_before_the_startup_tests_pass() -> None:
    q, tap, events, raw = qrng()
    assert not tap.ready
    out = q.read(32, timeout=WAIT)
    samples = sum(len(r) for r in raw) * 8
    # output comes only once 1024 samples passed the start-up tests (4.3 lets the tested ones go out)
    assert len(out) == 32 and tap.ready and samples >= STARTUP_SAMPLES
    assert events == []


def test_health_tests_detect_injected_failures_and_gate_output_until_repair() -> None:
    q, tap, events, _ = qrng()
    q.read(64, timeout=WAIT)
    q.inject_failure("stuck")
    assert events == []  # not reported by the injection itself: the tests find it
    with pytest.raises(QrngFailure, match="repetition-count test failed"):
        q.read(32, timeout=WAIT)  # the block that tripped the test is not delivered
    (ev,) = events
    assert ev.kind == "qrng-status" and ev.data["status"] == "FAILED"
    assert (ev.data["test"], ev.data["phase"], ev.data["cutoff"]) == ("repetition-count", "continuous", rct_cutoff(q.min_entropy()))
    assert ev.data["observed"] >= ev.data["cutoff"] and ev.data["min_entropy"] == pytest.approx(q.min_entropy(), abs=1e-6)
    time.sleep(3 * RETRY_AFTER)  # the start-up reruns fail on the stuck samples: still one alarm
    with pytest.raises(QrngFailure):
        q.read(32)
    assert len(events) == 1
    q.repair()  # start-up tests on fresh samples at once; the recovery is theirs to announce
    assert [e.data["status"] for e in events] == ["FAILED", "ENABLED"]
    assert events[-1].data["reason"] == "start-up health tests passed"
    assert len(q.read(32, timeout=WAIT)) == 32
    q.inject_failure("biased")
    with pytest.raises(QrngFailure, match="test failed"):
        q.read(2048, timeout=WAIT)
    assert events[-1].data["status"] == "FAILED" and events[-1].data["observed"] >= events[-1].data["cutoff"]


def test_a_transient_glitch_is_an_intermittent_failure_that_clears_itself() -> None:
    q, tap, events, _ = qrng()
    q.read(64, timeout=WAIT)
    q.inject_failure("glitch")  # 64 frozen raw samples, then healthy again
    with pytest.raises(QrngFailure, match="repetition-count"):
        q.read(32, timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while q.state()["qrng"]["status"] != "ENABLED" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [e.data["status"] for e in events] == ["FAILED", "ENABLED"]  # no repair needed
    assert len(q.read(32, timeout=WAIT)) == 32
    q.close()
    q.inject_failure("stuck")  # a closed source: the retries stop quietly


def test_an_idle_source_finds_a_hardware_fault_and_its_state_says_so() -> None:
    """Nobody reads: the device's own sampling runs the tests (a fault from its fault
    source, as the lab's plant gives it); state() is what NETCONF <get> shows."""
    q, tap, events, _ = qrng()
    fault: list = [None]
    q.fault_source = lambda: fault[0]

    def state_is(want: str) -> dict:
        deadline = time.monotonic() + WAIT
        while (st := q.state()["qrng"])["state"] != want:
            assert time.monotonic() < deadline, f"state {st['state']}, not {want}"
            time.sleep(0.02)
        return st

    ok = state_is("ok")  # the start-up tests passed on the idle sampling alone
    assert ok["failures"] == 0 and ok["health"]["samples"] >= STARTUP_SAMPLES and ok["health"]["passed_at"]
    assert ok["health"]["cutoffs"] == {"repetition-count": (rct_cutoff(q.min_entropy()), None),
                                       "adaptive-proportion": (apt_cutoff(q.min_entropy()), 1024)}
    fault[0] = ("stuck", 1.0)
    failed = state_is("failed")
    assert failed["failures"] == 1 and failed["last_failure"]["test"] == "repetition-count"
    assert failed["tests"]["repetition-count"]["failures"] == 1 and failed["health"]["passed_at"] is None
    assert [e.data["status"] for e in events] == ["FAILED"]
    fault[0] = None  # repaired: ok (not degraded) once the start-up tests pass
    assert state_is("ok")["failures"] == 1
    fault[0] = ("glitch", time.time())  # recovers by itself: degraded for DEGRADED_HOLD
    assert state_is("degraded")["failures"] == 2
    assert [e.data["status"] for e in events] == ["FAILED", "ENABLED", "FAILED", "ENABLED"]
    q.close()
    assert q.state()["qrng"]["state"] == "disabled"
