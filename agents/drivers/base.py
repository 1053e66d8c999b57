"""The small interface every device driver implements (TeraFlowSDN's driver cut to
five methods, in sysrepo's check-then-apply shape).

Drivers never see NETCONF or XML. The datastore hands them `Change`s computed at
commit time, as plain RFC 7951 JSON objects of the list entry that changed; the
agent turns the `Event`s they emit into ETSI 015 notifications, and merges
`state()` into `<get>` replies.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


class DriverError(Exception):
    """A change the device refuses. `reason` picks the rpc-error tag:
    'invalid-value' (bad parameter), 'resource-denied' (busy, no capacity),
    'operation-failed' (device fault)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Change:
    """One configuration change for one device.

    kind: 'qkd-link' (an ETSI 015 qkd_link entry), 'cross-connect' (an
    sdqkd-optical-switch cross-connect entry; key is 'switch/port-a').
    old / new: the entry as an RFC 7951 JSON object (inner names unqualified,
    as libyang prints them), None when created / deleted.
    """

    kind: str
    key: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None

    def inverse(self) -> "Change":
        return Change(self.kind, self.key, self.new, self.old)


@dataclass(frozen=True)
class Event:
    """Something a device reports on its own.

    kind: 'interface-status' (data: qkdi_id, status, reason), 'link-status'
    (qkdl_id, status, reason), 'link-perf' (qkdl_id, skr, qber),
    'switch-status' (name, oper-status).
    """

    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)


Emit = Callable[[Event], None]


class Driver(abc.ABC):
    """One device (a QKD module, an optical switch)."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def open(self, emit: Emit) -> None:
        """Start talking to the device; report what it does through `emit`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop; idempotent."""

    @abc.abstractmethod
    def handles(self, change: Change) -> bool:
        """True when this device is the one `change` configures."""

    @abc.abstractmethod
    def check(self, change: Change) -> None:
        """Raise DriverError if the device cannot take `change`; no side effects."""

    @abc.abstractmethod
    def apply(self, change: Change) -> None:
        """Carry out a checked change. Undo is apply(change.inverse())."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """Operational state, read now (see each driver for its shape)."""
