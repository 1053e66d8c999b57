"""The percentiles every benchmark prints, computed one way (nearest rank below)."""
from __future__ import annotations

import statistics


def p50_p99_ms(seconds: list[float]) -> tuple[float, float]:
    """Median and 99th percentile of durations in seconds, in milliseconds."""
    s = sorted(seconds)
    return statistics.median(s) * 1000, s[int(0.99 * (len(s) - 1))] * 1000
