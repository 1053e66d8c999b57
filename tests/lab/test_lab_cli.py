"""The lab's first contact as a new user has it: the `sdqkd` command run as a process, from
any working directory. Every refusal is one line without a traceback: a topology that
`lab check` refuses, a port another program holds (named with its role, pointing at
--free-ports), an agent that loses a race for its port; two labs at once; the lab found
through --lab-dir, $SDQKD_LAB_DIR or the nearest .sdqkd/ up the tree."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdqkd.lab import plan as lab_plan
from sdqkd.lab.plan import free_port
from testlib import REPO

TOPOLOGIES = REPO / "lab" / "topologies"


def sdqkd(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "SDQKD_LAB_DIR"}
    return subprocess.run([sys.executable, "-m", "sdqkd", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def small_lab(path: Path, name: str, **defaults: Any) -> Path:
    """The cloud scenario without its lab hosts (no network namespaces): three agents, two links."""
    lab = json.loads((TOPOLOGIES / "cloud.json").read_text())["sdqkd-lab:lab"]
    lab["name"] = name
    lab["defaults"].update(defaults)
    for node in lab["node"]:
        node.pop("host", None)
    path.write_text(json.dumps({"sdqkd-lab:lab": lab}))
    return path


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """stderr of a refused command: exactly one `Error: ...` line, no traceback."""
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


class Held:
    """A port another program listens on."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))

    def close(self) -> None:
        self.sock.close()


def test_up_refuses_what_check_refuses_in_the_same_words(tmp_path: Path) -> None:
    bad = json.loads((TOPOLOGIES / "cloud.json").read_text())
    bad["sdqkd-lab:lab"]["profile"][0]["max-absorption"] = "abc"
    bad["sdqkd-lab:lab"]["link"][0]["endpoints"] = ["CAIT:1", "Nowhere:1"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    check = sdqkd("lab", "check", "bad.json", cwd=tmp_path)
    up = sdqkd("lab", "up", "bad.json", cwd=tmp_path)
    assert check.returncode == up.returncode == 1
    assert "max-absorption" in check.stderr and "Traceback" not in up.stderr
    assert [ln for ln in up.stderr.splitlines() if ln.startswith("bad.json: ")] == check.stderr.splitlines()
    assert not list(tmp_path.glob(".sdqkd/lab/*/lab.json"))


def test_a_held_port_is_named_with_its_role(tmp_path: Path) -> None:
    bases = {"netconf-port-base": free_port(), "kms-port-base": free_port(), "relay-port-base": free_port(),
             "controller-grpc-port": free_port()}
    topo = small_lab(tmp_path / "fixed.json", "fixed", **bases)
    held = Held(bases["kms-port-base"] + 1)  # the second node's ETSI 014 port
    try:
        res = sdqkd("lab", "up", str(topo), cwd=tmp_path)
    finally:
        held.close()
    line = one_line_error(res)
    assert f"port {bases['kms-port-base'] + 1} (agent CAIT ETSI 014/004 HTTPS)" in line
    assert "address already in use" in line and "--free-ports" in line
    assert not (tmp_path / ".sdqkd" / "lab" / "fixed" / "lab.json").exists()


def _roles(node: lab_plan.NodePlan) -> list[tuple[str, int]]:
    return [("NETCONF", node.netconf_port), ("ETSI 014/004 HTTPS", node.kms_port), ("key relay", node.relay_port),
            ("ETSI 004 JSON", node.etsi004_json_port), ("ETSI 004 binary", node.etsi004_binary_port),
            ("metrics HTTP", node.metrics_port),
            *((f"QKD service channel of interface {i}", p) for i, p in node.service_ports.items())]


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> lab_plan.LabPlan:
    tmp = tmp_path_factory.mktemp("plan")
    topo = json.loads(small_lab(tmp / "t.json", "race").read_text())
    return lab_plan.make(topo, tmp / "race", free_ports=True)


@pytest.mark.parametrize("role", ["NETCONF", "ETSI 014/004 HTTPS", "key relay", "ETSI 004 JSON", "ETSI 004 binary",
                                  "metrics HTTP", "QKD service channel of interface 1"])
def test_an_agent_that_loses_its_port_says_which_in_one_line(planned: lab_plan.LabPlan, role: str) -> None:
    """A port taken after `lab up` checked it: the agent exits 3 with one line, which `lab up` shows."""
    node = planned.nodes["CAIT"]
    port = dict(_roles(node))[role]
    held = Held(port)
    try:
        res = subprocess.run([sys.executable, "-m", "sdqkd", "agent", "--config", str(node.config_path)],
                             capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert res.returncode == 3
    assert "Traceback" not in res.stderr and " ERROR " not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1] == f"error: agent CAIT: {role} cannot listen on 127.0.0.1:{port}: address already in use"


@pytest.mark.parametrize("role", ["controller gRPC", "controller metrics HTTP"])
def test_a_controller_that_loses_its_port_says_so_in_one_line(planned: lab_plan.LabPlan, role: str) -> None:
    config = lab_plan.write_controller_config(planned)
    port = planned.controller_port if role == "controller gRPC" else planned.controller_metrics_port
    held = Held(port)
    try:
        res = subprocess.run([sys.executable, "-m", "sdqkd", "controller", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1] == (f"error: controller: {role} cannot listen on "
                                           f"127.0.0.1:{port}: address already in use")


@pytest.fixture(scope="module")
def two_labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two labs brought up by the command from a folder below the project's .sdqkd/."""
    top = tmp_path_factory.mktemp("project")
    (top / ".sdqkd").mkdir()
    sub = top / "deep" / "below"
    sub.mkdir(parents=True)
    ups = {}
    try:
        for name in ("alpha", "beta"):
            ups[name] = sdqkd("lab", "up", str(small_lab(top / f"{name}.json", name)), "--free-ports", cwd=sub)
        yield {"top": top, "sub": sub, "ups": ups}
    finally:
        for name in ("alpha", "beta"):
            sdqkd("lab", "down", name, "--cleanup", cwd=top)


def test_a_second_lab_comes_up_beside_the_first(two_labs: dict[str, Any]) -> None:
    for name, res in two_labs["ups"].items():
        assert res.returncode == 0, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        assert f"lab {name}: nodes" in res.stdout  # the status of the lab it brought up, not "several labs"
    labs = two_labs["top"] / ".sdqkd" / "lab"
    assert {p.parent.name for p in labs.glob("*/lab.json")} == {"alpha", "beta"}
    data = json.loads((labs / "beta" / "lab.json").read_text())
    assert Path(data["dir"]).is_absolute() and Path(data["ca"]["cert"]).is_absolute()  # usable from anywhere


def test_every_command_finds_the_lab_from_any_folder(two_labs: dict[str, Any], tmp_path: Path) -> None:
    top, sub = two_labs["top"], two_labs["sub"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the nearest .sdqkd/ up the tree
    res = sdqkd("lab", "status", "beta", "--json", cwd=sub)
    assert res.returncode == 0 and {n["name"] for n in json.loads(res.stdout)["nodes"]} == {"CCS", "CAIT", "Rectorado"}
    res = sdqkd("key", "get", "--lab", "alpha", "--from", "CAIT", "--to", "Rectorado", cwd=sub)
    assert res.returncode == 0 and "identical at both ends" in res.stdout, res.stderr
    # elsewhere: refused in one line that says how to point at the lab, then --lab-dir and the environment
    line = one_line_error(sdqkd("key", "get", "--lab", "alpha", "--from", "CAIT", "--to", "CCS", cwd=elsewhere))
    assert "no running lab 'alpha'" in line and "--lab-dir" in line and "SDQKD_LAB_DIR" in line
    res = sdqkd("key", "get", "--lab", "alpha", "--from", "CAIT", "--to", "CCS", "--lab-dir", str(top / ".sdqkd"), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    env = {"SDQKD_LAB_DIR": str(top / ".sdqkd")}
    res = sdqkd("topo", "plot", "--lab", "beta", "-o", str(elsewhere / "t.png"), cwd=elsewhere, env=env)
    assert res.returncode == 0 and (elsewhere / "t.png").stat().st_size > 0, res.stderr
    line = one_line_error(sdqkd("lab", "status", cwd=elsewhere, env=env))
    assert "several labs are running: name one (alpha, beta)" in line
    # tls: a session keyed by the lab found through the environment
    serve = subprocess.Popen([sys.executable, "-m", "sdqkd", "tls", "serve", "--lab", "beta", "--node", "Rectorado"],
                             cwd=elsewhere, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = serve.stdout.readline().split(":")[-1].strip()
        res = subprocess.run([sys.executable, "-m", "sdqkd", "tls", "connect", "--lab", "beta", "--node", "CAIT", "--to",
                              "Rectorado", "--port", port, "--idle", "1"], cwd=elsewhere, env={**os.environ, **env},
                             input="hello", capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout == "hello", res.stderr
    finally:
        serve.terminate()
        serve.wait(10)


def readme_sae_function() -> str:
    """The README's `sae()` shell helper, as written there."""
    text = (REPO / "README.md").read_text()
    start = text.index("sae() {")
    return text[start:text.index("}", text.index("return $rc", start)) + 1]


def test_the_readme_examples_run_on_lab_env(two_labs: dict[str, Any], tmp_path: Path) -> None:
    """`eval "$(sdqkd lab env NAME)"` and the README's sae() reach the lab's free ports from any folder;
    an error prints the server's JSON message and fails (no silent curl -s)."""
    top = two_labs["top"]
    script = f"""set -u
eval "$({sys.executable} -m sdqkd lab env --lab-dir {top / '.sdqkd'} alpha)"
{readme_sae_function()}
sae CAIT '/api/v1/keys?to=Rectorado'
sae CCS /api/v1/links
sae CAIT '/api/v1/keys?to=Nowhere' && echo UNEXPECTED
echo "grpc=$LAB_GRPC"
"""
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    key, links, error, grpc_line = res.stdout.strip().split("\n")
    lab = json.loads((top / ".sdqkd" / "lab" / "alpha" / "lab.json").read_text())
    assert json.loads(key)["slave"]["node"] == "Rectorado" and json.loads(links)["node"] == "CCS"
    assert "Nowhere" in json.loads(error)["message"] and "404" in res.stderr
    assert grpc_line == f"grpc={lab['controller']['grpc']}"


def test_each_node_serves_the_json_004_form_where_lab_json_and_lab_env_say(two_labs: dict[str, Any]) -> None:
    """`lab up` gives every agent an ETSI 004 JSON port (mutual TLS with the lab's SAE
    certificates); a stream opened and closed there, in the form the hybridization module sends."""
    import ssl

    from sdqkd.lab import labjson

    lab = json.loads((two_labs["top"] / ".sdqkd" / "lab" / "alpha" / "lab.json").read_text())
    nodes = {n["name"]: n for n in lab["nodes"]}
    cait, rectorado = nodes["CAIT"], nodes["Rectorado"]
    where = cait["kms"]["etsi004_json"]
    assert labjson.shell_env(lab)["CAIT_ETSI004_JSON_PORT"] == str(where["port"]) and where["tls"] is True
    ctx = ssl.create_default_context(cafile=lab["ca"]["cert"])
    ctx.load_cert_chain(cait["saes"][0]["cert"], cait["saes"][0]["key"])
    request = {"command": "OPEN_CONNECT", "data": {
        "source": f"qkd://sae-cait@{cait['qkdn_id']}", "destination": f"qkd://sae-rectorado@{rectorado['qkdn_id']}",
        "qos": {"key_chunk_size": 32, "max_bps": 32, "min_bps": 32, "jitter": 0, "priority": 0, "timeout": 0, "ttl": 0,
                "metadata_mimetype": "application/json"}}}
    with socket.create_connection((where["host"], where["port"]), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=where["host"]) as s:
        s.sendall(json.dumps(request).encode())
        opened = json.loads(s.recv(65057))
        assert opened["status"] == 1, opened  # open, Rectorado's application not yet
        s.sendall(json.dumps({"command": "CLOSE", "data": {"key_stream_id": opened["key_stream_id"]}}).encode())
        assert json.loads(s.recv(65057)) == {"status": 0}


def test_every_process_serves_prometheus_metrics_where_lab_json_says(two_labs: dict[str, Any]) -> None:
    """`lab up` gives the controller and every agent a /metrics endpoint (lab.json, lab env)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from sdqkd.lab import labjson

    lab = json.loads((two_labs["top"] / ".sdqkd" / "lab" / "alpha" / "lab.json").read_text())
    env = labjson.shell_env(lab)
    urls = {"controller": env["LAB_METRICS"], **{n["name"]: env[f"{n['name'].upper()}_METRICS"] for n in lab["nodes"]}}
    assert len(set(urls.values())) == len(lab["nodes"]) + 1
    for who, url in urls.items():
        with urllib.request.urlopen(url, timeout=10) as r:
            names = {f.name for f in text_string_to_metric_families(r.read().decode())}
        assert ("sdqkd_agent_up" if who == "controller" else "sdqkd_netconf_sessions") in names, who


def test_an_agent_killed_during_up_fails_it_cleanly(tmp_path: Path) -> None:
    """kill -9 of an agent while `lab up` waits for it: one line that says so, and nothing
    of the lab left running or recorded."""
    topo = small_lab(tmp_path / "k.json", "killed")
    up = subprocess.Popen([sys.executable, "-m", "sdqkd", "lab", "up", str(topo), "--free-ports"], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and up.poll() is None:
        found = subprocess.run(["pgrep", "-f", f"{tmp_path}/.sdqkd/lab/killed/nodes/CCS/agent.json"],
                               capture_output=True, text=True).stdout.split()
        victim = int(found[0]) if found else None
        time.sleep(0.02)
    assert victim is not None, "the agent never started"
    os.kill(victim, signal.SIGKILL)
    out, err = up.communicate(timeout=120)
    res = subprocess.CompletedProcess(up.args, up.returncode, out, err)
    assert "agent CCS was killed by SIGKILL" in one_line_error(res)
    time.sleep(0.5)
    assert not subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not list(tmp_path.glob(".sdqkd/lab/*/lab.json"))


def test_the_controller_takes_the_labs_orchestrator_certificate_only(two_labs: dict[str, Any], tmp_path: Path) -> None:
    """lab.json names the orchestrator's certificate; the README's reflection example and the
    `topo` commands use it; plaintext to the same address is refused."""
    import grpc

    from sdqkd.controller.northbound import sdqkd_pb2 as pb
    from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc

    top = two_labs["top"]
    lab = json.loads((top / ".sdqkd" / "lab" / "alpha" / "lab.json").read_text())
    tls = lab["controller"]["tls"]
    assert tls["ca"] == lab["ca"]["cert"] and Path(tls["cert"]).is_file() and Path(tls["key"]).is_file()
    with grpc.insecure_channel(lab["controller"]["grpc"]) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.ControllerStub(ch).ListAlarms(pb.ListAlarmsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    text = (REPO / "README.md").read_text()
    start = text.index(".venv/bin/python - <<'PY'")
    snippet = text[start:text.index("\nPY\n", start) + 4].replace(".venv/bin/python", sys.executable)
    script = f"""set -eu
eval "$({sys.executable} -m sdqkd lab env --lab-dir {top / '.sdqkd'} alpha)"
{snippet}"""
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "sdqkd.v1.Controller" in res.stdout and "CAIT" in res.stdout
    env = {"SDQKD_LAB_DIR": str(top / ".sdqkd")}
    res = sdqkd("topo", "reservations", "--lab", "alpha", "--json", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert rows and all(r["reserved_bps"] == 0 and r["available_bps"] == r["capacity_bps"] for r in rows)
    res = sdqkd("topo", "alarms", "--lab", "alpha", "--json", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert not [a for a in json.loads(res.stdout) if a["kind"] == "node-disconnected"]
