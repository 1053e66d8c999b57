"""The node's entropy source: an emulated QRNG that behaves like hardware (rate, raw-sample
imperfections, conditioning, failures), and the OS source."""
from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest

from sdqkd.agents.drivers import registry
from sdqkd.agents.drivers.base import Change, Event
from sdqkd.agents.drivers.qrng import Clock, Qrng, QrngFailure, bernoulli_bits
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig


def ones(data: bytes) -> float:
    return sum(bin(b).count("1") for b in data) / (8 * len(data))


def repeats(data: bytes) -> float:
    """Share of samples equal to the one before (0.5 for independent, unbiased bits)."""
    x = int.from_bytes(data, "big")
    n = 8 * len(data) - 1
    return 1 - bin((x ^ (x >> 1)) & ((1 << n) - 1)).count("1") / n


class StepClock(Clock):
    """The device's time as the test steps it: each wait the device makes moves it on,
    so rates and timeouts come out exact whatever the machine's load."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def qrng(**kw) -> tuple[Qrng, list[Event]]:
    events: list[Event] = []
    q = Qrng("alice", **{"source": "emulated", "rate": 400_000, **kw})
    q.open(events.append)
    return q, events


def basics(q: Qrng) -> dict:
    st = q.state()["qrng"]
    return {k: st[k] for k in ("source", "rate", "status", "bits_delivered", "state", "failures")}


def test_output_follows_the_modelled_rate() -> None:
    rate = 80_000  # bit/s: 10 kB/s
    clock = StepClock()
    q, _ = qrng(rate=rate, fifo_bits=4096, clock=clock)
    t0 = clock.now()
    got = 0
    while clock.now() - t0 < 1.0:
        got += len(q.read(500, timeout=1.0))
    elapsed = clock.now() - t0
    assert 8 * got / elapsed == pytest.approx(rate, rel=0.01)
    assert basics(q) == {"source": "emulated", "rate": 80000.0, "status": "ENABLED", "bits_delivered": 8 * got,
                         "state": "ok", "failures": 0}
    t0 = clock.now()
    q.read(5000, timeout=2.0)  # 40 kbit: half a second, nothing banked
    assert clock.now() - t0 == pytest.approx(0.5, rel=0.02)


def test_the_wall_clock_rate_is_the_modelled_one() -> None:
    """The same device on the real clock (loose bounds: the machine may be loaded)."""
    q, _ = qrng(rate=400_000)
    t0 = time.monotonic()
    q.read(25_000, timeout=30.0)  # 200 kbit: half a second at the modelled rate
    assert time.monotonic() - t0 >= 0.45  # never faster than the device makes it


def test_an_idle_device_banks_only_its_fifo() -> None:
    clock = StepClock()
    q, _ = qrng(rate=100_000, fifo_bits=8192, clock=clock)
    clock.sleep(0.3)  # 30 kbit made, but the FIFO keeps 8 kbit
    t0 = clock.now()
    q.read(1024, timeout=0.5)
    assert clock.now() - t0 == 0.0  # all of it banked
    with pytest.raises(TimeoutError, match="not produced within 0.1 s"):
        q.read(2000, timeout=0.1)  # 16 kbit need 0.16 s
    t0 = clock.now()
    q.read(2000, timeout=1.0)  # what the timed-out read made is not lost: 0.06 s to go
    assert clock.now() - t0 == pytest.approx(0.06, abs=0.011)


def test_conditioned_output_is_balanced_and_raw_shows_the_model() -> None:
    raw: list[bytes] = []
    q, _ = qrng(rate=4_000_000, bias=0.02, correlation=0.1)
    q.add_raw_tap(raw.append)
    out = q.read(64_000, timeout=2.0)
    samples = b"".join(raw)
    assert len(samples) == 3 * len(out)  # 1/3 entropy ratio
    assert ones(out) == pytest.approx(0.5, abs=0.005)
    assert repeats(out) == pytest.approx(0.5, abs=0.005)
    blocks = {out[i:i + 32] for i in range(0, len(out), 32)}
    assert len(blocks) == len(out) // 32
    # raw: P(1) = 0.5 + bias; a sample repeats the last one with p = 0.1, so
    # P(same as last) = c(1-c) + (1 - c(1-c)) (p^2 + (1-p)^2)
    p, c = 0.52, 0.1
    assert ones(samples) == pytest.approx(p, abs=0.003)
    assert repeats(samples) == pytest.approx(c * (1 - c) + (1 - c * (1 - c)) * (p * p + (1 - p) ** 2), abs=0.003)


def test_stuck_and_biased_failures_corrupt_the_raw_stream() -> None:
    raw: list[bytes] = []
    q, events = qrng()
    q.add_raw_tap(raw.append)
    q.read(1000)
    q.inject_failure("stuck")
    assert q.state()["qrng"]["status"] == "FAILED"
    assert [(e.kind, e.data["status"], e.data["reason"]) for e in events] == [
        ("qrng-status", "FAILED", "injected stuck failure")]
    with pytest.raises(QrngFailure, match="injected stuck failure"):
        q.read(32)
    raw.clear()
    stuck = q.read_raw(3000)  # the diagnostic raw mode still answers
    assert len(set(stuck)) == 1 and stuck[0] in (0, 0xFF) and b"".join(raw).startswith(stuck)
    q.repair()
    assert events[-1].data["status"] == "ENABLED" and len(q.read(1000)) == 1000
    q.inject_failure("biased")
    assert ones(q.read_raw(20_000)) == pytest.approx(0.85, abs=0.02)
    with pytest.raises(ValueError, match="known: stuck, biased"):
        q.inject_failure("gremlins")


def test_timeouts_and_concurrent_readers() -> None:
    clock = StepClock()
    q, _ = qrng(rate=40_000, fifo_bits=1024, clock=clock)
    t0 = clock.now()
    with pytest.raises(TimeoutError):
        q.read(10_000, timeout=0.2)  # 80 kbit at 40 kbit/s: 2 s
    assert clock.now() - t0 == pytest.approx(0.2, abs=0.001)
    q, _ = qrng(rate=40_000, fifo_bits=1024)  # readers in threads: the wall clock
    assert q.read(0) == b""
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(q.read(500, timeout=2.0))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len(set(got)) == 4 and all(len(g) == 500 for g in got)
    q.close()
    with pytest.raises(QrngFailure):
        q.read(1)


def test_os_source_is_unlimited_and_has_no_raw_stream() -> None:
    q = registry.create("qrng", node="alice", source="os")
    q.open(lambda e: None)
    t0 = time.monotonic()
    data = q.read(1_000_000)
    assert time.monotonic() - t0 < 5.0 and len(data) == 1_000_000  # 1 MB at an emulated 400 kbit/s: 20 s
    assert ones(data) == pytest.approx(0.5, abs=0.002)
    assert basics(q) == {"source": "os", "rate": None, "status": "ENABLED", "bits_delivered": 8_000_000, "state": "ok",
                         "failures": 0}
    with pytest.raises(ValueError):
        q.add_raw_tap(print)
    with pytest.raises(ValueError):
        q.inject_failure("stuck")


def test_configuration_is_checked() -> None:
    for bad in ({"source": "dice"}, {"rate": None}, {"rate": -1}, {"bias": 0.6}, {"correlation": 1.0},
                {"bias": 0.3, "correlation": 0.5}):  # too little raw entropy for the 1/3 ratio
        with pytest.raises(ValueError):
            Qrng("alice", **{"source": "emulated", "rate": 1000, **bad})
    q, _ = qrng()
    assert not q.handles(Change("qkd-link", "x", None, {}))


def test_the_lkms_draws_its_keys_from_it(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    q, _ = qrng(rate=200_000)
    kme = str(uuid.uuid4())
    lkms = Lkms(LkmsConfig(kme, "alice", {"sae-1": kme, "sae-2": kme}), KeyStore(tmp_path / "k.sqlite"), q.read)
    try:
        keys = lkms.enc_keys("sae-1", "sae-2", 4, 256, [])
        assert q.state()["qrng"]["bits_delivered"] == 4 * 256
        assert [k.key for k in lkms.dec_keys("sae-2", "sae-1", [k.key_id for k in keys])] == [k.key for k in keys]
        q.inject_failure("stuck")  # logged, but never with output bytes
        assert "stuck" in caplog.text
        assert not any(k.key.hex() in caplog.text or repr(k.key)[2:-1] in caplog.text for k in keys)
    finally:
        lkms.shutdown()


def test_bernoulli_bits_probability() -> None:
    for p in (0.0, 0.1, 0.5, 0.85, 1.0):
        x = bernoulli_bits(200_000, p)
        assert bin(x).count("1") / 200_000 == pytest.approx(p, abs=0.005)
    assert bernoulli_bits(64, 0.5, rand=lambda n: bytes(n)) == 0  # shaped from the given noise, nothing else
