"""The lab's hosts: one network namespace per node that has a host, all on one LAN (a bridge
in a namespace of its own, a veth pair per host), made and removed with iproute2.

Every host has an outer address on the LAN (IKE and ESP travel there) and an inner
address on its loopback, reachable from another host only through an IPsec tunnel: the
route to it is the one charon installs on its TUN device.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

LAN_NET = "10.77.0"  # outer addresses 10.77.0.i/24
INNER_NET = "10.78.0"  # inner addresses 10.78.0.i/32
MAX_HOSTS = 250


class HostError(Exception):
    """iproute2 refused (no root, no netns support, a name in use)."""


@dataclass(frozen=True)
class Host:
    node: str
    netns: str
    address: str
    inner: str


def lab_tag(name: str, lab_dir: Path | str) -> str:
    """What names a lab's namespaces: its name and its directory, so that two labs of the
    same topology (an operator's and a test's) never share one."""
    digest = hashlib.sha256(str(Path(lab_dir).resolve()).encode()).hexdigest()[:6]
    return f"{name}-{digest}"


def lan_netns(lab: str) -> str:
    return f"sdqkd-{_safe(lab)}-lan"


def plan(lab: str, nodes: list[str]) -> list[Host]:
    """Names and addresses of the hosts of `nodes`, in that order (pure)."""
    if len(nodes) > MAX_HOSTS:
        raise HostError(f"at most {MAX_HOSTS} hosts per lab")
    return [Host(n, f"sdqkd-{_safe(lab)}-{_safe(n)}", f"{LAN_NET}.{i}", f"{INNER_NET}.{i}")
            for i, n in enumerate(nodes, start=1)]


def up(lab: str, hosts: list[Host]) -> None:
    """Create the LAN and the hosts; on failure, remove what was made and raise."""
    if not hosts:
        return
    lan = lan_netns(lab)
    try:
        _ip("netns", "add", lan)
        _ip("-n", lan, "link", "add", "lan", "type", "bridge")
        _ip("-n", lan, "link", "set", "lan", "up")
        for i, h in enumerate(hosts, start=1):
            _ip("netns", "add", h.netns)
            _ip("-n", lan, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            _ip("-n", lan, "link", "set", f"h{i}", "master", "lan", "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip("-n", h.netns, "addr", "add", f"{h.inner}/32", "dev", "lo")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
    except HostError:
        down(lab, hosts)
        raise


def down(lab: str, hosts: list[Host]) -> None:
    """Remove the hosts and the LAN, ending what still runs in them (an IPsec daemon its agent
    left); deleting a namespace deletes its links. Idempotent."""
    present = existing()
    for ns in [h.netns for h in hosts] + [lan_netns(lab)]:
        if ns not in present:
            continue
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def existing() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if res.returncode:
        raise HostError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
