"""Start real agent processes (`sdqkd agent --config`) on loopback for tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncclient import manager

from sdqkd import private
from sdqkd.agents.netconf import ssh
from sdqkd.lab.plan import free_port as plan_free_port

PASSWORD = "s3cret-for-tests"


_USED: set[int] = set()


def free_port() -> int:
    return plan_free_port(_USED)


@dataclass
class AgentProc:
    name: str
    qkdn_id: str
    port: int
    config_path: Path
    state_dir: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None  # default: agent.log in state_dir

    @property
    def log_file(self) -> Path:
        return self.log_path or self.state_dir / "agent.log"

    def start(self, timeout: float = 20.0) -> "AgentProc":
        log = os.fdopen(private.open_append(self.log_file), "ab")  # 0600, as `lab up` makes it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdqkd", "agent", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited: {self.log_file.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"agent {self.name} did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        """kill -9: the agent gets no chance to save or close anything (a crash, a power-cut
        of the process); what it comes back with is only what it had already made durable."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def connect(self, **kw: Any) -> manager.Manager:
        args = dict(host="127.0.0.1", port=self.port, username="admin", password=PASSWORD, hostkey_verify=False,
                    look_for_keys=False, allow_agent=False, timeout=20)
        args.update(kw)
        return manager.connect(**args)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def agent_config(tmp: Path, name: str = "alice", qkdn_id: str | None = None, authorized_keys: list[str] | None = None,
                 extra: dict[str, Any] | None = None, port: int | None = None,
                 netconf: dict[str, Any] | None = None) -> AgentProc:
    qkdn_id = qkdn_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/{name}"))
    state_dir = tmp / name
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cfg = {
        "node": {"name": name, "qkdn_id": qkdn_id, "location": name.capitalize()},
        "netconf": {
            "address": "127.0.0.1",
            "port": port,
            "host_key": str(state_dir / "ssh_host_ed25519_key"),
            "users": [{"name": "admin", "password_hash": ssh.hash_password(PASSWORD), "authorized_keys": authorized_keys or []}],
            **(netconf or {}),
        },
        "state_dir": str(state_dir),
        "log_level": "INFO",
    }
    cfg.update(extra or {})
    path = state_dir / "agent.json"
    path.write_text(json.dumps(cfg, indent=2))
    return AgentProc(name, qkdn_id, port, path, state_dir)
