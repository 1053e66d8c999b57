"""What is wrong now, for operators (gRPC ListAlarms).

An alarm is a condition, not an event: it is derived from the current view (agents'
sessions, the topology, the applications' states) each time it is asked for, so it can
never be left raised after the condition went away. Only `since` needs memory: the
controller marks conditions the moment it learns of them (a session lost, an application
degraded, a node's re-read showing a link down) and a condition first seen at listing
time gets that time. A condition that clears is forgotten, so a new occurrence starts a
new `since`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

# ordered as the proto's Alarm.Severity
WARNING, MINOR, MAJOR, CRITICAL = "WARNING", "MINOR", "MAJOR", "CRITICAL"
SEVERITIES = (WARNING, MINOR, MAJOR, CRITICAL)


@dataclass(frozen=True)
class Alarm:
    kind: str  # node-disconnected, link-down, application-degraded, ...
    resource: str  # qkdn_id, qkdl_id or app_id
    severity: str
    text: str
    since: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.resource)


class AlarmClock:
    """The first-seen times of the conditions that hold now. Thread-safe."""

    def __init__(self) -> None:
        self._since: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def mark(self, kind: str, resource: str, at: float | None = None) -> None:
        """The controller learnt of a condition now (kept if already known)."""
        with self._lock:
            self._since.setdefault((kind, resource), time.time() if at is None else at)

    def clear(self, kind: str, resource: str) -> None:
        """The condition is gone: its next occurrence is a new one."""
        with self._lock:
            self._since.pop((kind, resource), None)

    def current(self, found: Iterable[Alarm]) -> list[Alarm]:
        """`found` (the conditions holding now) with their since; forgets the rest. Most
        severe first, then oldest."""
        now = time.time()
        out = []
        with self._lock:
            keep = {}
            for a in found:
                since = self._since.get(a.key, now)
                keep[a.key] = since
                out.append(Alarm(a.kind, a.resource, a.severity, a.text, since))
            self._since = keep
        return sorted(out, key=lambda a: (-SEVERITIES.index(a.severity), a.since, a.kind, a.resource))
