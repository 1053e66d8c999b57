"""The agent's NETCONF server: one asyncssh listener on one address, one event loop thread
for every connection's I/O, and a small fixed pool of worker threads for requests and
password checks. Connections cost no thread of their own: a client that vanishes, never
says hello or never finishes its login holds a few objects on the loop until a timer or
TCP ends it, never a spinning thread or another client's handshake."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncssh

from sdqkd.agents.netconf import ssh
from sdqkd.agents.netconf.rpcs import Rpcs
from sdqkd.agents.netconf.session import NetconfSession, SessionLimits
from sdqkd.listen import binding

log = logging.getLogger(__name__)
# asyncssh logs every connection's steps at INFO; ours says what an operator needs per session.
logging.getLogger("asyncssh").setLevel(logging.WARNING)


class _Connection(ssh.Login):
    """One SSH connection: login (ssh.Login), then NETCONF sessions on its channels."""

    def __init__(self, server: NetconfServer) -> None:
        super().__init__(server.gate)
        self.server = server
        self._no_session: asyncio.TimerHandle | None = None
        self._username: str | None = None
        self.channels: list[NetconfSession] = []

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        super().connection_made(conn)
        self.server.connections.add(self)

    def begin_auth(self, username: str) -> bool:
        self._username = username
        return True

    def auth_completed(self) -> None:
        super().auth_completed()
        # A login that never opens its NETCONF channel is closed like one that never logs in.
        self._no_session = asyncio.get_running_loop().call_later(self.server.gate.limits.login_timeout, self._idle)

    def _idle(self) -> None:
        if self.conn is not None:
            log.info("closing SSH connection from %s: no NETCONF session opened", self.address)
            self.conn.close()

    def session_requested(self) -> NetconfSession:
        limits = self.server.limits
        self.channels = [s for s in self.channels if not s.ended]
        if len(self.channels) >= limits.max_sessions_per_connection or self.server.open_sessions() >= limits.max_sessions:
            log.warning("refusing a NETCONF channel from %s: session limit reached", self.address)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "too many NETCONF sessions")
        if self._no_session is not None:
            self._no_session.cancel()
            self._no_session = None
        session = NetconfSession(self.server, self._username, self.address)
        self.channels.append(session)
        return session

    def connection_lost(self, exc: Exception | None) -> None:
        if self._no_session is not None:
            self._no_session.cancel()
        self.server.connections.discard(self)
        super().connection_lost(exc)


class NetconfServer:
    """Listens on address:port until stop(); `sessions()` lists the open NETCONF sessions."""

    def __init__(self, rpcs: Rpcs, users: list[ssh.User], host_key: asyncssh.SSHKey, address: str = "127.0.0.1",
                 port: int = 0, limits: SessionLimits | None = None, login: ssh.LoginLimits | None = None,
                 workers: int = 4, auth_pool: ThreadPoolExecutor | None = None) -> None:
        """`auth_pool`: where password checks run (scrypt, 16 MiB each: its threads bound how
        many at once), shared with the node's other front ends (RESTCONF) and then owned by the
        caller; a pool of two of its own when not given."""
        self.rpcs = rpcs
        self.limits = limits or SessionLimits()
        self.address = address
        self.stats = {"in-bad-hellos": 0, "in-sessions": 0, "dropped-sessions": 0}
        self._sessions: dict[int, NetconfSession] = {}
        self.connections: set[_Connection] = set()  # touched on the loop only
        self._next_id = 1
        self._lock = threading.Lock()
        self.workers = ThreadPoolExecutor(workers, thread_name_prefix="netconf-rpc")
        self._own_auth = auth_pool is None
        self._auth = auth_pool or ssh.auth_executor()
        ssh.start_all(self.workers, workers)
        self.gate = ssh.Gate(users, login or ssh.LoginLimits(), self._auth)
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.workers)  # asyncssh's and asyncio's blocking calls: no pool of their own
        self._thread = threading.Thread(target=self.loop.run_forever, name="netconf", daemon=True)
        self._thread.start()
        self.loop_thread_id = self._thread.ident
        options = ssh.server_options(host_key, self.gate.limits)

        async def listen() -> asyncssh.SSHAcceptor:
            return await asyncssh.listen(address, port, server_factory=lambda: _Connection(self), reuse_address=True,
                                         backlog=128, family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                                         config=[], **options)

        try:
            with binding("NETCONF", address, port):
                self._acceptor = asyncio.run_coroutine_threadsafe(listen(), self.loop).result()
        except BaseException:
            self._shutdown_loop()
            raise
        self.port: int = self._acceptor.sockets[0].getsockname()[1]

    def __str__(self) -> str:
        return f"NETCONF server {self.address}:{self.port}"

    # --- sessions (register/unregister on the loop) -------------------------------

    def register(self, session: NetconfSession) -> int:
        with self._lock:
            sid = self._next_id
            self._next_id += 1
            self._sessions[sid] = session
            self.stats["in-sessions"] += 1
            return sid

    def unregister(self, session: NetconfSession, dropped: bool) -> None:
        """dropped: ended otherwise than by close-session or kill-session (RFC 6022)."""
        with self._lock:
            if self._sessions.pop(session.session_id, None) is None:
                return
            if dropped:
                self.stats["dropped-sessions"] += 1
            # RFC 6022 counts since the server started: an ended session's RPCs still count.
            for k, v in session.counters.items():
                self.stats[k] = self.stats.get(k, 0) + v

    def counters(self) -> dict[str, int]:
        """The RFC 6022 statistics since start (ended and open sessions), read at once, so
        that they never go down between two reads (the agent's Prometheus counters)."""
        with self._lock:
            out = dict(self.stats)
            for s in self._sessions.values():
                for k, v in s.counters.items():
                    out[k] = out.get(k, 0) + v
            return out

    def open_sessions(self) -> int:
        """Sessions started or starting (channels accepted and not yet ended)."""
        return sum(1 for c in self.connections for s in c.channels if not s.ended)

    def sessions(self) -> list[NetconfSession]:
        with self._lock:
            return [s for s in self._sessions.values() if s.session_open]

    def in_background(self, task: Callable[[], Any]) -> None:
        """Run a blocking task on a worker thread; inline once the server is stopping."""
        try:
            self.workers.submit(task)
        except RuntimeError:
            task()

    # --- end --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop listening, end every session (releasing what they held), stop the threads."""
        if self.loop.is_closed():
            return

        async def close_all() -> None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            for connection in list(self.connections):
                if connection.conn is not None:
                    connection.conn.abort()
            await asyncio.sleep(0.05)  # their connection_lost callbacks

        try:
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - stopping goes on
            log.exception("closing the NETCONF listener failed")
        for session in self.sessions():
            session.release()
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.workers.shutdown(wait=True, cancel_futures=True)
        if self._own_auth:
            self._auth.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            self.loop.close()
