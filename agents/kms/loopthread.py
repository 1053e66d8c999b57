"""A key-delivery server that runs on an asyncio loop in a thread of its own.

The agent is thread-based (NETCONF workers, drivers), so each front end (the HTTPS APIs,
the ETSI 004 stream forms) keeps its loop in one thread; `start()` returns once it
listens, or raises what kept it from listening (ListenError naming its role)."""
from __future__ import annotations

import asyncio
import threading
from typing import Any


class LoopThread:
    """Subclasses implement `_run()`: make the loop, listen, then `_listening(loop)`, or
    `_failed(exc)` before listening; `role`, `host` and `_port` name it."""

    role: str
    host: str
    _port: int
    thread_prefix = "server"  # its thread is "<prefix>-<role>-<host>:<port>"

    def _init_thread(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        """The bound port (known once start() returned)."""
        return self._port

    def start(self, timeout: float = 10.0) -> Any:
        """Listen, or raise what stopped it (e.g. its port in use); returns self."""
        self._thread = threading.Thread(target=self._run, name=f"{self.thread_prefix}-{self.role}-{self.host}:{self._port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.role} server on {self.host}:{self._port} did not start in {timeout} s")
        if self._failure is not None:
            self._thread.join(timeout)
            raise self._failure
        return self

    def _listening(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready.set()

    def _failed(self, exc: BaseException) -> None:
        self._failure = exc
        self._ready.set()

    def _run(self) -> None:
        raise NotImplementedError
