"""Concurrent ETSI 014 enc_keys requests for the same master, slave and key size that
need the network (a relay, a peer's reservation) share one LKMS call: one relay message
and one store transaction per hop carry all their keys, instead of one each.

While a call for a pair is in flight, the requests that arrive queue; they then go
together in the next call, up to `max_keys` keys. Each request still gets its own
keys (fresh IDs from the LKMS) and nothing else. If the shared call is refused, each
of its requests is asked again on its own, so every caller gets the answer its own
request deserves (e.g. a `number` above the KME's limit, or not enough key for all).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .interface import Key, KmsError

# the LKMS call for (number, size) keys from master to slave: https.call on the pool
EncKeys = Callable[[str, str, int, int | None], Awaitable[list[Key]]]
_Pair = tuple[str, str, int | None]


class Coalescer:
    """Merges enc_keys of one (master, slave, size); at most `parallel` calls per pair at once."""

    def __init__(self, max_keys: int = 32, parallel: int = 2) -> None:
        self.max_keys = max_keys
        self.parallel = parallel
        self._queues: dict[_Pair, list[tuple[int, asyncio.Future[list[Key]]]]] = {}
        self._running: dict[_Pair, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def enc_keys(self, fn: EncKeys, master: str, slave: str, number: int, size: int | None) -> list[Key]:
        pair = (master, slave, size)
        fut: asyncio.Future[list[Key]] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(pair, []).append((number, fut))
        if self._running.get(pair, 0) < self.parallel:
            self._running[pair] = self._running.get(pair, 0) + 1
            task = asyncio.get_running_loop().create_task(self._drain(fn, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self, fn: EncKeys, pair: _Pair) -> None:
        try:
            while self._queues.get(pair):
                batch = self._next_batch(pair)
                await self._serve(fn, pair, batch)
        finally:
            self._running[pair] -= 1
            if not self._running[pair]:
                del self._running[pair]
                self._queues.pop(pair, None)

    def _next_batch(self, pair: _Pair) -> list[tuple[int, asyncio.Future[list[Key]]]]:
        queue = self._queues[pair]
        batch = [queue.pop(0)]
        total = batch[0][0]
        while queue and total + queue[0][0] <= self.max_keys:
            total += queue[0][0]
            batch.append(queue.pop(0))
        return batch

    async def _serve(self, fn: EncKeys, pair: _Pair, batch: list[tuple[int, asyncio.Future[list[Key]]]]) -> None:
        master, slave, size = pair
        live = [(n, f) for n, f in batch if not f.done()]  # a caller that went away needs no key
        if not live:
            return
        if len(live) == 1:
            await _settle(live[0][1], fn(master, slave, live[0][0], size))
            return
        try:
            keys = await fn(master, slave, sum(n for n, _ in live), size)
        except KmsError:  # refused as a whole: each request gets its own answer
            await asyncio.gather(*(_settle(f, fn(master, slave, n, size)) for n, f in live))
            return
        except Exception as exc:  # noqa: BLE001 - the same failure for every caller of the call
            for _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        pos = 0
        for n, f in live:
            if not f.done():
                f.set_result(keys[pos:pos + n])
            pos += n


async def _settle(fut: asyncio.Future[Any], work: Awaitable[Any]) -> None:
    try:
        result = await work
    except Exception as exc:  # noqa: BLE001 - handed to the caller
        if not fut.done():
            fut.set_exception(exc)
        return
    if not fut.done():
        fut.set_result(result)
