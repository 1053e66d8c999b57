"""A NETCONF session as raw bytes over a real SSH connection (paramiko), for tests and
benches that must send what no well-behaved client sends: broken framing, oversized or
mutated requests, or a TCP reset in the middle of anything."""
from __future__ import annotations

import socket
import struct

import paramiko

from agentproc import PASSWORD, AgentProc

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def hello(version: str) -> bytes:
    """A client <hello> offering only base:`version` ("1.0" or "1.1"), end-of-message framed."""
    return (f'<hello xmlns="{NC}"><capabilities><capability>urn:ietf:params:netconf:base:{version}'
            "</capability></capabilities></hello>]]>]]>").encode()


HELLO_10, HELLO_11 = hello("1.0"), hello("1.1")


def reset(sock: socket.socket) -> None:
    """Close with RST, as a crashed client or a cut cable looks to the server."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Raw:
    """One SSH connection with a netconf channel, as bytes; `drop()` ends it with a TCP reset.
    `chunked`: the session speaks base:1.1 framing after the hellos (our hello offered 1.1)."""

    def __init__(self, agent: AgentProc, hello: bytes | None = HELLO_10, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", agent.port), source_address=(source, 0), timeout=20)
        self.t = paramiko.Transport(self.sock)
        self.t.connect(username="admin", password=PASSWORD)
        self.ch = self.t.open_session()
        self.ch.invoke_subsystem("netconf")
        self.ch.settimeout(20)
        self.buf = b""
        self.server_hello = self.read_eom()
        self.chunked = hello is not None and b"base:1.1" in hello
        if hello is not None:
            self.ch.sendall(hello)

    def send(self, message: bytes) -> None:
        """One message in the session's framing."""
        self.ch.sendall(b"\n#%d\n" % len(message) + message + b"\n##\n" if self.chunked else message + b"]]>]]>")

    def read(self) -> bytes:
        """One message in the session's framing; EOFError when the server ended the session."""
        return self.read_chunked() if self.chunked else self.read_eom()

    def _more(self) -> None:
        data = self.ch.recv(1 << 20)
        if not data:
            raise EOFError(self.buf)
        self.buf += data

    def read_eom(self) -> bytes:
        while b"]]>]]>" not in self.buf:
            self._more()
        message, _, self.buf = self.buf.partition(b"]]>]]>")
        return message

    def read_chunked(self) -> bytes:
        """One chunked-framed message (RFC 6242 §4.2)."""
        out = b""
        while True:
            while b"\n" not in self.buf[2:] or len(self.buf) < 4:
                self._more()
            if self.buf.startswith(b"\n##\n"):
                self.buf = self.buf[4:]
                return out
            header, _, rest = self.buf[2:].partition(b"\n")
            size = int(header)
            while len(rest) < size:
                self._more()
                header, _, rest = self.buf[2:].partition(b"\n")
            out += rest[:size]
            self.buf = rest[size:]

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        self.ch.settimeout(timeout)
        try:
            while self.ch.recv(65536):
                pass
        except socket.timeout:
            return False
        return True

    def drop(self) -> None:
        """A TCP reset, no SSH disconnect. paramiko's reader thread would hold the socket open
        past our close: SHUT_RD (which sends nothing) ends it, then the socket closes with
        SO_LINGER 0."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.t.active = False
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:  # the server closed it first
            pass
        self.t.join(2)
        self.sock.close()
