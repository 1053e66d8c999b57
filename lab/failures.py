"""`sdqkd lab kill|start NODE`, `sdqkd lab cut|splice FIBRE` and `sdqkd lab qrng-fail|qrng-repair
NODE`: the failures the controller and the nodes must survive (a crashed agent or controller,
a cut fibre, a broken entropy source), rehearsed on a running lab.

A node's process is found and restarted through lab.json only: `kill` records the node as
down there, `start` starts it with the config file `lab up` wrote (the same code path as
`lab up`) and records its new pid at once, so `lab down` stops it whoever started it. A
fibre is cut in the lab's optical plant (the SQLite file every agent traces its quantum
channels through): its QKD links go dark at their modules' next tick, as on a real fibre.
A QRNG fault goes the same way: the node's emulated QRNG reads it from the plant within
0.2 s and its raw samples really go stuck or biased, so its SP 800-90B health tests trip
(sdqkd-qrng `qrng` state failed, a source-failed notification); a repair clears it and the
start-up tests bring it back.
"""
from __future__ import annotations

import json
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdqkd.agents.drivers.qrng import FAILURE_KINDS
from sdqkd.lab import labjson, launcher
from sdqkd.lab import plan as lab_plan
from sdqkd.lab.launcher import LabError
from sdqkd import private

CONTROLLER = "controller"
SIGNALS = ("KILL", "TERM", "INT")  # a crash, an orderly stop, ^C


def _target(data: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """(who, its lab.json entry) for a node name (any case) or `controller`; a node called
    "controller" wins, as the topology named it."""
    node = next((n for n in data["nodes"] if n["name"].lower() == name.lower()), None)
    if node is not None:
        return f"agent {node['name']}", node
    if name.lower() == CONTROLLER:
        return CONTROLLER, data["controller"]
    known = ", ".join(n["name"] for n in data["nodes"])
    raise LabError(f"no node {name!r} in lab {data['name']} (nodes: {known}; or {CONTROLLER})")


def kill(target: str, name: str | None = None, root: Path | None = None, *, sig: str = "KILL",
         timeout: float = 10.0) -> str:
    """Send a node's agent (or the controller) a signal, SIGKILL by default as a crash does,
    wait until it is gone and record it down in lab.json; the message says what happened."""
    signum = signal.Signals[f"SIG{sig.upper().removeprefix('SIG')}"]
    path = labjson.find(name, root)
    with labjson.locked(path):
        data = labjson.read(path)
        who, entry = _target(data, target)
        pid = entry.get("pid")
        if not pid or not launcher.is_lab_process(pid):
            raise LabError(f"{who} is not running; `sdqkd lab start {target}` starts it")
        if not launcher.signal_and_wait(pid, signum, timeout):
            raise LabError(f"{who} (pid {pid}) still runs {timeout:.0f} s after {signum.name}; "
                           f"`sdqkd lab kill {target}` sends SIGKILL")
        entry["pid"] = None
        entry["down"] = {"signal": signum.name, "pid": pid, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        labjson.write(path, data)
    return f"{who} (pid {pid}) stopped by {signum.name}"


def start(target: str, name: str | None = None, root: Path | None = None, *, timeout: float = 60.0) -> str:
    """Start a node's agent (or the controller) again with the config `lab up` gave it and
    wait until it listens; its pid goes to lab.json before the wait, so that `lab down`
    stops it even if this command is interrupted."""
    path = labjson.find(name, root)
    with labjson.locked(path):
        data = labjson.read(path)
        who, entry = _target(data, target)
        pid = entry.get("pid")
        if pid and launcher.is_lab_process(pid):
            raise LabError(f"{who} is already running (pid {pid}); `sdqkd lab kill {target}` stops it")
        config = launcher.config_paths(data)[who]
        private.tighten_tree(data["dir"])  # a lab brought up by a version that left its files readable
        if who == CONTROLLER:
            proc = launcher.spawn_controller(config, Path(entry["log"]))
        else:
            proc = launcher.spawn_agent(entry["name"], config, Path(entry["log"]))
        proc.in_use_hint = f"stop what holds it, then `sdqkd lab start {target}` again"
        entry["pid"] = proc.popen.pid
        entry.pop("down", None)
        labjson.write(path, data)
        try:
            if who == CONTROLLER:
                host, _, port = entry["grpc"].rpartition(":")
                launcher.wait_controller(proc, int(port), timeout, host)
                where = f"gRPC {entry['grpc']}"
            else:
                launcher.wait_agent(proc, timeout)
                where = f"NETCONF {entry['netconf']['host']}:{entry['netconf']['port']}"
        except BaseException as exc:
            launcher.stop_lab_process(proc.popen.pid)
            entry["pid"] = None
            entry["down"] = {"reason": "did not start", "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            labjson.write(path, data)
            if isinstance(exc, LabError):  # "agent X: NETCONF cannot listen ..." says who already
                raise LabError(f"{who} did not start: {str(exc).removeprefix(f'{who}: ')}") from None
            raise
    return f"{who} is running again (pid {proc.popen.pid}), {where}"


def cut(fibre: str, name: str | None = None, root: Path | None = None, *, splice: bool = False) -> str:
    """Cut a fibre of the lab's optical plant (splice=True: restore it); the message says
    whether it changed anything. Unknown names are refused with the known ones."""
    data = labjson.read(labjson.find(name, root))
    plant = launcher.plant(data)
    try:
        known = plant.fibres()
        if fibre not in known:
            raise LabError(f"no fibre {fibre!r} in lab {data['name']} (fibres: {', '.join(known) or 'none'})")
        was_cut = plant.is_cut(fibre)
        plant.cut_fibre(fibre, cut=not splice)
    finally:
        plant.close()
    if splice:
        return f"fibre {fibre} spliced" if was_cut else f"fibre {fibre} was not cut"
    return f"fibre {fibre} was already cut" if was_cut else f"fibre {fibre} cut"


def qrng(node: str, kind: str | None, name: str | None = None, root: Path | None = None) -> str:
    """Give `node`'s emulated QRNG hardware fault `kind` (stuck, biased: until repaired;
    glitch: a transient the source recovers from by itself), or repair it (kind None)."""
    if kind is not None and kind not in FAILURE_KINDS:
        raise LabError(f"unknown QRNG fault {kind!r} (known: {', '.join(FAILURE_KINDS)})")
    data = labjson.read(labjson.find(name, root))
    lab = lab_plan.lab_object(json.loads(Path(data["topology"]).read_text()))
    entry = next((n for n in lab.get("node", []) if n["name"].lower() == node.lower()), None)
    if entry is None:
        raise LabError(f"no node {node!r} in lab {data['name']} (nodes: {', '.join(n['name'] for n in lab.get('node', []))})")
    with_qrng = [n["name"] for n in lab.get("node", []) if (n.get("qrng") or {}).get("source", "emulated") == "emulated"
                 and n.get("qrng") is not None]
    if entry["name"] not in with_qrng:
        raise LabError(f"node {entry['name']} has no emulated QRNG (nodes with one: {', '.join(with_qrng) or 'none'})")
    plant = launcher.plant(data)
    try:
        was = plant.qrng_fault(entry["name"])
        plant.set_qrng_fault(entry["name"], kind)
    finally:
        plant.close()
    if kind is None:
        return f"QRNG of {entry['name']} repaired ({was[0]} fault cleared)" if was else f"QRNG of {entry['name']} had no fault"
    return f"QRNG of {entry['name']}: {kind} fault injected"
