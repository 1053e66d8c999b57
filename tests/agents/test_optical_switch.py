"""The optical switch driver: checks, cross-connect table, plant publication, failure."""
from __future__ import annotations

from pathlib import Path

import pytest

from sdqkd.agents.drivers.base import Change, DriverError, Event
from sdqkd.agents.drivers.optical_switch import OpticalSwitch
from sdqkd.agents.emulation.plant import Plant
from sdqkd.agents.drivers.registry import create

LAB = {
    "name": "sw",
    "switch": [{"name": "osw1", "node": "A", "ports": 6, "insertion-loss": "0.8"}],
    "node": [{"name": "A", "qkd-interface": [{"id": 1, "profile": "p", "attachment": {"switch": "osw1", "port": 1}}]},
             {"name": "B", "qkd-interface": [{"id": 1, "profile": "p", "attachment": {"switch": "osw1", "port": 2}}]},
             {"name": "C", "qkd-interface": [{"id": 1, "profile": "p", "attachment": {"switch": "osw1", "port": 3}}]}],
}


def xc(a: int, b: int, old: tuple[int, int] | None = None, switch: str = "osw1") -> Change:
    return Change("cross-connect", f"{switch}/{a}", None if old is None else {"port-a": old[0], "port-b": old[1]},
                  {"port-a": a, "port-b": b})


@pytest.fixture
def env(tmp_path: Path):
    plant = Plant(LAB, tmp_path / "plant.db")
    events: list[Event] = []
    sw = create("optical-switch", name="osw1", plant=plant)
    assert isinstance(sw, OpticalSwitch)
    sw.open(events.append)
    yield sw, plant, events
    sw.close()
    plant.close()


def test_handles_only_its_own_cross_connects(env) -> None:
    sw, _, _ = env
    assert sw.handles(xc(1, 2))
    assert not sw.handles(xc(1, 2, switch="osw10"))
    assert not sw.handles(Change("qkd-link", "osw1/1", None, {}))


def test_check_rejects_bad_ports_and_busy_ports(env) -> None:
    sw, _, _ = env
    for bad in (xc(0, 2), xc(1, 7), xc(3, 3)):
        with pytest.raises(DriverError) as err:
            sw.check(bad)
        assert err.value.reason == "invalid-value"
    with pytest.raises(DriverError):
        sw.check(Change("cross-connect", "osw1/2", None, {"port-a": 1, "port-b": 3}))  # key vs port-a
    sw.check(xc(1, 2))
    sw.apply(xc(1, 2))
    for busy in (xc(2, 4), xc(4, 1), xc(3, 2)):  # both ports of 1<->2 are taken, both ways
        with pytest.raises(DriverError) as err:
            sw.check(busy)
        assert err.value.reason == "resource-denied"
    sw.check(xc(1, 3, old=(1, 2)))  # moving the same cross-connect is fine
    sw.check(Change("cross-connect", "osw1/1", {"port-a": 1, "port-b": 2}, None))  # deletion


def test_apply_publishes_to_the_plant_and_inverse_undoes(env) -> None:
    sw, plant, _ = env
    change = xc(1, 2)
    sw.apply(change)
    ch = plant.trace("A", 1)
    assert (ch.peer_node, ch.loss_db) == ("B", 0.8)
    move = xc(1, 3, old=(1, 2))
    sw.apply(move)
    assert plant.trace("A", 1).peer_node == "C" and plant.trace("B", 1) is None
    sw.apply(move.inverse())
    assert plant.trace("A", 1).peer_node == "B"
    sw.apply(change.inverse())
    assert plant.trace("A", 1) is None and plant.cross_connects("osw1") == {}


def test_state_shape(env) -> None:
    sw, _, _ = env
    sw.apply(xc(2, 5))
    st = sw.state()
    assert {k: st[k] for k in ("name", "port-count", "insertion-loss", "oper-status")} == \
        {"name": "osw1", "port-count": 6, "insertion-loss": 0.8, "oper-status": "up"}
    assert st["cross-connects"] == {2: 5}
    assert st["ports"][2]["peer-port"] == 5 and st["ports"][5]["peer-port"] == 2
    assert st["ports"][1] == {"peer-port": None, "connected-to": "A:1"}
    assert sorted(st["ports"]) == [1, 2, 3, 4, 5, 6]


def test_failure_stops_light_until_repair(env) -> None:
    sw, plant, events = env
    sw.apply(xc(1, 2))
    sw.inject_failure()
    assert sw.state()["oper-status"] == "failed"
    assert plant.trace("A", 1) is None
    assert events[-1] == Event("switch-status", {"name": "osw1", "oper-status": "failed", "reason": "hardware"})
    with pytest.raises(DriverError) as err:
        sw.check(xc(3, 4))
    assert err.value.reason == "operation-failed"
    sw.repair()
    assert plant.trace("A", 1).peer_node == "B"
    assert events[-1].data["oper-status"] == "up" and len(events) == 2


def test_reopen_publishes_the_kept_table(env) -> None:
    sw, plant, _ = env
    sw.apply(xc(1, 2))
    plant.set_cross_connects("osw1", {})  # e.g. a stale state file from another run
    sw.close()
    sw.open(lambda e: None)
    assert plant.trace("A", 1).peer_node == "B"
