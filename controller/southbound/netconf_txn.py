"""One NETCONF agent's part in a transaction (RFC 6241 8.3/8.4), phase by phase:

- lock: <lock> running and candidate (a candidate lock is only granted on a clean candidate,
  RFC 6241 7.5, so no <discard-changes> round trip is needed);
- edit: <edit-config> of the candidate and <validate>, pipelined;
- commit: <commit> with <confirmed/> and the transaction id as persist id;
- confirm: <commit> with that persist id and the unlocks, pipelined: if the confirm fails,
  the rollback's <cancel-commit> needs no lock, and running stays locked to others while a
  confirmed commit is pending (RFC 6241 8.4).
rollback: <cancel-commit> once a confirmed commit was sent (answered or not: an agent that
answers "no commit pending" harms nothing), <discard-changes> of a staged candidate before.
If the controller dies mid-way, the agent rolls back by itself when the confirm timeout
expires. Locks never wait (RFC 6241 7.5 answers lock-denied).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sdqkd.controller.southbound.errors import rpc_error
from sdqkd.controller.southbound.ops import CANDIDATE, CONFIRMED, Edit, config_element

log = logging.getLogger(__name__)


def _raise_first(results: list[Any]) -> None:
    """The first failed RPC of a pipeline."""
    for r in results:
        if isinstance(r, Exception):
            raise r


class NetconfHop:
    """`conn`: a southbound.agent.AgentConnection (its call() and pipeline())."""

    def __init__(self, conn: Any, txn_id: str, edits: list[Edit]) -> None:
        self.conn = conn
        self.name: str = conn.addr.name
        self.qkdn_id: str = conn.qkdn_id
        self.txn = txn_id
        self.edits = edits
        self.config = config_element(edits)
        self.locked: list[str] = []  # targets locked, in order
        self.staged = False  # the candidate was (maybe) edited
        self.committing = False  # the confirmed commit was sent (answered or not)
        self.confirmed = False  # ... and answered
        self.done = False  # the confirm went through: committed for good

    @property
    def committed(self) -> bool:
        return self.done

    def _check_caps(self) -> None:
        """The transaction's own needs plus what each edit declares (ncclient's RPC.DEPENDS)."""
        caps = set(self.conn.call(lambda m: list(m.server_capabilities)))
        needed = dict.fromkeys((CANDIDATE, CONFIRMED, *(d for e in self.edits for d in e.DEPENDS)))
        missing = [c for c in needed if c not in caps]
        if missing:
            raise rpc_error("operation-not-supported", f"agent lacks {', '.join(missing)}")

    def lock(self) -> None:
        self._check_caps()
        targets = ("running", "candidate")
        results = self.conn.pipeline([lambda m, t=t: m.lock(t) for t in targets])
        self.locked.extend(t for t, r in zip(targets, results) if not isinstance(r, Exception))
        _raise_first(results)

    def edit(self) -> None:
        self.staged = True
        # a failed edit changes nothing (the agent's edits are atomic): validate then
        # checks the untouched candidate, and the edit's error is the one reported
        _raise_first(self.conn.pipeline([
            lambda m: m.edit_config(target="candidate", config=self.config, default_operation="merge"),
            lambda m: m.validate(source="candidate"),
        ]))

    def commit(self, timeout: int) -> None:
        self.committing = True
        self.conn.call(lambda m: m.commit(confirmed=True, timeout=str(timeout), persist=self.txn))
        self.confirmed = True

    def confirm(self) -> None:
        targets = list(reversed(self.locked))
        calls: list[Callable[[Any], Any]] = [lambda m: m.commit(persist_id=self.txn)]
        results = self.conn.pipeline([*calls, *(lambda m, t=t: m.unlock(t) for t in targets)])
        for t, r in zip(targets, results[1:]):
            if not isinstance(r, Exception):
                self.locked.remove(t)
        _raise_first(results[:1])
        self.done = True

    def rollback(self) -> None:
        if self.done:
            return
        if self.committing:
            try:
                self.conn.call(lambda m: m.cancel_commit(persist_id=self.txn))
            except Exception:  # noqa: BLE001 - the confirm timeout rolls it back anyway
                if self.confirmed:  # an unanswered commit may not have been made at all
                    log.warning("cancel-commit on %s failed; its confirm timeout will roll back", self.name)
        elif self.staged:
            try:
                self.conn.call(lambda m: m.discard_changes())
            except Exception:  # noqa: BLE001
                pass

    def release(self) -> None:
        targets = list(reversed(self.locked))
        if not targets:
            return
        try:
            self.conn.pipeline([lambda m, t=t: m.unlock(t) for t in targets])
        except Exception:  # noqa: BLE001 - a dropped session released its locks anyway
            pass
        self.locked.clear()
