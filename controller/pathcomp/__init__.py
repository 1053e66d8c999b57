"""Path computation: pure functions of (topology snapshot, request) -> result, no I/O.

relay: key-relay paths over trusted nodes (which existing QKD links carry a key end to end).
optical: direct quantum channels through optical switches (route, wavelength, loss budget).
"""
from __future__ import annotations


class NoPath(Exception):
    """No plan satisfies the request; `reason` says why, as specifically as known.

    For rate failures achievable_bps is the best the returned kind of plan reached and
    maxflow_bps the max-flow bound, so the caller can renegotiate instead of guessing."""

    def __init__(self, reason: str, achievable_bps: float | None = None,
                 maxflow_bps: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.achievable_bps = achievable_bps
        self.maxflow_bps = maxflow_bps
