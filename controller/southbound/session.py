"""ncclient sessions without the 100 ms send delay.

ncclient's session thread looks at its send queue once per `select(timeout=TICK)`
with TICK = 0.1 s, so an RPC waits up to 100 ms before it leaves. Here `send()`
also writes one byte to a socketpair registered in the same selector, so the loop
wakes the moment a message is queued and otherwise sleeps until the server speaks
(no polling). The rest is ncclient as operators know it: `Manager`, `RPCError`, ...
"""
from __future__ import annotations

import selectors
import socket
from typing import Any

import ncclient.transport.parser
from ncclient.manager import (
    Manager,
    _extract_device_params,
    _extract_errors_params,
    _extract_manager_params,
    _extract_nc_params,
    make_device_handler,
)
from ncclient.transport.errors import SessionCloseError
from ncclient.transport.session import MSG_DELIM, END_DELIM, NetconfBase
from ncclient.transport.ssh import SSHSession


class WakingSSHSession(SSHSession):
    """SSHSession whose loop is woken by send() instead of polling its queue."""

    def __init__(self, device_handler: Any) -> None:
        super().__init__(device_handler)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def send(self, message: str) -> None:
        super().send(message)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (or closing)

    def close(self) -> None:
        super().close()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _frame(self, data: bytes) -> bytes:
        if self._base == NetconfBase.BASE_11:
            return b"\n#%i\n%s%s" % (len(data), data, END_DELIM)
        return data + MSG_DELIM

    def run(self) -> None:
        q = self._q
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            sel.register(self._channel, selectors.EVENT_READ, "channel")
            while True:
                while not q.empty() and self._send_ready():
                    data = self._frame(q.get().encode())
                    while data:
                        n = self._transport_write(data)
                        if n <= 0:
                            raise SessionCloseError(self._buffer.getvalue(), data)
                        data = data[n:]
                # Sleep until the server speaks or a message is queued; only a
                # full SSH window (queue not empty, cannot send) needs a short timeout.
                timeout = None if q.empty() else 0.005
                for key, _ in sel.select(timeout=timeout):
                    if key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    data = self._transport_read()
                    if data:
                        try:
                            self.parser.parse(data)
                        except ncclient.transport.parser.SAXFilterXMLNotFoundError:
                            self.parser = ncclient.transport.parser.DefaultXMLParser(self)
                            self.parser.parse(data)
                    elif self._closing.is_set():
                        return
                    else:
                        raise SessionCloseError(self._buffer.getvalue())
                if self._closing.is_set() and not self._channel.recv_ready():
                    if self._channel.closed or self._channel.eof_received:
                        return
        except Exception as exc:  # noqa: BLE001 - same contract as ncclient's loop
            self.logger.debug("Broke out of main loop, error=%r", exc)
            # closed first, then the error to the waiting RPCs (ncclient does it the other way
            # round): an RPC sent in between would be queued on a dead loop and wait out its
            # whole timeout; closed first, send() refuses it at once (a killed agent)
            self.close()
            self._dispatch_error(exc)
        finally:
            sel.close()
            self._wake_r.close()
            self._wake_w.close()


def connect(*args: Any, **kwds: Any) -> Manager:
    """ncclient.manager.connect_ssh with the waking session (same parameters)."""
    device_params = _extract_device_params(kwds)
    manager_params = _extract_manager_params(kwds)
    nc_params = _extract_nc_params(kwds)
    ignore_errors, raise_mode = _extract_errors_params(kwds)
    manager_params["raise_mode"] = raise_mode
    handler = make_device_handler(device_params, ignore_errors)
    handler.add_additional_ssh_connect_params(kwds)
    handler.add_additional_netconf_params(nc_params)
    session = WakingSSHSession(handler)
    try:
        session.connect(*args, **kwds)
    except Exception:
        if session.transport:
            session.close()
        raise
    # paramiko's window adjusts are small writes just before the next RPC: with Nagle
    # the RPC waited for the server's delayed ACK (~40 ms, the edit-config p99).
    sock = getattr(session.transport, "sock", None)
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Manager(session, handler, **manager_params)
