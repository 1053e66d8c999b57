"""SSH side of the NETCONF server (RFC 6242): who may log in, which host key, which address.

The `netconf`/`sshutil` server binds to every interface and authenticates
against PAM or ~/.ssh; an agent binds to one configured (loopback) address and
takes its users from its own config: a password (stored as a scrypt hash) and/or
OpenSSH public keys.
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import sshutil.server

from sdqkd.listen import binding

log = logging.getLogger(__name__)

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 128 * r * n = 16 MiB of working memory per check


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


_M_MMAP_THRESHOLD = -3  # malloc.h


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


def parse_public_key(line: str) -> paramiko.PKey:
    """One authorized_keys line ('ssh-ed25519 AAAA... comment')."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError("an authorized key is 'type base64 [comment]'")
    return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))


@dataclass
class User:
    name: str
    password_hash: str | None = None
    keys: list[paramiko.PKey] = field(default_factory=list)


class AuthController(paramiko.ServerInterface):
    """Password and public-key login for the configured users; 'netconf' subsystem only."""

    def __init__(self, users: Iterable[User]) -> None:
        self.users = {u.name: u for u in users}

    def get_allowed_auths(self, username: str) -> str:
        user = self.users.get(username)
        methods = []
        if user is None or user.keys:
            methods.append("publickey")
        if user is None or user.password_hash:
            methods.append("password")
        return ",".join(methods)

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        user = self.users.get(username)
        if user and user.password_hash and password and check_password(password, user.password_hash):
            return paramiko.AUTH_SUCCESSFUL
        log.info("password login refused for user %r", username)
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        user = self.users.get(username)
        if user and any(k == key for k in user.keys):
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return name == "netconf"


def load_or_create_host_key(path: Path) -> paramiko.PKey:
    """The agent's Ed25519 host key, made on first start (0600)."""
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    key = sshutil.server.from_private_key_file(str(path))
    if key is None:
        raise ValueError(f"{path}: not a usable SSH private key")
    return key


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint, as lab.json records it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class BoundSSHServer(sshutil.server.SSHServer):
    """sshutil's server, listening on one address instead of every interface."""

    def __init__(self, server_ctl: paramiko.ServerInterface, session_class: type, host_key: paramiko.PKey, address: str, port: int) -> None:
        self.server_ctl = server_ctl
        self.server_socket_class = sshutil.server.SSHServerSocket
        self.server_session_class = session_class
        self.extra_args = None
        self.debug = False
        self.host_key = host_key
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sessions inherit it: a notification followed by an rpc-reply is two
        # small writes, and Nagle held the reply until the client's delayed ACK (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.address, self.port = address, port
        with binding("NETCONF", address, port):
            try:
                sock.bind((address, port))
                sock.listen(100)
            except OSError:
                sock.close()
                raise
        self.port = sock.getsockname()[1]
        self.ports = {family: self.port}
        self.close_wsocket, self.close_rsocket = socket.socketpair()
        self.lock = threading.Lock()
        self.sockets: list = []
        self.thread = threading.Thread(target=self._accept_socket_thread, args=[sock], name=f"netconf-accept-{self.port}", daemon=True)
        self.thread.start()

    def __str__(self) -> str:
        return f"NETCONF server {self.address}:{self.port}"

    def __del__(self) -> None:
        """sshutil's logs every deletion at ERROR level (a second error line after a failed bind)."""
