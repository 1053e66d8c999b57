"""A Plan applied to every agent it touches as one transaction (RFC 6241 8.3/8.4).

1. lock running and candidate on every hop (a candidate lock is only granted on a
   clean candidate, RFC 6241 7.5, so no <discard-changes> round trip is needed);
2. edit candidate and validate on every hop;
3. commit with <confirmed/> and a persist id on every hop;
4. confirm on every hop, and unlock.
Each phase runs on all hops at once (one NETCONF session each) and the next phase
starts when every hop has answered; within a phase a hop's RPCs are pipelined
(both locks, edit + validate, both unlocks: one round trip each). Any failure before step 4 cancels the confirmed
commits already made (or discards the candidate) on every hop, so no hop keeps a
partial path; if the controller dies mid-way, the agents roll back by themselves
when the confirm timeout expires. A hop that dies (its session drops, ncclient raises
a transport error or times out) fails the transaction like a refusal does: every
exception a hop raises is a TxnError, so the rollback always runs (before, a dropped
session's SessionCloseError escaped it and left the survivors' confirmed commits
pending and their changes in place). Only step 4 cannot be undone by the protocol: a
hop that dies there leaves the hops whose confirm went through committed; the error
lists them (TxnError.committed) and the caller puts them back (the controller
reconciles them against its store). Locks never wait (RFC 6241 7.5 answers
lock-denied), so two controllers locking the same hops at once both fail cleanly
rather than deadlock.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ncclient.operations.rpc import RPCError

from sdqkd.controller.southbound.agent import AgentConnection, AgentUnavailable
from sdqkd.controller.southbound.ops import CANDIDATE, CONFIRMED, Edit, Plan, config_element

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


def _check_caps(conn: AgentConnection, edits: list[Edit]) -> None:
    """The transaction's own needs plus what each edit declares (ncclient's RPC.DEPENDS)."""
    caps = set(_on(conn, lambda m: list(m.server_capabilities)))
    needed = dict.fromkeys((CANDIDATE, CONFIRMED, *(d for e in edits for d in e.DEPENDS)))
    missing = [c for c in needed if c not in caps]
    if missing:
        raise TxnError(conn.addr.name, f"agent lacks {', '.join(missing)}", "operation-not-supported")


def _txn_error(c: AgentConnection, exc: Exception) -> TxnError:
    """An RPC's failure as the transaction reports it: the agent's rpc-error as it came;
    anything else (not connected, the session dropped, no reply in time: ncclient's
    TransportError, SessionCloseError, TimeoutExpiredError, OSError) as an unavailable
    agent, resource-denied."""
    if isinstance(exc, TxnError):
        return exc
    if isinstance(exc, RPCError):
        return TxnError(c.addr.name, exc.message or str(exc), exc.tag or "operation-failed", exc.path)
    why = str(exc) if isinstance(exc, AgentUnavailable) else f"{type(exc).__name__}: {exc}"
    return TxnError(c.addr.name, f"agent {c.addr.name} is unreachable ({why})", "resource-denied", unavailable=True)


def _on(c: AgentConnection, fn: Any) -> Any:
    """One RPC on one agent; failures name the agent."""
    try:
        return c.call(fn)
    except Exception as exc:  # noqa: BLE001 - every failure of a hop must reach the rollback
        raise _txn_error(c, exc) from None


def _pipelined(c: AgentConnection, fns: list[Callable[[Any], Any]]) -> list[Any]:
    """Several RPCs on one agent in one round trip: each reply or its error, in order."""
    try:
        return c.pipeline(fns)
    except Exception as exc:  # noqa: BLE001 - as in _on
        raise _txn_error(c, exc) from None


def _raise_first(c: AgentConnection, results: list[Any]) -> None:
    """The first failed RPC of a pipeline, named as _on names it."""
    for r in results:
        if isinstance(r, Exception):
            raise _txn_error(c, r) from None


_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="txn")


def _each(conns: list[AgentConnection], step: Callable[[AgentConnection], None]) -> None:
    """`step` on every hop at once; when all have answered, the first hop's failure (in
    plan order) is raised."""
    if len(conns) == 1:
        step(conns[0])
        return
    futures = [_pool.submit(step, c) for c in conns]
    failures = [f.exception() for f in futures]
    for exc in failures:
        if exc is not None:
            raise exc


PHASES = ("lock", "edit", "commit", "confirm")


def apply(plan: Plan, conns: dict[str, AgentConnection], *, confirm_timeout: int = 60,
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
        hops = [conns[n] for n in order]
        configs = {id(conns[n]): config_element(plan.edits[n]) for n in order}
        edits = {id(conns[n]): plan.edits[n] for n in order}
        record = threading.Lock()
        locked: list[tuple[AgentConnection, str]] = []
        staged: list[AgentConnection] = []
        confirmed: list[AgentConnection] = []
        done: list[AgentConnection] = []  # confirm went through: committed for good
        committing: list[AgentConnection] = []  # the confirmed commit was sent (answered or not)

        def lock(c: AgentConnection) -> None:
            _check_caps(c, edits[id(c)])
            targets = ("running", "candidate")
            results = _pipelined(c, [lambda m, t=t: m.lock(t) for t in targets])
            with record:
                locked.extend((c, t) for t, r in zip(targets, results) if not isinstance(r, Exception))
            _raise_first(c, results)

        def edit(c: AgentConnection) -> None:
            with record:
                staged.append(c)
            # a failed edit changes nothing (the agent's edits are atomic): validate then
            # checks the untouched candidate, and the edit's error is the one reported
            _raise_first(c, _pipelined(c, [
                lambda m: m.edit_config(target="candidate", config=configs[id(c)], default_operation="merge"),
                lambda m: m.validate(source="candidate"),
            ]))

        def commit(c: AgentConnection) -> None:
            with record:
                committing.append(c)
            _on(c, lambda m: m.commit(confirmed=True, timeout=str(confirm_timeout), persist=txn))
            with record:
                confirmed.append(c)

        def confirm(c: AgentConnection) -> None:
            # the unlocks ride in the same round trip: if the confirm fails, the rollback's
            # cancel-commit needs no lock, and running stays locked to others while a
            # confirmed commit is pending (RFC 6241 8.4)
            with record:
                targets = [t for cc, t in reversed(locked) if cc is c]
            results = _pipelined(c, [lambda m: m.commit(persist_id=txn), *(lambda m, t=t: m.unlock(t) for t in targets)])
            with record:
                for t, r in zip(targets, results[1:]):
                    if not isinstance(r, Exception):
                        locked.remove((c, t))
            _raise_first(c, results[:1])
            with record:
                done.append(c)

        def timed(phase: str, step: Callable[[AgentConnection], None]) -> Callable[[AgentConnection], None]:
            per = report.hops.setdefault(phase, {})

            def run(c: AgentConnection) -> None:
                t = time.perf_counter()
                try:
                    step(c)
                finally:
                    per[c.addr.name] = time.perf_counter() - t
            return run

        t0 = time.perf_counter()
        try:
            for phase, step in zip(PHASES, (lock, edit, commit, confirm)):
                if before_phase is not None:
                    before_phase(phase)
                _each(hops, timed(phase, step))
                report.phases[phase] = time.perf_counter() - t0
            return report
        except Exception as exc:
            # a hop whose commit got no answer (timed out, session dropped) may have committed:
            # it is cancelled too (an agent that answers "no commit pending" harms nothing)
            _rollback(txn, [c for c in committing if c not in done], [c for c in staged if c not in done],
                      quiet=[c for c in committing if c not in confirmed])
            if isinstance(exc, TxnError):
                exc.committed = [c.qkdn_id for c in done]
            raise
        finally:
            holders = list(dict.fromkeys(c for c, _ in locked))
            _each(holders, lambda c: _unlock(c, [t for cc, t in reversed(locked) if cc is c]))


def _unlock(c: AgentConnection, targets: list[str]) -> None:
    try:
        c.pipeline([lambda m, t=t: m.unlock(t) for t in targets])
    except Exception:  # noqa: BLE001 - a dropped session released its locks anyway
        pass


def _rollback(txn: str, confirmed: list[AgentConnection], staged: list[AgentConnection],
              quiet: list[AgentConnection] | None = None) -> None:
    def cancel(c: AgentConnection) -> None:
        try:
            c.call(lambda m: m.cancel_commit(persist_id=txn))
        except Exception:  # noqa: BLE001 - the confirm timeout rolls it back anyway
            if c not in (quiet or []):
                log.warning("cancel-commit on %s failed; its confirm timeout will roll back", c.addr.name)

    def discard(c: AgentConnection) -> None:
        try:
            c.call(lambda m: m.discard_changes())
        except Exception:  # noqa: BLE001
            pass

    _each(list(confirmed), cancel)
    _each([c for c in staged if c not in confirmed], discard)
