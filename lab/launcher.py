"""`sdqkd lab up | down | status`: one agent process per node and the controller, on
loopback, in stages (certificates, agents listening, controller connected, links up,
the topology's key links provisioned, healthy), then lab.json — the file every other
tool finds the lab through."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import client as nb_client
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.lab import hosts as lab_hosts
from sdqkd.lab import plan as lab_plan
from sdqkd.lab import labjson, topology
from sdqkd.listen import bind_error


class LabError(Exception):
    """Bring-up or tear-down failed; the message says at which stage and why."""


FREE_PORTS_HINT = "stop what holds it, or run `sdqkd lab up --free-ports` to pick free ports"


@dataclass
class _Proc:
    """A process of the lab: what it is (for messages), the process, its log."""

    what: str
    popen: subprocess.Popen
    log: Path

    def failure(self) -> str:
        """Why it exited: its own one-line `error:` if it wrote one, else its exit code."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        said = next((ln.removeprefix("error: ") for ln in reversed(lines) if ln.startswith("error: ")), None)
        if said is None:
            code = self.popen.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited (code {code})"
            return f"{self.what} {how}; see {self.log}"
        if "cannot listen on" in said and "in use" in said:
            said += f"; {FREE_PORTS_HINT}"
        return said


def _spawn(what: str, args: list[str], log: Path) -> _Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return _Proc(what, subprocess.Popen(
            [sys.executable, "-m", "sdqkd", *args], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ), log)


def _planned_ports(plan: lab_plan.LabPlan) -> list[tuple[int, str]]:
    """Every port the lab's processes will listen on, with who listens."""
    out = [(plan.controller_port, "controller gRPC")]
    for n in plan.nodes.values():
        out += [(n.netconf_port, f"agent {n.name} NETCONF"), (n.kms_port, f"agent {n.name} ETSI 014/004 HTTPS"),
                (n.relay_port, f"agent {n.name} key relay")]
        out += [(p, f"agent {n.name} QKD service channel of interface {i}") for i, p in n.service_ports.items()]
    return out


def check_ports(plan: lab_plan.LabPlan) -> None:
    """Fail before starting anything when a planned port is taken (another lab, a stale agent)."""
    for port, who in _planned_ports(plan):
        exc = bind_error(plan.address, port)
        if exc is not None:
            raise LabError(f"port {port} ({who}) on {plan.address} is not available: {(exc.strerror or str(exc)).lower()}; "
                           f"{FREE_PORTS_HINT}")


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _ready(log: Path) -> bool:
    """The agent says so once NETCONF, ETSI 014/004 and the relay all listen."""
    try:
        return "ready netconf=" in log.read_text(errors="replace")
    except OSError:
        return False


def _wait(pred: Callable[[], bool], timeout: float, what: str, procs: list[_Proc]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        dead = [p for p in procs if p.popen.poll() is not None]
        if dead:
            raise LabError(dead[0].failure())
        if pred():
            return
        time.sleep(0.1)
    raise LabError(f"{what}: not reached within {timeout:.0f} s")


def controller_stub(access: dict[str, Any]) -> pb_grpc.ControllerStub:
    """A stub for the controller of a lab: `access` is lab.json's "controller" (its gRPC
    address and the orchestrator's mutual TLS certificate)."""
    tls = access.get("tls")
    if not tls:
        raise LabError("lab.json has no controller.tls (a lab from before mutual TLS): bring the lab up again")
    return nb_client.stub(access["grpc"], ca=tls["ca"], cert=tls["cert"], key=tls["key"])


def up(topology_path: Path, root: Path | None = None, *, free_ports: bool = False, console: Console | None = None,
       timeout: float = 180.0) -> dict[str, Any]:
    """Bring a lab up and return its lab.json content."""
    console = console or Console(stderr=True)
    lab = topology.load_valid(Path(topology_path))
    name = lab_plan.lab_object(lab).get("name") or Path(topology_path).stem
    path = labjson.state_path(name, root)
    if path.exists():
        raise LabError(f"lab '{name}' is already up ({path}); run `sdqkd lab down {name}` first")
    old = labjson.lab_dir(name, root)
    if old.exists():  # what a previous run left (keys, controller services): a new lab starts clean
        shutil.rmtree(old)
    procs: list[_Proc] = []
    made_hosts: list[lab_hosts.Host] = []
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            plan = lab_plan.make(lab, labjson.lab_dir(name, root), free_ports=free_ports)
            check_ports(plan)
            ctl_cfg = lab_plan.write_controller_config(plan)
            progress.add_task("certificates and configs", total=1, completed=1)
            if plan.hosts:
                made_hosts = list(plan.hosts.values())
                try:
                    lab_hosts.up(lab_hosts.lab_tag(plan.name, plan.dir), made_hosts)
                except lab_hosts.HostError as exc:
                    made_hosts = []
                    raise LabError(f"lab hosts: {exc}") from None
                progress.add_task("hosts", total=len(made_hosts), completed=len(made_hosts))
            t = progress.add_task("agents listening", total=len(plan.nodes))
            pids: dict[str, int] = {}
            for n in plan.nodes.values():
                p = _spawn(f"agent {n.name}", ["agent", "--config", str(n.config_path)], n.dir / "agent.log")
                procs.append(p)
                pids[n.name] = p.popen.pid
            for n in plan.nodes.values():
                _wait(lambda n=n: _ready(n.dir / "agent.log"), timeout, f"agent {n.name}", procs)
                progress.advance(t)
            ctl = _spawn("controller", ["controller", "--config", str(ctl_cfg)], plan.dir / "controller.log")
            procs.append(ctl)
            t = progress.add_task("controller connected", total=len(plan.nodes))
            stub = controller_stub(labjson.controller_access(plan))
            _wait(lambda: _listening(plan.controller_port), timeout, "controller gRPC", procs)

            def discovered() -> bool:
                topo = stub.GetTopology(pb.GetTopologyRequest(), timeout=5).topology
                up_count = sum(1 for x in topo.nodes if x.up)
                progress.update(t, completed=up_count)
                return up_count == len(plan.nodes)

            _wait(discovered, timeout, "discovery", procs)
            links = lab_plan.lab_object(lab).get("link", [])
            t = progress.add_task("links up", total=len(links))
            for link in links:
                (an, ai), (bn, bi) = (ep.split(":") for ep in link["endpoints"])
                try:
                    stub.CreateChannel(pb.CreateChannelRequest(tx=pb.InterfaceRef(node=an, qkdi_id=int(ai)),
                                                               rx=pb.InterfaceRef(node=bn, qkdi_id=int(bi))), timeout=60)
                except grpc.RpcError as exc:
                    raise LabError(f"link {link['name']}: the controller refused it: {exc.details()}") from None

            def links_up() -> bool:
                topo = stub.GetTopology(pb.GetTopologyRequest(), timeout=5).topology
                active = sum(1 for lk in topo.links if lk.status == "ACTIVE")
                progress.update(t, completed=active)
                return active >= len(links)

            _wait(links_up, timeout, "links up", procs)
            key_links = lab_plan.lab_object(lab).get("key-link", [])
            if key_links:
                t = progress.add_task("key links", total=len(key_links))
                for kl in key_links:
                    try:
                        stub.CreateApplication(pb.CreateApplicationRequest(master_sae=kl["master-sae"], slave_sae=kl["slave-sae"]),
                                               timeout=60)
                    except grpc.RpcError as exc:
                        raise LabError(f"key link {kl['name']}: the controller refused it: {exc.details()}") from None
                    progress.advance(t)
            progress.add_task("healthy", total=1, completed=1)
        data = labjson.describe(plan, pids, ctl.popen.pid)
        labjson.write(path, data)
        return data
    except BaseException:
        for p in procs:
            _terminate(p.popen.pid)
        lab_hosts.down(lab_hosts.lab_tag(name, labjson.lab_dir(name, root)), made_hosts)
        raise


def is_lab_process(pid: int) -> bool:
    """Whether pid is an sdqkd agent or controller (a pid from lab.json may have been reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"sdqkd" in cmd and (b"agent" in cmd or b"controller" in cmd)


def _terminate(pid: int | None, wait: float = 10.0) -> None:
    if not pid or not is_lab_process(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + wait
    while time.monotonic() < end and is_lab_process(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if is_lab_process(pid):
        os.kill(pid, signal.SIGKILL)


def down(name: str | None = None, root: Path | None = None, cleanup: bool = False) -> str:
    path = labjson.find(name, root)
    data = labjson.read(path)
    _terminate(data["controller"].get("pid"))
    for n in data["nodes"]:
        _terminate(n.get("pid"))
    _remove_hosts(data)
    path.unlink()
    if cleanup:
        import shutil

        shutil.rmtree(data["dir"], ignore_errors=True)
    return data["name"]


def _remove_hosts(data: dict[str, Any]) -> None:
    """The hosts the lab's topology gave it (and whatever still runs in them)."""
    try:
        lab = lab_plan.lab_object(json.loads(Path(data["topology"]).read_text()))
    except (OSError, ValueError):
        return
    nodes = [n["name"] for n in lab.get("node", []) if n.get("host")]
    tag = lab_hosts.lab_tag(data["name"], data["dir"])
    lab_hosts.down(tag, lab_hosts.plan(tag, nodes))


def status(name: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """lab.json plus the controller's live view (nodes up, links with key rates)."""
    data = labjson.read(labjson.find(name, root))
    try:
        topo = controller_stub(data["controller"]).GetTopology(pb.GetTopologyRequest(), timeout=5).topology
    except grpc.RpcError as exc:
        return {"lab": data, "error": f"controller unreachable: {exc.code().name}"}
    except LabError as exc:
        return {"lab": data, "error": str(exc)}
    names = {x.qkdn_id: x.name for x in topo.nodes}
    return {
        "lab": data,
        "nodes": [{"name": x.name, "qkdn_id": x.qkdn_id, "domain": x.domain, "up": x.up} for x in topo.nodes],
        "links": [{"qkdl_id": lk.qkdl_id, "a": names.get(lk.a, lk.a), "b": names.get(lk.b, lk.b), "status": lk.status,
                   "skr_kbps": round(lk.skr / 1000, 3), "qber": lk.qber if lk.HasField("qber") else None} for lk in topo.links],
    }


def render(st: dict[str, Any], console: Console) -> None:
    lab = st["lab"]
    nodes = Table(title=f"lab {lab['name']}: nodes")
    for col in ("node", "domain", "NETCONF", "ETSI 014", "up"):
        nodes.add_column(col)
    up_by = {n["name"]: n["up"] for n in st.get("nodes", [])}
    for n in lab["nodes"]:
        nodes.add_row(n["name"], n.get("domain") or "", f"{n['netconf']['host']}:{n['netconf']['port']}", n["kms"]["etsi014"],
                      "yes" if up_by.get(n["name"]) else "no")
    console.print(nodes)
    if "error" in st:
        console.print(f"[red]{st['error']}[/red]")
        return
    links = Table(title="QKD links")
    for col in ("link", "status", "key rate (kb/s)", "QBER"):
        links.add_column(col)
    for lk in sorted(st["links"], key=lambda x: (x["a"], x["b"])):
        links.add_row(f"{lk['a']} - {lk['b']}", lk["status"], f"{lk['skr_kbps']:.3f}", f"{lk['qber']:.3f}" if lk["qber"] is not None else "")
    console.print(links)
    console.print(f"controller gRPC {lab['controller']['grpc']}   lab state {Path(lab['dir']) / 'lab.json'}")


def as_json(st: dict[str, Any]) -> str:
    return json.dumps(st, indent=1)
