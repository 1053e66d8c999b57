"""An emulated N-port optical (fibre) switch, kind "optical-switch".

It owns the switch's cross-connect table (sdqkd-optical-switch `cross-connect`
entries) and publishes it to the lab's `Plant`, which is what makes light from a
QKD module reach a module at another node. A failed switch passes no light; the
table is kept (latching switch) and published again on repair or re-open.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from sdqkd.agents.drivers.base import Change, Driver, DriverError, Emit, Event
from sdqkd.agents.emulation.plant import Plant

log = logging.getLogger(__name__)


def _ports_of(entry: Mapping[str, Any]) -> tuple[int, int]:
    try:
        return int(entry["port-a"]), int(entry["port-b"])
    except (KeyError, TypeError, ValueError):
        raise DriverError("invalid-value", "a cross-connect needs integer port-a and port-b") from None


class OpticalSwitch(Driver):
    """One switch; Change keys are 'switch-name/port-a'."""

    kind: ClassVar[str] = "optical-switch"

    def __init__(self, name: str, plant: Plant, ports: int | None = None,
                 insertion_loss: float | None = None) -> None:
        """ports / insertion_loss default to the switch's entry in the lab topology."""
        topo_ports, topo_loss = plant.switch_ports(name)
        self.name = name
        self.port_count = int(ports if ports is not None else topo_ports)
        self.insertion_loss = float(insertion_loss if insertion_loss is not None else topo_loss)
        self._plant = plant
        self._lock = threading.Lock()
        self._table: dict[int, int] = {}  # port-a -> port-b, as configured
        self._oper = "down"
        self._emit: Emit = lambda event: None

    # --- Driver -----------------------------------------------------------------

    def open(self, emit: Emit) -> None:
        self._emit = emit
        with self._lock:
            self._oper = "up"
            self._publish()

    def close(self) -> None:
        with self._lock:
            if self._oper == "up":
                self._oper = "down"

    def handles(self, change: Change) -> bool:
        return change.kind == "cross-connect" and change.key.rpartition("/")[0] == self.name

    def check(self, change: Change) -> None:
        if change.new is None:
            return
        a, b = _ports_of(change.new)
        key_port = change.key.rpartition("/")[2]
        if key_port and key_port != str(a):
            raise DriverError("invalid-value", f"key '{change.key}' does not match port-a {a}")
        for port in (a, b):
            if not 1 <= port <= self.port_count:
                raise DriverError("invalid-value",
                                  f"switch '{self.name}' has ports 1..{self.port_count}, not {port}")
        if a == b:
            raise DriverError("invalid-value", f"port {a} cannot be cross-connected to itself")
        with self._lock:
            if self._oper == "failed":
                raise DriverError("operation-failed", f"switch '{self.name}' has failed")
            busy = self._used_ports(exclude=_ports_of(change.old) if change.old else None)
        for port in (a, b):
            if port in busy:
                raise DriverError("resource-denied",
                                  f"port {port} of switch '{self.name}' is already cross-connected "
                                  f"to port {busy[port]}")

    def apply(self, change: Change) -> None:
        with self._lock:
            if change.old is not None:
                old_a, _ = _ports_of(change.old)
                self._table.pop(old_a, None)
            if change.new is not None:
                a, b = _ports_of(change.new)
                self._table[a] = b
            self._publish()

    def state(self) -> dict[str, Any]:
        with self._lock:
            peers = self._used_ports()
            return {
                "name": self.name,
                "port-count": self.port_count,
                "insertion-loss": self.insertion_loss,
                "oper-status": self._oper,
                "cross-connects": dict(sorted(self._table.items())),
                "ports": {p: {"peer-port": peers.get(p), "connected-to": self._plant.patched_to(self.name, p)}
                          for p in range(1, self.port_count + 1)},
            }

    # --- failures -----------------------------------------------------------------

    def inject_failure(self, kind: str = "hardware") -> None:
        """The switch stops passing light until repair()."""
        self._set_oper("failed", kind)

    def repair(self) -> None:
        self._set_oper("up", "repaired")

    # --- internals ----------------------------------------------------------------

    def _set_oper(self, oper: str, reason: str) -> None:
        with self._lock:
            if self._oper == oper:
                return
            self._oper = oper
            self._publish()
        log.warning("switch %s is %s (%s)", self.name, oper, reason)
        try:
            self._emit(Event("switch-status", {"name": self.name, "oper-status": oper, "reason": reason}))
        except Exception:  # an agent handler must not break the device
            log.exception("switch-status handler failed")

    def _used_ports(self, exclude: tuple[int, int] | None = None) -> dict[int, int]:
        """port -> peer port for every configured cross-connect (both directions)."""
        used: dict[int, int] = {}
        for a, b in self._table.items():
            if exclude is not None and a == exclude[0]:
                continue
            used[a], used[b] = b, a
        return used

    def _publish(self) -> None:
        """Hand the plant what light actually sees: nothing from a switch that is not up."""
        self._plant.set_cross_connects(self.name, self._table if self._oper == "up" else {})
