"""SSH side of the NETCONF server (RFC 6242) on asyncssh: who may log in, with which host
key, and how hard a client may push before it is shut out.

Users come from the agent's config: a password (stored as a scrypt hash) and/or
OpenSSH public keys. Login is hardened the way OpenSSH hardens it: a per-connection
login grace time (asyncssh's login_timeout, which never holds up other handshakes),
a delay after each failed password that doubles per failure from the same address,
at most `max_auth_tries` failures per connection, at most `max_startups` connections
still authenticating, and the same work (one scrypt) for unknown users as for known
ones, so response time does not tell which user names exist.
"""
from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from sdqkd.private import private_dir

log = logging.getLogger(__name__)

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 128 * r * n = 16 MiB of working memory per check
_M_MMAP_THRESHOLD = -3  # malloc.h


def return_large_blocks_to_the_os() -> None:
    """Have glibc serve every block over 128 KiB by mmap, always. By default it raises that
    threshold after freeing a large mapped block, so the second scrypt check (the controller
    logs in twice) took its 16 MiB from a thread's arena, where it stayed resident, zeroed,
    for the life of the agent (measured by bench/labscale.py: every agent held it). A no-op
    where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # a fixed value also stops the dynamic raise
    except (OSError, AttributeError):
        pass


def hash_password(password: str) -> str:
    """'scrypt$salt$hash' (base64): what agent configs store instead of the password."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt_b64), dklen=32, **_SCRYPT)
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


def parse_public_key(line: str) -> asyncssh.SSHKey:
    """One authorized_keys line ('ssh-ed25519 AAAA... comment')."""
    if len(line.split()) < 2:
        raise ValueError("an authorized key is 'type base64 [comment]'")
    try:
        return asyncssh.import_public_key(line.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"not an OpenSSH public key: {exc}") from None


@dataclass
class User:
    name: str
    password_hash: str | None = None
    keys: list[asyncssh.SSHKey] = field(default_factory=list)


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The agent's Ed25519 host key, made on first start (0600)."""
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key("openssh"))
    try:
        return asyncssh.read_private_key(str(path))
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"{path}: not a usable SSH private key ({exc})") from None


def public_key_line(key: asyncssh.SSHKey) -> str:
    """'ssh-ed25519 AAAA...': the known_hosts form of the host key, as lab.json records it."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def fingerprint(key: asyncssh.SSHKey) -> str:
    """OpenSSH-style SHA256 fingerprint, as lab.json records it."""
    return key.get_fingerprint("sha256")


@dataclass
class LoginLimits:
    """How much an unauthenticated client may take (OpenSSH's names in brackets)."""

    login_timeout: float = 30.0  # seconds from TCP accept to a successful login [LoginGraceTime]
    max_auth_tries: int = 6  # failed attempts before the connection is closed [MaxAuthTries]
    max_startups: int = 32  # connections still authenticating; more are refused [MaxStartups]
    failure_delay: float = 0.5  # first delay after a failed password; doubles per failure from an address
    max_failure_delay: float = 8.0


class FailureLog:
    """Recent failed logins per source address, bounded (oldest addresses forgotten), so a
    client that reconnects after each failure keeps its back-off."""

    def __init__(self, limits: LoginLimits, size: int = 4096, memory: float = 300.0) -> None:
        self.limits = limits
        self._size, self._memory = size, memory
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def fail(self, address: str) -> float:
        """Record a failure; the delay to wait before answering it."""
        count, last = self._seen.pop(address, (0, 0.0))
        now = time.monotonic()
        if now - last > self._memory:
            count = 0
        count += 1
        self._seen[address] = (count, now)
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return min(self.limits.failure_delay * 2 ** (count - 1), self.limits.max_failure_delay)

    def succeed(self, address: str) -> None:
        self._seen.pop(address, None)


def start_all(pool: ThreadPoolExecutor, n: int) -> None:
    """Start every thread of a pool now (it starts them one busy moment at a time), so the
    process's thread count is fixed from the first request on."""
    barrier = threading.Barrier(n + 1)
    for _ in range(n):
        pool.submit(barrier.wait)
    barrier.wait()


AUTH_THREADS = 2  # password checks at once, across a node's front ends: scrypt takes 16 MiB each


def auth_executor() -> ThreadPoolExecutor:
    """The pool password checks run on, its threads started now."""
    pool = ThreadPoolExecutor(AUTH_THREADS, thread_name_prefix="auth")
    start_all(pool, AUTH_THREADS)
    return pool


class Gate:
    """The state shared by every connection of one server: users, limits, the executor
    password checks run on, the count of connections still authenticating."""

    def __init__(self, users: Iterable[User], limits: LoginLimits, executor: Executor) -> None:
        self.users = {u.name: u for u in users}
        self.limits = limits
        self.executor = executor
        self.failures = FailureLog(limits)
        self.authenticating = 0
        # Unknown users are checked against this, so they cost what known users cost.
        self._decoy = hash_password(secrets.token_hex(16))

    def password_matches(self, username: str, password: str) -> bool:
        user = self.users.get(username)
        stored = user.password_hash if user and user.password_hash else self._decoy
        ok = check_password(password, stored)
        return ok and user is not None and user.password_hash is not None and bool(password)


class Login(asyncssh.SSHServer):
    """One TCP connection's authentication. The session factory is asyncssh's; this only
    says who gets in."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.conn: asyncssh.SSHServerConnection | None = None
        self.address = "?"
        self.failures = 0
        self.counted = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.address = peer[0] if peer else "?"
        if self.gate.authenticating >= self.gate.limits.max_startups:
            log.warning("refusing SSH connection from %s: %d connections still authenticating",
                        self.address, self.gate.authenticating)
            conn.close()
            return
        self.gate.authenticating += 1
        self.counted = True

    def _done_authenticating(self) -> None:
        if self.counted:
            self.counted = False
            self.gate.authenticating -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._done_authenticating()
        self.conn = None

    def auth_completed(self) -> None:
        self._done_authenticating()
        self.gate.failures.succeed(self.address)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user = self.gate.users.get(username)
        data = key.public_data
        return user is not None and any(k.public_data == data for k in user.keys)

    async def validate_password(self, username: str, password: str) -> bool:
        if self.failures >= self.gate.limits.max_auth_tries:
            log.warning("closing SSH connection from %s after %d failed logins", self.address, self.failures)
            if self.conn is not None:
                self.conn.close()
            return False
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self.gate.executor, self.gate.password_matches, username, password)
        if ok:
            return True
        self.failures += 1
        delay = self.gate.failures.fail(self.address)
        log.info("password login refused for user %r from %s", username, self.address)
        await asyncio.sleep(delay)
        return False


def server_options(host_key: asyncssh.SSHKey, limits: LoginLimits) -> dict[str, Any]:
    """asyncssh.create_server keywords common to every NETCONF listener."""
    return {
        "server_host_keys": [host_key],
        "login_timeout": limits.login_timeout,
        "allow_pty": True,  # OpenSSH `ssh -t -s netconf` asks for one: harmless, the data is framed
        "line_editor": False,  # ...and must pass through untouched
        "agent_forwarding": False,
        "x11_forwarding": False,
        "allow_scp": False,
        "encoding": None,  # bytes: framing is on bytes, UTF-8 is the XML parser's business
        "keepalive_interval": 60,
        "keepalive_count_max": 3,
    }
