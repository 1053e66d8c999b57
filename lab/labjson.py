"""lab.json: the one file through which tools, tests and benchmarks find a running lab
(like containerlab's topology-data.json). Written last and atomically by `lab up`,
removed by `lab down`."""
from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdqkd import pki
from sdqkd.agents.netconf import ssh
from sdqkd.lab.plan import LabPlan
from sdqkd.private import open_append, write_private

ENV = "SDQKD_LAB_DIR"  # same meaning as --lab-dir
STATE_DIR = ".sdqkd"


def labs_root(lab_dir: str | Path | None = None) -> Path:
    """The folder holding one folder per lab: <lab dir>/lab, absolute.

    The lab dir is `lab_dir` (--lab-dir), else $SDQKD_LAB_DIR, else the nearest .sdqkd/
    from the working directory up (as git finds .git), else ./.sdqkd (where `lab up`
    makes it): every command finds a lab from any folder below the one it was brought up in."""
    chosen = lab_dir or os.environ.get(ENV)
    if chosen:
        return Path(chosen).expanduser().resolve() / "lab"
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / STATE_DIR).is_dir():
            return d / STATE_DIR / "lab"
    return cwd / STATE_DIR / "lab"


def lab_dir(name: str, root: Path | None = None) -> Path:
    return Path(root).resolve() / name if root else labs_root() / name


def state_path(name: str, root: Path | None = None) -> Path:
    return lab_dir(name, root) / "lab.json"


def describe(plan: LabPlan, pids: dict[str, int], controller_pid: int | None) -> dict[str, Any]:
    nodes = []
    for n in plan.nodes.values():
        key_path = n.dir / "ssh_host_ed25519_key"
        host_key = ssh.load_or_create_host_key(key_path) if key_path.exists() else None
        nodes.append({
            "name": n.name,
            "qkdn_id": n.qkdn_id,
            "domain": n.domain,
            "pid": pids.get(n.name),
            "netconf": {
                "host": plan.address, "port": n.netconf_port, "username": plan.username, "password": plan.password,
                "host_key_fingerprint": ssh.fingerprint(host_key) if host_key else None,
                "host_key": ssh.public_key_line(host_key) if host_key else None,
            },
            "kms": {"url": f"https://{plan.address}:{n.kms_port}", "etsi014": f"https://{plan.address}:{n.kms_port}/api/v1/keys",
                    "etsi004": f"https://{plan.address}:{n.kms_port}/api", "relay_port": n.relay_port,
                    "etsi004_json": {"host": plan.address, "port": n.etsi004_json_port, "tls": True},
                    "etsi004_binary": {"host": plan.address, "port": n.etsi004_binary_port}},
            "saes": [{"id": s, "cert": str(n.sae_certs[s][0]), "key": str(n.sae_certs[s][1])} for s in n.saes],
            "kme": {"cert": str(n.kme_cert[0]), "key": str(n.kme_cert[1]), "pin": pki.spki_pin(n.kme_cert[0])}
            if n.kme_cert else None,
            "metrics": f"http://{plan.address}:{n.metrics_port}/metrics" if n.metrics_port else None,
            **({"restconf": {"url": f"https://{plan.address}:{n.restconf_port}/restconf", "ca": str(plan.ca[0])}}
               if n.restconf_port else {}),
            "log": str(n.dir / "agent.log"),
            "config": str(n.config_path),
            "host": ({"netns": h.netns, "address": h.address, "inner": h.inner}
                     if (h := plan.hosts.get(n.name)) else None),
        })
    return {
        "name": plan.name,
        "dir": str(plan.dir),
        "topology": str(plan.topology_path),
        "ca": {"cert": str(plan.ca[0]), "key": str(plan.ca[1])},
        **{name: {"cert": str(c[0]), "key": str(c[1])} for name, c in (("kme_ca", plan.kme_ca), ("sae_ca", plan.sae_ca)) if c},
        "controller": {**controller_access(plan), "pid": controller_pid, "log": str(plan.dir / "controller.log"),
                       "config": str(plan.controller_config_path),
                       "metrics": f"http://{plan.address}:{plan.controller_metrics_port}/metrics"
                       if plan.controller_metrics_port else None},
        "plant": str(plan.plant_path),
        "nodes": nodes,
    }


def controller_access(plan: LabPlan) -> dict[str, Any]:
    """How a client reaches the controller's northbound: its address and the mutual TLS
    material (the lab CA, the orchestrator's client certificate and key)."""
    assert plan.orchestrator_cert is not None
    return {"grpc": f"{plan.address}:{plan.controller_port}",
            "tls": {"ca": str(plan.ca[0]), "cert": str(plan.orchestrator_cert[0]), "key": str(plan.orchestrator_cert[1])}}


def write(path: Path, data: dict[str, Any]) -> None:
    write_private(path, json.dumps(data, indent=1))  # it holds the lab's NETCONF password


def read(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lab's lock: `lab kill|start|down` each read lab.json, act, then write it, and
    two of them at once (a script and an operator) must not lose each other's pids."""
    lock = Path(path).parent / ".lab.lock"
    with os.fdopen(open_append(lock), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def find(name: str | None = None, root: Path | None = None) -> Path:
    """The lab.json of `name`, or of the only running lab."""
    base = Path(root).resolve() if root else labs_root()
    hint = f"set --lab-dir or ${ENV} to the lab's {STATE_DIR} folder if it is elsewhere"
    if name:
        p = state_path(name, root)
        if not p.exists():
            raise FileNotFoundError(f"no running lab '{name}' ({p} does not exist; {hint})")
        return p
    found = sorted(base.glob("*/lab.json")) if base.exists() else []
    if not found:
        raise FileNotFoundError(f"no running lab under {base} ({hint})")
    if len(found) > 1:
        raise FileNotFoundError("several labs are running: name one (" + ", ".join(p.parent.name for p in found) + ")")
    return found[0]


def _var(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def shell_env(data: dict[str, Any]) -> dict[str, str]:
    """lab.json as shell variables (`eval "$(sdqkd lab env)"`), so that commands written
    once work whatever ports (--free-ports) and folder the lab has: LAB_CA, LAB_GRPC,
    LAB_NETCONF_USER/PASSWORD, and per node <NODE>_KME (HTTPS base URL), _NETCONF_PORT,
    _ETSI004_JSON_PORT (the JSON command form, mutual TLS), _SAE, _CERT, _KEY (its first SAE's credentials) and, with a lab host, _NETNS, _ADDRESS, _INNER;
    LAB_GRPC_CERT and LAB_GRPC_KEY: the orchestrator's client certificate for the gRPC northbound;
    LAB_METRICS and <NODE>_METRICS: the controller's and each agent's Prometheus endpoint URL."""
    labs = Path(data["dir"]).parent  # <lab dir>/lab/<name>
    env = {"SDQKD_LAB_DIR": str(labs.parent), "SDQKD_LAB": data["name"], "LAB_CA": data["ca"]["cert"],
           "LAB_GRPC": data["controller"]["grpc"]}
    tls = data["controller"].get("tls")
    if tls:
        env.update({"LAB_GRPC_CERT": tls["cert"], "LAB_GRPC_KEY": tls["key"]})
    if data["controller"].get("metrics"):  # none in a lab brought up before the metrics endpoints
        env["LAB_METRICS"] = data["controller"]["metrics"]
    for n in data["nodes"]:
        nc, v = n["netconf"], _var(n["name"])
        env.update({"LAB_NETCONF_HOST": nc["host"], "LAB_NETCONF_USER": nc["username"], "LAB_NETCONF_PASSWORD": nc["password"]})
        env.update({f"{v}_KME": n["kms"]["url"], f"{v}_NETCONF_PORT": str(nc["port"])})
        if n["kms"].get("etsi004_json"):  # a lab brought up before the JSON form had none
            env[f"{v}_ETSI004_JSON_PORT"] = str(n["kms"]["etsi004_json"]["port"])
        if n.get("metrics"):
            env[f"{v}_METRICS"] = n["metrics"]
        if n["saes"]:
            sae = n["saes"][0]
            env.update({f"{v}_SAE": sae["id"], f"{v}_CERT": sae["cert"], f"{v}_KEY": sae["key"]})
        if n.get("host"):
            env.update({f"{v}_NETNS": n["host"]["netns"], f"{v}_ADDRESS": n["host"]["address"], f"{v}_INNER": n["host"]["inner"]})
    return env
