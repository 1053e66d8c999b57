"""One wording for a server that cannot take its address, whichever server it is.

An operator (or `sdqkd lab up`) reading an agent's or the controller's exit needs to know
which listener failed, on which port, and why, in one line: "NETCONF cannot listen on
127.0.0.1:8350: address already in use"."""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager


class ListenError(OSError):
    """A listener could not bind; `role` says which one (NETCONF, ETSI 014/004 HTTPS, ...)."""

    def __init__(self, role: str, address: str, port: int, reason: OSError | str) -> None:
        code = reason.errno if isinstance(reason, OSError) and reason.errno else errno.EADDRNOTAVAIL
        # the errno's own words: asyncio and socket.create_server wrap them in longer text
        why = reason if isinstance(reason, str) else os.strerror(code) if reason.errno else str(reason)
        host = f"[{address}]" if ":" in address else address
        super().__init__(code, f"{role} cannot listen on {host}:{port}: {why.lower()}")
        self.role, self.address, self.port = role, address, port

    def __str__(self) -> str:
        return str(self.strerror)

    @property
    def in_use(self) -> bool:
        return self.errno == errno.EADDRINUSE


@contextmanager
def binding(role: str, address: str, port: int) -> Iterator[None]:
    """Turn the OSError of a bind inside the block into a ListenError naming `role`."""
    try:
        yield
    except ListenError:
        raise
    except OSError as exc:
        raise ListenError(role, address, port, exc) from None


def bind_error(address: str, port: int) -> OSError | None:
    """What binding address:port the way our servers do (SO_REUSEADDR: a port in TIME_WAIT
    is no obstacle) fails with now, or None when it is free."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            return exc
    return None


def is_loopback(address: str) -> bool:
    """Whether `address` (a literal or 'localhost') only reaches this host: where a server
    may trust its clients without authenticating them (plain TCP key delivery)."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
