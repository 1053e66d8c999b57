"""The node's entropy source, kind "qrng": what the LKMS draws end keys from
(`Qrng.read` is its `entropy` callable: n bytes in, n random bytes out).

source="os": os.urandom, unlimited, never fails.

source="emulated": a QRNG device such as Quside's phase-diffusion modules, modelled
as hardware, not as a constant:
- raw samples: a comparator on a noisy analogue signal. Each raw bit is 1 with
  probability 0.5 + `bias` (comparator offset) and, with probability `correlation`,
  repeats the previous sample instead of a fresh one (finite detector bandwidth).
  The noise itself comes from os.urandom, shaped by those two parameters.
- conditioning: every RAW_PER_BLOCK (768) raw bits are hashed with SHA-256 into one
  256-bit output block, an entropy ratio of 1/3. That gives full-entropy output
  (NIST SP 800-90B: input min-entropy >= output + 64 bits) whenever the raw stream
  holds at least 320/768 = 0.417 bit of min-entropy per sample; the healthy model
  holds about 0.8. There is no counter in the hash, so a stuck source shows as
  repeating output, as a real conditioner would.
- rate: output bits accumulate at `rate` bit/s in the device FIFO (a token bucket of
  `fifo_bits`); `read(n, timeout)` waits for them or raises TimeoutError.
- continuous sampling: a device's noise source runs whether or not anyone reads, and its
  health tests with it. While open, a watcher thread draws IDLE_SAMPLES raw samples every
  WATCH_EVERY s when no read did since its last look (costing the rate model's tokens, about
  0.05 % of the output), so a fault is found on an idle device too; it also polls
  `fault_source` (the lab's optical plant, where `sdqkd lab qrng-fail` writes) and injects or
  repairs what it says.
- failures: inject_failure("stuck") freezes the raw samples at the last value,
  "biased" pushes P(1) to 0.5 + FAILED_BIAS, both until repair(); "glitch" freezes
  the next GLITCH_SAMPLES samples only (a transient, e.g. a supply dip), then the
  device is healthy again by itself. All corrupt the RAW stream only.

Health testing (NIST SP 800-90B, agents/emulation/health.py) hooks in through
`add_raw_tap(tap, health=True)`: every raw sample the sampler emits (before
conditioning, or through the diagnostic `read_raw`) is shown to the taps; a health
test calls `report_failure()` when it trips (status FAILED, a 'qrng-status' event:
data node, source, status, reason and the test's details), and output waits until
every health tap is `ready` (its start-up tests passed) after open(). After a failure
or repair() the taps rerun the start-up tests on fresh raw samples and call
`report_recovered()` when they pass. A block whose raw samples tripped a test is
never output. Without a health tap an injected failure is reported at once. `read`
refuses output while FAILED, so no key comes from a broken source; `read_raw` still
works, as a device's raw diagnostic mode does.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from sdqkd.agents.drivers.base import Change, Driver, Emit, Event

log = logging.getLogger(__name__)

SOURCES = ("emulated", "os")
FAILURE_KINDS = ("stuck", "biased", "glitch")
GLITCH_SAMPLES = 64              # raw samples a "glitch" freezes
WATCH_EVERY = 0.2                # s between the watcher's looks (fault source, idle sampling)
IDLE_SAMPLES = 1024              # raw samples the watcher tests on an idle device, each look
BLOCK_BITS = 256                 # SHA-256 output per conditioning step
RAW_PER_BLOCK = 3 * BLOCK_BITS   # raw samples per output block: entropy ratio 1/3
FAILED_BIAS = 0.35               # "biased" failure: P(1) = 0.85
DEGRADED_HOLD = 300              # s a source that recovered by itself is reported "degraded"
_PRECISION = 12                  # binary digits of the modelled probabilities

RawTap = Callable[[bytes], None]


class HealthTap(Protocol):
    """A raw tap that gates output: not `ready` until its start-up tests passed."""

    ready: bool

    def __call__(self, raw: bytes) -> None: ...

    def describe(self) -> dict[str, Any]:
        """The tests' parameters and what they have seen (operational state)."""

    def restart(self) -> None:
        """Power-on: start-up tests on the next samples."""

    def retest(self) -> None:
        """After a failure or repair: start-up tests on fresh raw samples, now."""


class QrngFailure(OSError):
    """The entropy source is FAILED (or closed): no output until it is repaired."""


def bernoulli_bits(nbits: int, p: float, rand: Callable[[int], bytes] = os.urandom) -> int:
    """An nbits-bit integer whose bits are independently 1 with probability p (to 2^-12).

    Built from uniform random words by AND/OR, one binary digit of p at a time, so a
    whole chunk costs a few big-integer operations, not one Python step per bit."""
    digits = round(min(max(p, 0.0), 1.0) * (1 << _PRECISION))
    if digits <= 0:
        return 0
    if digits >= 1 << _PRECISION:
        return (1 << nbits) - 1
    nbytes = (nbits + 7) // 8
    word = lambda: int.from_bytes(rand(nbytes), "big") >> (8 * nbytes - nbits)  # noqa: E731
    m = 0
    for i in range(_PRECISION):  # least significant digit of p first
        m = (word() | m) if (digits >> i) & 1 else (word() & m)
    return m


class NoiseModel:
    """Raw samples of the modelled device, in time order (first sample = most significant bit)."""

    def __init__(self, bias: float, correlation: float) -> None:
        if not 0.0 <= abs(bias) < 0.5:
            raise ValueError("bias must be in (-0.5, 0.5)")
        if not 0.0 <= correlation < 1.0:
            raise ValueError("correlation must be in [0, 1)")
        self.bias, self.correlation = bias, correlation
        self.fault: str | None = None
        self._glitch_left = 0
        self._last = 0  # the previous raw sample (the chunks are one stream)

    def min_entropy(self) -> float:
        """Per-sample min-entropy of the healthy model: the likeliest next sample given the last."""
        c, p = self.correlation, 0.5 + abs(self.bias)
        return -math.log2(c + (1 - c) * p)

    def fail(self, kind: str) -> None:
        self.fault = kind
        self._glitch_left = GLITCH_SAMPLES if kind == "glitch" else 0

    def samples(self, nbits: int) -> int:
        if self.fault == "stuck":
            return (1 << nbits) - 1 if self._last else 0
        if self.fault == "glitch":  # the first samples frozen, then healthy again
            frozen = min(nbits, self._glitch_left)
            self._glitch_left -= frozen
            if not self._glitch_left:
                self.fault = None
            held = ((1 << frozen) - 1 if self._last else 0) << (nbits - frozen)
            if frozen == nbits:
                return held
            rest = self.samples(nbits - frozen)  # continues from the frozen value
            return held | rest
        p1 = 0.5 + (FAILED_BIAS if self.fault == "biased" else self.bias)
        fresh = bernoulli_bits(nbits, p1)
        if self.correlation > 0:
            repeat = bernoulli_bits(nbits, self.correlation)
            previous = (fresh >> 1) | (self._last << (nbits - 1))
            fresh = (fresh & ~repeat) | (previous & repeat)
        self._last = fresh & 1
        return fresh


class Clock:
    """Where the emulated device reads time and waits: the wall clock here; a test's own
    clock makes the rate model exact instead of subject to the machine's load."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Qrng(Driver):
    """The node's QRNG; configuration-free for ETSI 015 (handles no change)."""

    kind: ClassVar[str] = "qrng"

    def __init__(self, node: str, source: str = "emulated", *, rate: float | None = None,
                 bias: float = 0.02, correlation: float = 0.1, fifo_bits: int | None = None,
                 clock: Clock | None = None) -> None:
        """rate: output bit/s of the emulated device (required for it); bias, correlation:
        raw-sample imperfections (see the module docstring); fifo_bits: output the device
        buffers while nobody reads (default 0.1 s of output, at least one block)."""
        self._clock = clock or Clock()
        if source not in SOURCES:
            raise ValueError(f"unknown QRNG source '{source}'; known: {', '.join(SOURCES)}")
        self.node, self.source = node, source
        self.rate: float | None = None
        self._noise: NoiseModel | None = None
        if source == "emulated":
            if rate is None or rate <= 0:
                raise ValueError("an emulated QRNG needs a positive rate (bit/s)")
            self.rate = float(rate)
            self._noise = NoiseModel(bias, correlation)
            if self._noise.min_entropy() * RAW_PER_BLOCK < BLOCK_BITS + 64:
                raise ValueError("bias/correlation leave too little entropy for the 1/3 conditioning ratio")
            self.fifo_bits = max(BLOCK_BITS, int(fifo_bits if fifo_bits is not None else self.rate / 10))
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # readers are served in turn, each its whole request
        self._status, self._reason = "DISABLED", ""
        self._emit: Emit = lambda event: None
        self._taps: list[RawTap] = []
        self._health: list[HealthTap] = []
        self._tokens = 0.0
        self._last_fill = 0.0
        self._fifo = bytearray()  # conditioned output made but not yet read
        self._delivered = 0
        # health history (operational state): counters since power-on
        self._since = self._opened = time.time()
        self._failures = 0
        self._last_failure: dict[str, Any] | None = None
        self._tests: dict[str, dict[str, Any]] = {}  # per health test: failures, last time, observed
        self._recovered_at: float | None = None  # recovered by itself (not repaired): degraded for a while
        self._repaired = False
        # where hardware faults come from (the lab's plant): None or (FAILURE_KINDS kind, when)
        self.fault_source: Callable[[], tuple[str, float] | None] | None = None
        self._fault: tuple[str, float] | None = None
        self._sampled = False  # raw samples drawn since the watcher's last look
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- Driver ---------------------------------------------------------------------------

    def open(self, emit: Emit) -> None:
        """Power on: the FIFO starts empty and fills at the modelled rate."""
        self._emit = emit
        for tap in list(self._health):
            tap.restart()
        with self._lock:
            self._status, self._tokens, self._last_fill = "ENABLED", 0.0, self._clock.now()
            self._since = self._opened = time.time()
            self._failures, self._last_failure, self._tests, self._recovered_at = 0, None, {}, None
        if self._noise is not None and self._watcher is None:
            self._watch_stop.clear()
            self._watcher = threading.Thread(target=self._watch, name=f"qrng-{self.node}", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._watch_stop.set()
        with self._lock:
            self._status = "DISABLED"  # first: a watcher waiting for samples gives up at once
            self._fifo.clear()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(5)

    def handles(self, change: Change) -> bool:
        return False

    def check(self, change: Change) -> None:
        return None

    def apply(self, change: Change) -> None:
        return None

    def state(self) -> dict[str, Any]:
        """Status and health (NETCONF <get>, sdqkd-qrng `qrng`): `state` is ok, degraded
        (recovered by itself within DEGRADED_HOLD s), start-up (tests not passed yet),
        failed or disabled; times are Unix seconds."""
        with self._lock:
            health = list(self._health)
            st = {"source": self.source, "rate": self.rate, "status": self._status, "reason": self._reason,
                  "bits_delivered": 8 * self._delivered, "since": self._since, "opened": self._opened,
                  "failures": self._failures, "last_failure": dict(self._last_failure) if self._last_failure else None,
                  "tests": {k: dict(v) for k, v in self._tests.items()}, "degraded_hold": DEGRADED_HOLD}
            recovered, status = self._recovered_at, self._status
        described = [tap.describe() for tap in health if hasattr(tap, "describe")]
        if described:
            st["health"] = described[0]
        if status == "ENABLED" and not all(tap.ready for tap in health):
            st["state"] = "start-up"
        elif status == "ENABLED":
            st["state"] = "degraded" if recovered is not None and time.time() - recovered < DEGRADED_HOLD else "ok"
        else:
            st["state"] = status.lower()
        return {"qrng": st}

    def min_entropy(self) -> float | None:
        """Assessed min-entropy per raw sample (the health tests' H); None for the OS source."""
        return None if self._noise is None else self._noise.min_entropy()

    # --- entropy -----------------------------------------------------------------------------

    def read(self, n: int, timeout: float | None = 2.0) -> bytes:
        """n random bytes; waits for the device to produce them (emulated source), at most
        `timeout` seconds (None: no limit), then raises TimeoutError. Output made for a
        request that timed out stays in the FIFO for the next one."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if self.source == "os":
            with self._lock:
                if self._status != "ENABLED":
                    raise QrngFailure(f"QRNG is {self._status}")
                self._delivered += n
            return os.urandom(n)
        deadline = None if timeout is None else self._clock.now() + timeout
        out = bytearray()
        with self._read_lock:
            try:
                while True:
                    with self._lock:
                        if self._status != "ENABLED":
                            raise QrngFailure(f"QRNG is {self._status}: {self._reason or 'not open'}")
                        take = self._fifo[: n - len(out)]
                        del self._fifo[: len(take)]
                        out += take
                    need = (n - len(out)) * 8
                    if need <= 0:
                        break
                    granted = self._grant(-(-need // BLOCK_BITS) * BLOCK_BITS, BLOCK_BITS, deadline, True)
                    made = self._condition(self._raw(granted * RAW_PER_BLOCK // BLOCK_BITS))
                    with self._lock:
                        if self._status != "ENABLED":  # its samples tripped a health test: dropped
                            raise QrngFailure(f"QRNG is {self._status}: {self._reason}")
                        if not all(tap.ready for tap in self._health):
                            continue  # start-up test samples are never output
                    out += made
            except TimeoutError:
                with self._lock:
                    self._fifo[:0] = out  # made for nobody yet: kept for the next reader
                raise TimeoutError(f"QRNG: {n} bytes not produced within {timeout} s at {self.rate:g} bit/s") from None
            with self._lock:
                self._fifo[:0] = out[n:]  # a block's tail waits for the next reader
                self._delivered += n
        return bytes(out[:n])

    def read_raw(self, n: int, timeout: float | None = 2.0) -> bytes:
        """n bytes of raw samples, unconditioned (the diagnostic raw mode QRNGs offer for
        SP 800-90B assessment); works while FAILED. The sampler is shared with read():
        3 raw samples cost one output bit of the modelled rate."""
        if self._noise is None:
            raise ValueError("the OS source has no raw samples")
        deadline = None if timeout is None else self._clock.now() + timeout
        out = bytearray()
        with self._read_lock:
            while len(out) < n:
                cost = -(-(n - len(out)) * 8 // 24) * 8  # output-bit tokens, 8 at a time (24 raw samples)
                out += self._raw(3 * self._grant(cost, 8, deadline, False))
        return bytes(out[:n])

    def add_raw_tap(self, tap: RawTap, *, health: bool = False) -> None:
        """Show every raw chunk (packed bits, first sample = MSB of the first byte) to `tap`
        before it is conditioned. health=True: `tap` is a HealthTap (SP 800-90B tests) that
        gates output and detects failures itself. Emulated source only."""
        if self._noise is None:
            raise ValueError("the OS source has no raw samples")
        with self._lock:
            self._taps.append(tap)
            if health:
                self._health.append(tap)  # type: ignore[arg-type]

    # --- failures -----------------------------------------------------------------------------

    def inject_failure(self, kind: str) -> None:
        """'stuck': raw samples frozen; 'biased': P(1) = 0.5 + FAILED_BIAS (both until
        repair()); 'glitch': the next GLITCH_SAMPLES samples frozen. The health
        tests detect it on the next samples; without them it is reported at once."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind '{kind}'; known: {', '.join(FAILURE_KINDS)}")
        if self._noise is None:
            raise ValueError("the OS source has no failure modes")
        with self._lock:
            self._noise.fail(kind)
            tested = bool(self._health)
        if tested:
            log.warning("%s QRNG: %s failure injected", self.node, kind)
        else:
            self.report_failure(f"injected {kind} failure")

    def report_failure(self, reason: str, **details: Any) -> None:
        """Mark the source FAILED (health tests call this, with their test's details);
        read() refuses until repair()."""
        self._set_status("FAILED", reason, details)

    def report_recovered(self, reason: str) -> None:
        """The health taps' start-up tests passed again after a failure: output resumes."""
        self._set_status("ENABLED", reason)

    def repair(self) -> None:
        """Hardware fixed. With health taps the source stays FAILED until their start-up
        tests pass on fresh samples (they call report_recovered)."""
        with self._lock:
            if self._noise is not None:
                self._noise.fault = None
            self._fifo.clear()  # output of the faulty period is thrown away
            health = list(self._health)
            self._repaired = True  # its recovery is the repair's, not an intermittent fault's
        for tap in health:
            tap.retest()
        if not health:
            self._set_status("ENABLED", "repaired")

    # --- internals ------------------------------------------------------------------------------

    def _watch(self) -> None:
        """The device's own life while open: hardware faults from `fault_source`, and health
        tests on raw samples while nobody reads (module docstring)."""
        while not self._watch_stop.wait(WATCH_EVERY):
            try:
                fault = self.fault_source() if self.fault_source is not None else self._fault
                if fault is not None and fault[0] == "glitch" and fault[1] < self._opened:
                    self._fault = fault  # a transient from before power-on is over
                if fault != self._fault:
                    self._fault = fault
                    if fault is None:
                        self.repair()
                    else:
                        self.inject_failure(fault[0])
                with self._lock:
                    idle, self._sampled = not self._sampled, False
                    testing = bool(self._health) and self._status == "ENABLED"
                if idle and testing:
                    self.read_raw(IDLE_SAMPLES // 8, timeout=1.0)
                    with self._lock:
                        self._sampled = False  # its own samples: still idle at the next look
            except (OSError, TimeoutError):  # closed meanwhile, or the sampler busy: next look
                continue
            except Exception:  # the watcher must outlive a bad fault source
                log.exception("%s QRNG watcher", self.node)

    def _fill(self, now: float) -> None:
        """Token bucket (caller holds the lock): output bits made since the last look, up to the FIFO."""
        room = self.fifo_bits - 8 * len(self._fifo)
        self._tokens = min(max(0.0, room), self._tokens + (now - self._last_fill) * (self.rate or 0.0))
        self._last_fill = now

    def _grant(self, want: int, unit: int, deadline: float | None, enabled_only: bool) -> int:
        """Wait until the sampler has made at least `unit` output bits; take up to `want`."""
        while True:
            now = self._clock.now()
            with self._lock:
                if self._status == "DISABLED" or (enabled_only and self._status != "ENABLED"):
                    raise QrngFailure(f"QRNG is {self._status}: {self._reason or 'not open'}")
                self._fill(now)
                got = min(int(self._tokens // unit) * unit, want)
                if got > 0:
                    self._tokens -= got
                    return got
            if deadline is not None and now >= deadline:
                raise TimeoutError("QRNG output not produced in time")
            # wake before the FIFO would fill, so a waiting reader loses no output
            wait = min(want, self.fifo_bits / 4) / (self.rate or 1.0)
            self._clock.sleep(max(0.001, min(wait, deadline - now) if deadline is not None else wait))

    def _raw(self, nbits: int) -> bytes:
        """The next `nbits` raw samples (a multiple of 8), shown to every tap."""
        assert self._noise is not None
        with self._lock:
            raw = self._noise.samples(nbits).to_bytes(nbits // 8, "big")
            taps = list(self._taps)
            self._sampled = True
        for tap in taps:
            try:
                tap(raw)
            except Exception:  # a broken tap must not stop the source
                log.exception("QRNG raw tap failed")
        return raw

    @staticmethod
    def _condition(raw: bytes) -> bytes:
        """SHA-256 of each RAW_PER_BLOCK-bit slice: the 1/3 entropy ratio of the module docstring."""
        step = RAW_PER_BLOCK // 8
        return b"".join(hashlib.sha256(raw[i:i + step]).digest() for i in range(0, len(raw), step))

    def _set_status(self, status: str, reason: str, details: dict[str, Any] | None = None) -> None:
        with self._lock:
            if self._status in (status, "DISABLED"):
                return
            self._status, self._reason = status, reason
            self._since = now = time.time()
            if status == "FAILED":
                self._failures += 1
                self._recovered_at = None
                self._last_failure = {"time": now, "message": reason, **{k: (details or {}).get(k) for k in ("test", "phase")}}
                test = (details or {}).get("test")
                if test:
                    seen = self._tests.setdefault(str(test), {"failures": 0})
                    seen.update(failures=seen["failures"] + 1, last=now, observed=(details or {}).get("observed"))
            else:
                self._recovered_at = None if self._repaired else now
                self._repaired = False
        log.warning("%s QRNG %s (%s)", self.node, status, reason)
        try:
            self._emit(Event("qrng-status", {"node": self.node, "source": self.source, "status": status,
                                             "reason": reason, **(details or {})}))
        except Exception:  # a bad handler must not stop the source
            log.exception("qrng-status handler failed")
