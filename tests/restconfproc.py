"""An agent process with its RESTCONF server on (a real HTTPS listener, certificates from
a test CA), and an httpx client for it."""
from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agentproc import PASSWORD, AgentProc, agent_config, free_port
from sdqkd import pki


@dataclass
class RestconfAgent:
    agent: AgentProc
    port: int
    ca: Path  # the CA of the server certificate (and of the client certificates)
    client_cert: tuple[Path, Path]  # CN admin: a NETCONF user
    stranger_cert: tuple[Path, Path]  # CN nobody: not one

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, auth: Any = ("admin", PASSWORD), cert: tuple[Path, Path] | None = None, **kw: Any) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return httpx.Client(base_url=self.base, verify=ctx, auth=auth, timeout=20, **kw)

    def stop(self) -> None:
        self.agent.stop()


def start(tmp: Path, name: str = "alice", extra: dict[str, Any] | None = None) -> RestconfAgent:
    ca = pki.make_ca(tmp / "rc-ca", "restconf test CA")
    cert, key = pki.issue(ca, f"{name} RESTCONF", tmp / "rc-server", server_names=["127.0.0.1"], client=False)
    client = pki.issue(ca, "admin", tmp / "rc-client", client=True)
    stranger = pki.issue(ca, "nobody", tmp / "rc-stranger", client=True)
    port = free_port()
    conf = {"restconf": {"host": "127.0.0.1", "port": port, "cert": str(cert), "key": str(key), "client_ca": str(ca[0])},
            **(extra or {})}
    agent = agent_config(tmp, name, extra=conf).start()
    rc = RestconfAgent(agent, port, ca[0], client, stranger)
    deadline = time.monotonic() + 10
    while True:  # NETCONF listens first; RESTCONF right after
        try:
            with rc.client() as c:
                c.get("/restconf")
            return rc
        except httpx.TransportError:
            if time.monotonic() > deadline:
                agent.stop()
                raise
            time.sleep(0.05)
