"""The emulated optical plant: fixed links, switched paths, dead ends, cuts, shared state."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdqkd.agents.emulation.plant import Plant


def lab() -> dict:
    """X-Y fixed link; A's module reaches C's or D's through switches swA and swB."""
    return {"sdqkd-lab:lab": {
        "name": "t",
        "switch": [{"name": "swA", "node": "A", "ports": 8},
                   {"name": "swB", "node": "B", "ports": 8, "insertion-loss": "1.5"}],
        "node": [
            {"name": "A", "qkd-interface": [{"id": 1, "profile": "p", "attachment": {"switch": "swA", "port": 1}}]},
            {"name": "B"},
            {"name": "C", "qkd-interface": [{"id": 1, "profile": "p", "attachment": {"switch": "swB", "port": 2}}]},
            {"name": "D", "qkd-interface": [{"id": 4, "profile": "p", "attachment": {"switch": "swB", "port": 3}}]},
            {"name": "X", "qkd-interface": [{"id": 1, "profile": "p"}, {"id": 2, "profile": "p", "channel": "34"}]},
            {"name": "Y", "qkd-interface": [{"id": 1, "profile": "p"}, {"id": 2, "profile": "p"},
                                            {"id": 3, "profile": "p"}]},
        ],
        "fibre": [
            {"name": "fAB", "length": "7.8", "loss": "4.0",
             "a-end": {"node": "A", "switch": "swA", "port": 5}, "b-end": {"node": "B", "switch": "swB", "port": 6},
             "mux-channel": ["34", "37", "38"],
             "classical-channel": [{"name": "c1", "channel": "36"}, {"name": "c2", "channel": "40"},
                                   {"name": "o1", "band": "O-band"}]},
            {"name": "fXY", "length": "24.1", "loss": "7.47", "a-end": {"node": "X"}, "b-end": {"node": "Y"},
             "classical-channel": [{"name": f"c{i}", "channel": str(20 + i)} for i in range(6)]},
            {"name": "fX2", "length": "1", "loss": "0.5", "a-end": {"node": "X"}, "b-end": {"node": "Y"}},
        ],
        "link": [
            {"name": "l1", "endpoints": ["X:1", "Y:1"], "path": ["fXY"]},
            {"name": "l2", "endpoints": ["X:2", "Y:2"], "path": ["fXY", "fX2"], "loss": "9.1"},
        ],
    }}


@pytest.fixture
def plant(tmp_path: Path) -> Plant:
    p = Plant(lab(), tmp_path / "plant.db")
    yield p
    p.close()


def test_fixed_link_trace_both_ways(plant: Plant) -> None:
    ch = plant.trace("X", 1)
    assert (ch.peer_node, ch.peer_qkdi_id, ch.fibres, ch.loss_db) == ("Y", 1, ("fXY",), 7.47)
    assert ch.classical == {"C-band": 6} and not ch.cut
    back = plant.trace("Y", 1)
    assert (back.peer_node, back.peer_qkdi_id) == ("X", 1)
    stated = plant.trace("Y", 2)
    assert (stated.peer_node, stated.loss_db, stated.fibres) == ("X", 9.1, ("fXY", "fX2"))
    assert stated.wavelength is None and plant.trace("X", 2).wavelength == 34  # fixed module channel
    assert plant.trace("Y", 3) is None  # no link, no attachment
    with pytest.raises(KeyError):
        plant.trace("Y", 9)


def test_switched_path_through_two_switches(plant: Plant) -> None:
    assert plant.trace("A", 1) is None  # no cross-connects yet: dead end
    plant.set_cross_connects("swA", {1: 5})
    assert plant.trace("A", 1) is None  # light reaches swB port 6, which goes nowhere
    plant.set_cross_connects("swB", {2: 6})
    ch = plant.trace("A", 1)
    assert (ch.peer_node, ch.peer_qkdi_id) == ("C", 1)
    assert ch.loss_db == pytest.approx(1.0 + 4.0 + 1.5)
    assert ch.fibres == ("fAB",) and ch.switches == ("swA", "swB")
    assert ch.classical == {"C-band": 2, "O-band": 1}
    back = plant.trace("C", 1)
    assert (back.peer_node, back.peer_qkdi_id, back.loss_db) == ("A", 1, ch.loss_db)
    plant.set_cross_connects("swB", {6: 3})  # re-point to D
    assert (plant.trace("A", 1).peer_node, plant.trace("A", 1).peer_qkdi_id) == ("D", 4)
    assert plant.trace("C", 1) is None
    plant.set_cross_connects("swA", {})
    assert plant.trace("A", 1) is None


def test_classical_coexistence_and_muxes(plant: Plant) -> None:
    plant.set_cross_connects("swA", {1: 5})
    plant.set_cross_connects("swB", {6: 2})
    on = plant.trace("A", 1, wavelength=36)
    assert on.same_channel and on.crosstalk and on.blocked == ("fAB",)
    near = plant.trace("A", 1, wavelength=37)
    assert near.adjacent_channel and not near.same_channel and not near.blocked
    clear = plant.trace("A", 1, wavelength=38)
    assert not clear.crosstalk and not clear.blocked


def test_fibre_cut_and_splice(plant: Plant) -> None:
    assert not plant.trace("X", 1).cut
    plant.cut_fibre("fXY")
    assert plant.trace("X", 1).cut and plant.trace("Y", 2).cut and plant.is_cut("fXY")
    plant.cut_fibre("fXY", cut=False)
    assert not plant.trace("X", 1).cut
    with pytest.raises(KeyError):
        plant.cut_fibre("nope")
    with pytest.raises(KeyError):
        plant.set_cross_connects("nope", {1: 2})


def test_second_plant_and_other_process_see_the_same_state(plant: Plant, tmp_path: Path) -> None:
    other = Plant(lab(), tmp_path / "plant.db")
    try:
        assert other.trace("A", 1) is None  # cached now
        plant.set_cross_connects("swA", {1: 5})
        plant.set_cross_connects("swB", {6: 2})
        assert other.trace("A", 1).peer_node == "C"
        assert other.cross_connects("swB") == {6: 2, 2: 6}
        script = (
            "import json, sys; from sdqkd.agents.emulation.plant import Plant;"
            "p = Plant(json.loads(sys.argv[1]), sys.argv[2]);"
            "print(p.trace('A', 1).peer_node);"
            "p.set_cross_connects('swB', {6: 3}); p.cut_fibre('fAB'); p.close()"
        )
        out = subprocess.run([sys.executable, "-c", script, json.dumps(lab()), str(tmp_path / "plant.db")],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "C"
        for p in (plant, other):
            ch = p.trace("A", 1)
            assert (ch.peer_node, ch.cut) == ("D", True)
    finally:
        other.close()


def test_bad_patching_is_refused(tmp_path: Path) -> None:
    bad = lab()
    bad["sdqkd-lab:lab"]["fibre"][0]["b-end"] = {"node": "B", "switch": "swB", "port": 2}  # C:1 is there
    with pytest.raises(ValueError, match="patched twice"):
        Plant(bad, tmp_path / "bad.db")
    bad = lab()
    bad["sdqkd-lab:lab"]["fibre"][0]["b-end"] = {"node": "B", "switch": "swB", "port": 9}
    with pytest.raises(ValueError, match="no port 9"):
        Plant(bad, tmp_path / "bad2.db")
