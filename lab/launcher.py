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

from sdqkd.agents.emulation.plant import Plant
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import client as nb_client
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.lab import hosts as lab_hosts
from sdqkd.lab import plan as lab_plan
from sdqkd.lab import labjson, topology
from sdqkd.listen import bind_error
from sdqkd import private


class LabError(Exception):
    """Bring-up or tear-down failed; the message says at which stage and why."""


FREE_PORTS_HINT = "stop what holds it, or run `sdqkd lab up --free-ports` to pick free ports"


@dataclass
class LabProcess:
    """A process of the lab: what it is (for messages), the process, its log, and where
    its own lines begin in that log (a restarted node appends to the same log, so what an
    earlier run wrote must not count as this one being ready or failing)."""

    what: str
    popen: subprocess.Popen
    log: Path
    log_start: int = 0
    in_use_hint: str = FREE_PORTS_HINT  # what to do when one of its ports is taken

    def output(self) -> str:
        """What this run wrote to its log so far."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.log_start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def failure(self) -> str:
        """Why it exited: its own one-line `error:` if it wrote one, else its exit code."""
        lines = self.output().splitlines()
        said = next((ln.removeprefix("error: ") for ln in reversed(lines) if ln.startswith("error: ")), None)
        if said is None:
            code = self.popen.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited (code {code})"
            return f"{self.what} {how}; see {self.log}"
        if "cannot listen on" in said and "in use" in said:
            said += f"; {self.in_use_hint}"
        return said


def _spawn(what: str, args: list[str], log: Path, module: str = "sdqkd") -> LabProcess:
    with os.fdopen(private.open_append(log), "ab") as fh:  # 0600 in a 0700 directory
        start = fh.seek(0, os.SEEK_END)
        return LabProcess(what, subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ), log, start)


def spawn_agent(name: str, config: Path, log: Path) -> LabProcess:
    """Start one node's agent from its config file; `lab up` and `lab start` both start agents here."""
    return _spawn(f"agent {name}", ["--config", str(config)], log, "sdqkd.agents")  # the CLI less click


def spawn_controller(config: Path, log: Path) -> LabProcess:
    """Start the lab's controller from its config file (`lab up`, `lab start controller`)."""
    return _spawn("controller", ["controller", "--config", str(config)], log)


def wait_agent(proc: LabProcess, timeout: float, procs: list[LabProcess] | None = None) -> None:
    """Until the agent says it is ready (NETCONF, ETSI 014/004 and the relay all listen);
    LabError with its own one-line error when it (or any of `procs`) exits first."""
    _wait(lambda: "ready netconf=" in proc.output(), timeout, proc.what, procs or [proc])


def wait_controller(proc: LabProcess, port: int, timeout: float, host: str = "127.0.0.1",
                    procs: list[LabProcess] | None = None) -> None:
    """Until the controller's gRPC port accepts connections; LabError when it (or any of
    `procs`) exits first."""
    _wait(lambda: _listening(port, host), timeout, "controller gRPC", procs or [proc])


def _planned_ports(plan: lab_plan.LabPlan) -> list[tuple[int, str]]:
    """Every port the lab's processes will listen on, with who listens."""
    out = [(plan.controller_port, "controller gRPC")]
    if plan.controller_metrics_port:
        out.append((plan.controller_metrics_port, "controller metrics HTTP"))
    for n in plan.nodes.values():
        if n.metrics_port:
            out.append((n.metrics_port, f"agent {n.name} metrics HTTP"))
        out += [(n.netconf_port, f"agent {n.name} NETCONF"), (n.kms_port, f"agent {n.name} ETSI 014/004 HTTPS"),
                (n.relay_port, f"agent {n.name} key relay"), (n.etsi004_json_port, f"agent {n.name} ETSI 004 JSON"),
                (n.etsi004_binary_port, f"agent {n.name} ETSI 004 binary")]
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


def _wait(pred: Callable[[], bool], timeout: float, what: str, procs: list[LabProcess]) -> None:
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
    procs: list[LabProcess] = []
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
            agents = []
            for n in plan.nodes.values():
                assert n.config_path is not None
                p = spawn_agent(n.name, n.config_path, n.dir / "agent.log")
                procs.append(p)
                agents.append(p)
                pids[n.name] = p.popen.pid
            for p in agents:
                wait_agent(p, timeout, procs)
                progress.advance(t)
            ctl = spawn_controller(ctl_cfg, plan.dir / "controller.log")
            procs.append(ctl)
            t = progress.add_task("controller connected", total=len(plan.nodes))
            stub = controller_stub(labjson.controller_access(plan))
            wait_controller(ctl, plan.controller_port, timeout, plan.address, procs)

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
            stop_lab_process(p.popen.pid)
        lab_hosts.down(lab_hosts.lab_tag(name, labjson.lab_dir(name, root)), made_hosts)
        raise


def is_lab_process(pid: int) -> bool:
    """Whether pid is an sdqkd agent or controller (a pid from lab.json may have been reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return _is_sdqkd(cmd) and (b"agent" in cmd or b"controller" in cmd or b"sdqkd.agents" in cmd)


def _is_sdqkd(cmd: list[bytes]) -> bool:
    """`python -m sdqkd ...` (the CLI) or `python -m sdqkd.agents` (what the lab starts agents with)."""
    return b"sdqkd" in cmd or b"sdqkd.agents" in cmd


def signal_and_wait(pid: int, sig: signal.Signals, wait: float) -> bool:
    """Send sig to a lab process and wait until it is gone; whether it is. Reaps it when it
    is our child (a lab brought up in this process), else a zombie would look alive."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    end = time.monotonic() + wait
    while is_lab_process(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True


def stop_lab_process(pid: int | None, wait: float = 10.0) -> None:
    """SIGTERM (an agent closes its sessions and stores), SIGKILL if it is still there after
    `wait`; nothing when pid is not a lab process any more (it may have been reused)."""
    if not pid or not is_lab_process(pid):
        return
    if not signal_and_wait(pid, signal.SIGTERM, wait):
        signal_and_wait(pid, signal.SIGKILL, 5.0)


def config_paths(data: dict[str, Any]) -> dict[str, Path]:
    """Each lab process's config file by who runs it ("agent NAME", "controller"): what
    `lab start` starts it with, and how `lab down` recognises the lab's processes."""
    out = {f"agent {n['name']}": Path(n.get("config") or Path(n["log"]).parent / "agent.json") for n in data["nodes"]}
    out["controller"] = Path(data["controller"].get("config") or Path(data["dir"]) / "controller.json")
    return out


def running_with(configs: set[Path]) -> list[int]:
    """Pids of sdqkd agents/controllers started with one of these config files, whoever
    started them: `lab down` must leave nothing running even if a pid never reached lab.json."""
    wanted = {str(c).encode() for c in configs}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _is_sdqkd(cmd) and b"--config" in cmd and wanted.intersection(cmd):
            found.append(int(d.name))
    return found


def down(name: str | None = None, root: Path | None = None, cleanup: bool = False) -> str:
    """Stop every process of the lab (those `lab up` started and those `lab start` started
    since, as lab.json records them, and any other started with the lab's configs), remove
    its hosts and lab.json."""
    path = labjson.find(name, root)
    with labjson.locked(path):
        data = labjson.read(path)
        stop_lab_process(data["controller"].get("pid"))
        for n in data["nodes"]:
            stop_lab_process(n.get("pid"))
        for pid in running_with(set(config_paths(data).values())):
            stop_lab_process(pid)
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


def plant(data: dict[str, Any]) -> Plant:
    """The lab's optical plant, the same SQLite state every agent of the lab reads: a fibre
    cut here is dark for their QKD modules at their next tick. Close it after use."""
    state = data.get("plant") or Path(data["dir"]) / "plant.sqlite"
    return Plant(json.loads(Path(data["topology"]).read_text()), state)


def processes(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process of the lab, whether it runs now (its pid is an sdqkd process) and, when
    it does not, what `lab kill` recorded (or that it exited by itself)."""
    out = []
    for who, entry in [*((n["name"], n) for n in data["nodes"]), ("controller", data["controller"])]:
        pid = entry.get("pid")
        running = bool(pid) and is_lab_process(pid)
        item: dict[str, Any] = {"name": who, "pid": pid if running else None, "running": running}
        if not running:
            item["down"] = entry.get("down") or {"reason": "exited"}
        out.append(item)
    return out


def fibres(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The topology's fibres with their ends, loss and whether they are cut now."""
    lab = lab_plan.lab_object(json.loads(Path(data["topology"]).read_text()))
    p = plant(data)
    try:
        cut = set(p.cut_fibres())
    finally:
        p.close()
    return [{"name": f["name"], "a": f.get("a-end", {}).get("node"), "b": f.get("b-end", {}).get("node"),
             "loss_db": float(f["loss"]), "cut": f["name"] in cut} for f in lab.get("fibre", [])]


def status(name: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """lab.json, which processes run and which fibres are cut, plus the controller's live
    view (nodes up, links with key rates) when it answers."""
    data = labjson.read(labjson.find(name, root))
    local = {"lab": data, "processes": processes(data), "fibres": fibres(data)}
    try:
        topo = controller_stub(data["controller"]).GetTopology(pb.GetTopologyRequest(), timeout=5).topology
    except grpc.RpcError as exc:
        return {**local, "error": f"controller unreachable: {exc.code().name}"}
    except LabError as exc:
        return {**local, "error": str(exc)}
    names = {x.qkdn_id: x.name for x in topo.nodes}
    return {
        **local,
        "nodes": [{"name": x.name, "qkdn_id": x.qkdn_id, "domain": x.domain, "up": x.up} for x in topo.nodes],
        "links": [{"qkdl_id": lk.qkdl_id, "a": names.get(lk.a, lk.a), "b": names.get(lk.b, lk.b), "status": lk.status,
                   "skr_kbps": round(lk.skr / 1000, 3), "qber": lk.qber if lk.HasField("qber") else None} for lk in topo.links],
    }


def render(st: dict[str, Any], console: Console) -> None:
    lab = st["lab"]
    nodes = Table(title=f"lab {lab['name']}: nodes")
    for col in ("node", "domain", "NETCONF", "ETSI 014", "process", "up"):
        nodes.add_column(col)
    up_by = {n["name"]: n["up"] for n in st.get("nodes", [])}
    procs = {p["name"]: p for p in st.get("processes", [])}
    for n in lab["nodes"]:
        nodes.add_row(n["name"], n.get("domain") or "", f"{n['netconf']['host']}:{n['netconf']['port']}", n["kms"]["etsi014"],
                      _process_cell(procs.get(n["name"])), "yes" if up_by.get(n["name"]) else "no")
    console.print(nodes)
    if "controller" in procs and not procs["controller"]["running"]:
        console.print(f"[red]controller: {_process_cell(procs['controller'])}[/red]")
    cut = [f for f in st.get("fibres", []) if f["cut"]]
    if cut:
        fib = Table(title="fibres cut")
        for col in ("fibre", "ends", "loss (dB)"):
            fib.add_column(col)
        for f in cut:
            fib.add_row(f["name"], f"{f['a']} - {f['b']}", f"{f['loss_db']:g}")
        console.print(fib)
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


def _process_cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return ""
    if p["running"]:
        return f"pid {p['pid']}"
    down = p["down"]
    return f"down ({down['signal']})" if down.get("signal") else f"down ({down.get('reason', 'exited')})"


def as_json(st: dict[str, Any]) -> str:
    return json.dumps(st, indent=1)
