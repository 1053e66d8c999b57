"""Failure rehearsal on a running lab, through the `sdqkd` command as an operator types it:
`lab cut|splice FIBRE` darkens and restores the QKD link over the fibre (the agent's own
NETCONF state and `lab status` say so); `lab kill|start NODE` crashes an agent (or the
controller) and brings it back on its ports, answering NETCONF; `lab down` leaves no
process of the lab running, including those started after `lab up`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ncclient import manager

from sdqkd.lab import launcher
from test_lab_cli import one_line_error, sdqkd, small_lab

ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The 3-node cloud lab without hosts (CAIT - CCS - Rectorado), brought up by the command."""
    top = tmp_path_factory.mktemp("rehearse")
    up = sdqkd("lab", "up", str(small_lab(top / "r.json", "rehearse")), "--free-ports", cwd=top)
    assert up.returncode == 0, up.stderr[-2000:]
    try:
        yield {"top": top, "state": top / ".sdqkd" / "lab" / "rehearse" / "lab.json"}
    finally:
        sdqkd("lab", "down", "rehearse", cwd=top)


def lab_json(lab: dict[str, Any]) -> dict[str, Any]:
    return json.loads(lab["state"].read_text())


def node(lab: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in lab_json(lab)["nodes"] if n["name"] == name)


def status(lab: dict[str, Any]) -> dict[str, Any]:
    res = sdqkd("lab", "status", "--json", cwd=lab["top"])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last})")


def netconf(entry: dict[str, Any]) -> manager.Manager:
    nc = entry["netconf"]
    return manager.connect(host=nc["host"], port=nc["port"], username=nc["username"], password=nc["password"],
                           hostkey_verify=False, look_for_keys=False, allow_agent=False, timeout=20)


def link_state(m: manager.Manager) -> tuple[str | None, int]:
    """(status, SKR b/s) of the agent's one PHYS link, from its NETCONF operational state."""
    data = m.get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkd_links/></qkd_node>')).data
    st = data.findtext(f".//{{{ETSI}}}qkdl_status")
    return (st.rsplit(":", 1)[-1] if st else None), int(data.findtext(f".//{{{ETSI}}}skr") or 0)


def link(st: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    return next(lk for lk in st["links"] if {lk["a"], lk["b"]} == {a, b})


def lab_pids(top: Path) -> list[str]:
    return subprocess.run(["pgrep", "-f", str(top)], capture_output=True, text=True).stdout.split()


def test_cut_darkens_the_link_over_the_fibre_and_splice_brings_it_back(lab: dict[str, Any]) -> None:
    top = lab["top"]
    line = one_line_error(sdqkd("lab", "cut", "f-nowhere", cwd=top))
    assert "no fibre 'f-nowhere' in lab rehearse (fibres: f-cait-ccs, f-ccs-rectorado)" in line
    with netconf(node(lab, "Rectorado")) as m:
        assert wait_for(lambda: link_state(m)[0] == "ACTIVE" and link_state(m)[1] > 0, "Rectorado's link ACTIVE")
        res = sdqkd("lab", "cut", "f-ccs-rectorado", cwd=top)
        assert res.returncode == 0 and res.stdout.strip() == "fibre f-ccs-rectorado cut", res.stderr
        wait_for(lambda: link_state(m) == ("PASSIVE", 0), "the agent's link PASSIVE with no key rate")
        st = wait_for(lambda: (s := status(lab)) and link(s, "CCS", "Rectorado")["status"] == "PASSIVE" and s,
                      "lab status: CCS - Rectorado PASSIVE")
        assert link(st, "CCS", "Rectorado")["skr_kbps"] == 0
        assert {f["name"]: f["cut"] for f in st["fibres"]} == {"f-cait-ccs": False, "f-ccs-rectorado": True}
        assert link(st, "CAIT", "CCS")["status"] == "ACTIVE"  # the other fibre still carries its link
        again = sdqkd("lab", "cut", "f-ccs-rectorado", cwd=top)
        assert again.returncode == 0 and "already cut" in again.stdout
        res = sdqkd("lab", "splice", "f-ccs-rectorado", cwd=top)
        assert res.returncode == 0 and res.stdout.strip() == "fibre f-ccs-rectorado spliced", res.stderr
        wait_for(lambda: link_state(m)[0] == "ACTIVE" and link_state(m)[1] > 0, "the agent's link ACTIVE again")
    st = wait_for(lambda: (s := status(lab)) and link(s, "CCS", "Rectorado")["skr_kbps"] > 0 and s,
                  "lab status: key rate back")
    assert not any(f["cut"] for f in st["fibres"]) and link(st, "CCS", "Rectorado")["status"] == "ACTIVE"


QRNG_NS = "urn:sdqkd:yang:sdqkd-qrng"


def qrng_state(m: manager.Manager) -> str | None:
    """The node's QRNG state (sdqkd-qrng `qrng`), from its NETCONF operational state."""
    return m.get(filter=("subtree", f'<qrng xmlns="{QRNG_NS}"/>')).data.findtext(f"{{{QRNG_NS}}}qrng/{{{QRNG_NS}}}state")


def test_status_shows_key_stock_delivery_and_devices(lab: dict[str, Any]) -> None:
    top = lab["top"]
    got = sdqkd("key", "get", "--from", "CAIT", "--to", "Rectorado", cwd=top)
    assert got.returncode == 0, got.stderr
    def app_of(st: dict[str, Any]) -> dict[str, Any]:
        return next(a for a in st["applications"] if (a["master_sae"], a["slave_sae"]) == ("sae-cait", "sae-rectorado"))

    # the controller re-reads each agent about once a second while its links make keys
    st = wait_for(lambda: (s := status(lab)) and all(len(lk["stock"]) == 2 and lk["key_bits"] > 0 for lk in s["links"])
                  and all(app_of(s)["ends"].get(n, {}).get("keys") for n in ("CAIT", "Rectorado")) and s,
                  "lab status: keys stored at both ends of both links, the key delivered at both ends")
    for lk in st["links"]:
        assert lk["device"] == "emulated" and lk["device_urls"] == []
        assert lk["key_bits"] == min(end["bits"] for end in lk["stock"].values())
        assert set(lk["stock"]) == {lk["a"], lk["b"]}
    app = app_of(st)
    assert app["ends"]["CAIT"]["keys"] == 1 and app["ends"]["Rectorado"]["keys"] == 1, app
    assert app["ends"]["CAIT"]["bits"] == 256 * app["ends"]["CAIT"]["keys"]
    assert app["ends"]["CAIT"]["available_keys"] is not None
    text = sdqkd("lab", "status", cwd=top)
    assert text.returncode == 0, text.stderr
    for heading in ("keys a/b", "kbit", "device", "emulated", "applications", "available"):
        assert heading in text.stdout, text.stdout


def test_qrng_fail_and_repair(lab: dict[str, Any]) -> None:
    top = lab["top"]
    line = one_line_error(sdqkd("lab", "qrng-fail", "CCS", cwd=top))
    assert "node CCS has no emulated QRNG (nodes with one: Rectorado)" in line
    with netconf(node(lab, "Rectorado")) as m:
        assert wait_for(lambda: qrng_state(m) == "ok", "Rectorado's QRNG ok")
        res = sdqkd("lab", "qrng-fail", "rectorado", "--kind", "biased", cwd=top)
        assert res.returncode == 0 and res.stdout.strip() == "QRNG of Rectorado: biased fault injected", res.stderr
        wait_for(lambda: qrng_state(m) == "failed", "Rectorado's QRNG failed (adaptive proportion test)")
        # the controller re-reads the node on its source-failed notification: lab status has it too
        wait_for(lambda: {n["name"]: n["qrng"] for n in status(lab)["nodes"]} == {"CAIT": None, "CCS": None, "Rectorado": "failed"},
                 "lab status: Rectorado's QRNG failed")
        data = m.get(filter=("subtree", f'<qrng xmlns="{QRNG_NS}"><last-failure/></qrng>')).data
        assert data.findtext(f".//{{{QRNG_NS}}}last-failure/{{{QRNG_NS}}}test") in ("adaptive-proportion", "repetition-count")
        assert status(lab)["qrng_faults"] == {"Rectorado": "biased"}
        assert "QRNG of Rectorado: biased fault injected" in sdqkd("lab", "status", cwd=top).stdout
        res = sdqkd("lab", "qrng-repair", "Rectorado", cwd=top)
        assert res.returncode == 0 and res.stdout.strip() == "QRNG of Rectorado repaired (biased fault cleared)", res.stderr
        wait_for(lambda: qrng_state(m) == "ok", "Rectorado's QRNG ok after the repair")
        assert status(lab)["qrng_faults"] == {}
        # a transient: the tests trip, the source recovers by itself and reads degraded
        assert sdqkd("lab", "qrng-fail", "Rectorado", "--kind", "glitch", cwd=top).returncode == 0
        wait_for(lambda: qrng_state(m) == "degraded", "Rectorado's QRNG degraded after a glitch")
        assert "a glitch was injected" in sdqkd("lab", "status", cwd=top).stdout
        assert sdqkd("lab", "qrng-repair", "Rectorado", cwd=top).returncode == 0


def test_the_controller_killed_and_started_again(lab: dict[str, Any]) -> None:
    top = lab["top"]
    pid = lab_json(lab)["controller"]["pid"]
    res = sdqkd("lab", "kill", "controller", "--signal", "term", cwd=top)
    assert res.returncode == 0 and res.stdout.strip() == f"controller (pid {pid}) stopped by SIGTERM", res.stderr
    assert not launcher.is_lab_process(pid)
    st = status(lab)
    assert st["error"] == "controller unreachable: UNAVAILABLE"
    ctl = next(p for p in st["processes"] if p["name"] == "controller")
    assert not ctl["running"] and ctl["down"]["signal"] == "SIGTERM"
    res = sdqkd("lab", "start", "controller", cwd=top)
    assert res.returncode == 0, res.stderr
    new = lab_json(lab)["controller"]["pid"]
    assert new != pid and launcher.is_lab_process(new) and f"(pid {new})" in res.stdout
    st = wait_for(lambda: (s := status(lab)) and "nodes" in s and all(n["up"] for n in s["nodes"]) and s,
                  "the restarted controller sees every node")
    assert all(p["running"] for p in st["processes"])


def test_a_node_killed_9_and_started_again_answers_netconf(lab: dict[str, Any]) -> None:
    top = lab["top"]
    line = one_line_error(sdqkd("lab", "kill", "Nowhere", cwd=top))
    assert "no node 'Nowhere' in lab rehearse (nodes: CCS, CAIT, Rectorado; or controller)" in line
    before = node(lab, "CAIT")
    pid = before["pid"]
    res = sdqkd("lab", "kill", "cait", cwd=top)  # node names in any case, as `lab exec`
    assert res.returncode == 0 and res.stdout.strip() == f"agent CAIT (pid {pid}) stopped by SIGKILL", res.stderr
    assert not launcher.is_lab_process(pid) and str(pid) not in lab_pids(top)
    assert node(lab, "CAIT")["pid"] is None and node(lab, "CAIT")["down"]["signal"] == "SIGKILL"
    cait = next(p for p in status(lab)["processes"] if p["name"] == "CAIT")
    assert cait == {"name": "CAIT", "pid": None, "running": False, "down": node(lab, "CAIT")["down"]}
    assert "not running" in one_line_error(sdqkd("lab", "kill", "CAIT", cwd=top))
    wait_for(lambda: not next(n for n in status(lab)["nodes"] if n["name"] == "CAIT")["up"],
             "the controller sees CAIT down")

    res = sdqkd("lab", "start", "CAIT", cwd=top)
    assert res.returncode == 0, res.stderr
    after = node(lab, "CAIT")
    assert after["pid"] != pid and launcher.is_lab_process(after["pid"]) and "down" not in after
    assert res.stdout.strip() == (f"agent CAIT is running again (pid {after['pid']}), "
                                  f"NETCONF {after['netconf']['host']}:{after['netconf']['port']}")
    with netconf(after) as m:  # same port, same credentials, same identity
        got = m.get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkdn_id/></qkd_node>')).data
        assert got.findtext(f".//{{{ETSI}}}qkdn_id") == before["qkdn_id"]
    assert "already running" in one_line_error(sdqkd("lab", "start", "CAIT", cwd=top))
    cait = next(p for p in status(lab)["processes"] if p["name"] == "CAIT")
    assert cait == {"name": "CAIT", "pid": after["pid"], "running": True}


def test_a_node_whose_port_is_taken_does_not_start_and_says_why(lab: dict[str, Any]) -> None:
    """The restarted agent loses its NETCONF port to another program: one line naming it,
    the node stays recorded down, nothing of it left running."""
    import socket

    top = lab["top"]
    entry = node(lab, "Rectorado")
    assert sdqkd("lab", "kill", "Rectorado", cwd=top).returncode == 0
    held = socket.create_server((entry["netconf"]["host"], entry["netconf"]["port"]))
    try:
        line = one_line_error(sdqkd("lab", "start", "Rectorado", cwd=top))
    finally:
        held.close()
    assert (f"agent Rectorado did not start: NETCONF cannot listen on {entry['netconf']['host']}:{entry['netconf']['port']}: "
            "address already in use; stop what holds it, then `sdqkd lab start Rectorado` again") in line
    assert node(lab, "Rectorado")["pid"] is None and node(lab, "Rectorado")["down"]["reason"] == "did not start"
    assert not subprocess.run(["pgrep", "-f", entry["config"]], capture_output=True, text=True).stdout.split()
    assert sdqkd("lab", "start", "Rectorado", cwd=top).returncode == 0


def test_down_stops_what_start_started(lab: dict[str, Any]) -> None:
    """After kill and start (and an agent an operator started by hand with the lab's config),
    `lab down` leaves no process of the lab and no lab.json."""
    top = lab["top"]
    assert sdqkd("lab", "kill", "CCS", cwd=top).returncode == 0
    assert sdqkd("lab", "start", "CCS", cwd=top).returncode == 0
    started = node(lab, "CCS")["pid"]
    by_hand = node(lab, "Rectorado")
    assert sdqkd("lab", "kill", "Rectorado", cwd=top).returncode == 0
    stray = subprocess.Popen([sys.executable, "-m", "sdqkd", "agent", "--config", by_hand["config"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: launcher._listening(by_hand["netconf"]["port"]), "the hand-started agent listening")
        assert len(lab_pids(top)) == 4  # three agents and the controller
        res = sdqkd("lab", "down", cwd=top)
        assert res.returncode == 0 and res.stdout.strip() == "lab rehearse is down", res.stderr
        assert stray.wait(10) is not None
        time.sleep(0.3)
        assert not launcher.is_lab_process(started)
        assert lab_pids(top) == []
        assert not lab["state"].exists()
    finally:
        if stray.poll() is None:
            os.kill(stray.pid, signal.SIGKILL)
            stray.wait(5)


def test_the_readme_rehearsal_names_what_madqci_has() -> None:
    """The README's rehearsal example runs on the MadQCI lab as written: every node and
    fibre it names is in lab/topologies/madqci.json, and every command exists."""
    from click.testing import CliRunner
    from testlib import REPO

    from sdqkd.cli import main

    text = (REPO / "README.md").read_text()
    block = text[text.index("**Rehearse failures.**"):]
    block = block[block.index("```sh"):block.index("```", block.index("```sh") + 5)]
    steps = [ln.split("#")[0].split()[1:] for ln in block.splitlines() if ln.startswith(".venv/bin/sdqkd lab ")]
    lab = json.loads((REPO / "lab" / "topologies" / "madqci.json").read_text())["sdqkd-lab:lab"]
    nodes, fibres = {n["name"] for n in lab["node"]} | {"controller"}, {f["name"] for f in lab["fibre"]}
    assert {s[1] for s in steps} == {"kill", "start", "cut", "splice", "status"}
    for _, verb, *args in steps:
        assert CliRunner().invoke(main, ["lab", verb, "--help"]).exit_code == 0
        if verb in ("kill", "start"):
            assert args[0] in nodes
        elif verb in ("cut", "splice"):
            assert args[0] in fibres
