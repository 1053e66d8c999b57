"""Per-application key delivery counters of one node (sdqkd-key-stock `key-delivery`):
requests served, keys and bits handed to the application's SAEs here, and the rate over a
sliding window. Counts only, never a key or key ID; in memory, from the agent's start
(the discontinuity time), as interface counters are."""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

RATE_WINDOW = 10  # s the delivery rate averages over


class Deliveries:
    """Thread-safe; the ETSI 014/004 front ends record, a NETCONF <get> reads."""

    def __init__(self, window: int = RATE_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self._clock = window, clock
        self.since = time.time()
        self._lock = threading.Lock()
        self._totals: dict[str, list[int]] = {}  # app -> [requests, keys, bits]
        self._recent: dict[str, collections.deque[tuple[float, int]]] = {}  # app -> (when, bits)

    def record(self, app: str, keys: int, bits: int) -> None:
        """One request that delivered `keys` keys of `bits` bits in all."""
        now = self._clock()
        with self._lock:
            t = self._totals.setdefault(app, [0, 0, 0])
            t[0], t[1], t[2] = t[0] + 1, t[1] + keys, t[2] + bits
            recent = self._recent.setdefault(app, collections.deque())
            recent.append((now, bits))
            self._trim(recent, now)

    def get(self, app: str) -> dict[str, Any]:
        """requests, keys, bits (since `since`) and rate (bit/s over the last `window` s)."""
        now = self._clock()
        with self._lock:
            requests, keys, bits = self._totals.get(app, (0, 0, 0))
            recent = self._recent.get(app)
            if recent is not None:
                self._trim(recent, now)
            rate = sum(b for _, b in recent) / self.window if recent else 0.0
        return {"requests": requests, "keys": keys, "bits": bits, "rate": rate, "window": self.window, "since": self.since}

    def _trim(self, recent: collections.deque[tuple[float, int]], now: float) -> None:
        while recent and recent[0][0] <= now - self.window:
            recent.popleft()
