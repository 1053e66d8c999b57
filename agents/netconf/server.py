"""The agent's NETCONF server: SSH on one address, our session class, the RPC table."""
from __future__ import annotations

import threading
from typing import Any

import paramiko

from sdqkd.agents.netconf.rpcs import Rpcs
from sdqkd.agents.netconf.session import AgentSession
from sdqkd.agents.netconf.ssh import AuthController, BoundSSHServer, User


class NetconfServer(BoundSSHServer):
    """What netconf.server.NetconfServerSession expects of its server, bound to one address."""

    def __init__(self, rpcs: Rpcs, users: list[User], host_key: paramiko.PKey, address: str = "127.0.0.1", port: int = 0) -> None:
        self.server_methods = rpcs
        self.session_id = 1
        self.session_locks_lock = threading.Lock()
        self.session_locks = {"running": 0, "candidate": 0}  # unused: locks live in Datastores
        super().__init__(AuthController(users), AgentSession, host_key, address, port)

    def _allocate_session_id(self) -> int:
        with self.lock:
            sid = self.session_id
            self.session_id += 1
            return sid

    def unlock_target_any(self, session: Any) -> list[str]:
        return []  # the session's close() tells Rpcs.session_ended

    def sessions(self) -> list[AgentSession]:
        with self.lock:
            socks = list(self.sockets)
        out = []
        for sock in socks:
            out.extend(s for s in list(sock.sessions) if s.session_open)
        return out

    def stop(self) -> None:
        self.close()
        self.join()
