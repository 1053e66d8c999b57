"""A Plan applied to every agent it touches as one transaction, over NETCONF or RESTCONF
per agent (southbound/interface.py: each agent's Hop fills the phases its way).

1. lock on every hop (NETCONF: running and candidate; RESTCONF: the configuration and its
   entity-tag, which every later write requires unchanged);
2. edit on every hop (NETCONF: edit the candidate and validate it);
3. commit on every hop (NETCONF: with <confirmed/> and a persist id; RESTCONF: the writes
   themselves, If-Match, after every NETCONF hop has validated its candidate);
4. confirm on every hop, and unlock.
Each phase runs on all hops at once (one session each) and the next phase starts when
every hop has answered. Any failure before step 4 rolls back every hop (NETCONF: cancels
the confirmed commits already made or discards the candidate; RESTCONF: puts the saved
entries back), so no hop keeps a partial path; if the controller dies mid-way, the NETCONF
agents roll back by themselves when the confirm timeout expires (a RESTCONF hop written in
step 3 keeps the change: the controller reconciles it when it comes back, as it owns every
entry before pushing it). A hop that dies (its session drops, a transport error or a
timeout) fails the transaction like a refusal does: every exception a hop raises is a
TxnError, so the rollback always runs. Only step 4 cannot be undone: a hop that dies there
leaves the hops whose confirm went through committed; the error lists them
(TxnError.committed, with any RESTCONF hop whose restore failed) and the caller puts them
back (the controller reconciles them against its store). Locks never wait (RFC 6241 7.5
answers lock-denied; a RESTCONF write whose entity-tag moved is refused with 412), so two
controllers at once both fail cleanly rather than deadlock.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ncclient.operations.rpc import RPCError

from sdqkd.controller.southbound.errors import AgentUnavailable
from sdqkd.controller.southbound.interface import Hop, Southbound
from sdqkd.controller.southbound.ops import Plan

log = logging.getLogger(__name__)


class TxnError(Exception):
    """The transaction failed and was rolled back everywhere (but on `committed`, the hops
    whose confirm had gone through when another hop failed in the confirm phase).
    node/tag/path tell where and why; unavailable: the hop could not be reached or died
    mid-way (not a refusal: a retry may take another path)."""

    def __init__(self, node: str, message: str, tag: str = "operation-failed", path: str | None = None,
                 unavailable: bool = False) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node
        self.message = message
        self.tag = tag
        self.path = path
        self.unavailable = unavailable
        self.committed: list[str] = []


@dataclass
class TxnReport:
    txn_id: str
    nodes: list[str]
    phases: dict[str, float] = field(default_factory=dict)
    hops: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> node -> its seconds


_serial = threading.Lock()


def busy() -> bool:
    """A transaction is running (a hint: it may end or start right after)."""
    return _serial.locked()


def _txn_error(name: str, exc: Exception) -> TxnError:
    """A hop's failure as the transaction reports it: the agent's rpc-error as it came (a
    RESTCONF agent's ietf-restconf:errors arrive as one too); anything else (not connected,
    the session dropped, no reply in time: ncclient's TransportError, SessionCloseError,
    TimeoutExpiredError, httpx's TransportError, OSError) as an unavailable agent,
    resource-denied."""
    if isinstance(exc, TxnError):
        return exc
    if isinstance(exc, RPCError):
        return TxnError(name, exc.message or str(exc), exc.tag or "operation-failed", exc.path)
    why = str(exc) if isinstance(exc, AgentUnavailable) else f"{type(exc).__name__}: {exc}"
    return TxnError(name, f"agent {name} is unreachable ({why})", "resource-denied", unavailable=True)


_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="txn")


def _each(hops: list[Hop], step: Callable[[Hop], None]) -> None:
    """`step` on every hop at once; when all have answered, the first hop's failure (in
    plan order) is raised, as a TxnError."""
    def run(h: Hop) -> None:
        try:
            step(h)
        except Exception as exc:  # noqa: BLE001 - every failure of a hop must reach the rollback
            raise _txn_error(h.name, exc) from None

    if len(hops) == 1:
        run(hops[0])
        return
    futures = [_pool.submit(run, h) for h in hops]
    failures = [f.exception() for f in futures]
    for exc in failures:
        if exc is not None:
            raise exc


PHASES = ("lock", "edit", "commit", "confirm")


def apply(plan: Plan, conns: Mapping[str, Southbound], *, confirm_timeout: int = 60,
          before_phase: Callable[[str], None] | None = None) -> TxnReport:
    """Apply `plan` everywhere or nowhere (see TxnError.committed for the one exception).
    before_phase(name) runs before each phase starts: where a test kills a hop, or
    anything that must observe a transaction between its phases."""
    with _serial:
        txn = str(uuid.uuid4())
        order = plan.nodes()
        report = TxnReport(txn, order)
        missing = [n for n in order if n not in conns]
        if missing:
            raise TxnError(missing[0], "no such agent", "data-missing")
        hops = [conns[n].begin(txn, plan.edits[n]) for n in order]
        steps: dict[str, Callable[[Hop], None]] = {
            "lock": lambda h: h.lock(), "edit": lambda h: h.edit(),
            "commit": lambda h: h.commit(confirm_timeout), "confirm": lambda h: h.confirm()}

        def timed(phase: str, step: Callable[[Hop], None]) -> Callable[[Hop], None]:
            per = report.hops.setdefault(phase, {})

            def run(h: Hop) -> None:
                t = time.perf_counter()
                try:
                    step(h)
                finally:
                    per[h.name] = time.perf_counter() - t
            return run

        t0 = time.perf_counter()
        try:
            for phase in PHASES:
                if before_phase is not None:
                    before_phase(phase)
                _each(hops, timed(phase, steps[phase]))
                report.phases[phase] = time.perf_counter() - t0
            return report
        except Exception as exc:
            _each(hops, _quiet(lambda h: h.rollback()))
            if isinstance(exc, TxnError):
                exc.committed = [h.qkdn_id for h in hops if h.committed]
            raise
        finally:
            _each(hops, _quiet(lambda h: h.release()))


def _quiet(step: Callable[[Hop], None]) -> Callable[[Hop], None]:
    """A clean-up step whose failure must not hide the transaction's own (rollback and
    release log what they could not do)."""
    def run(h: Hop) -> None:
        try:
            step(h)
        except Exception:  # noqa: BLE001
            log.exception("clean-up on %s failed", h.name)
    return run
