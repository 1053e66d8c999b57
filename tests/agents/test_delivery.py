"""Per-application delivery counters (sdqkd-key-stock key-delivery): totals since the
start, and a rate over a sliding window that forgets what left it."""
from __future__ import annotations

import pytest

from sdqkd.agents.kms.delivery import Deliveries


def test_totals_and_a_sliding_rate() -> None:
    now = [100.0]
    d = Deliveries(window=10, clock=lambda: now[0])
    assert d.get("app")["requests"] == 0 and d.get("app")["rate"] == 0.0
    d.record("app", 2, 512)
    now[0] += 4
    d.record("app", 1, 256)
    d.record("other", 1, 8192)
    got = d.get("app")
    assert (got["requests"], got["keys"], got["bits"], got["window"]) == (2, 3, 768, 10)
    assert got["rate"] == pytest.approx(76.8)
    now[0] += 7  # the first request is 11 s old: out of the window, still in the totals
    got = d.get("app")
    assert got["rate"] == pytest.approx(25.6) and got["bits"] == 768
    now[0] += 10
    assert d.get("app")["rate"] == 0.0 and d.get("other")["bits"] == 8192
