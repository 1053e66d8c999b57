"""running, candidate and startup, their locks, and the commit pipeline.

A commit is sysrepo's two-phase shape: validate (YANG types, semantic checks, then
Driver.check on every change), then apply per driver; if one apply fails, the
changes already applied are undone with their inverse and running stays as it was.
A confirmed commit (RFC 6241 8.4) keeps the previous running until confirmed, and
rolls back when the timeout fires, or when the session that made it ends (unless
it was given a persist id).

candidate (RFC 6241 8.3) is running itself until it is modified (an edit-config or
copy-config to it since the last commit or discard-changes): an unmodified candidate
follows every change to running, so committing it changes nothing. Its first
modification starts from running as it is then, and a commit replaces running with
it (sysrepo's and Netopeer2's semantics): changes made to running after that are
overwritten by the commit.

Persistence. startup is what the operator saved (copy-config to startup); running is
written on every commit to its own file as well, so that a node killed at any point
comes back with the configuration it was provisioned with (the controller expects a
node to keep its state across a crash, as a router keeps its forwarding state): at
start, running is the persisted running if there is one, else startup (RFC 6241 8.7
reads startup at boot; we read it only when there is no running to keep). While a
confirmed commit is pending, the file holds the configuration from before it: a
confirmed commit that was never confirmed must not survive a crash as committed
(RFC 6241 8.4). Files are replaced atomically (temporary file in the same directory,
fsync, rename, fsync of the directory) and readable by their owner only (they name
links and applications; the agent's secrets live beside them).
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from sdqkd.agents.netconf import errors
from sdqkd.agents.datastore import diff, edit, validate
from sdqkd.agents.datastore.model import Config, ModelSet
from sdqkd.agents.drivers.base import Change, Driver, DriverError
from sdqkd.private import private_dir, write_private

log = logging.getLogger(__name__)

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
TARGETS = ("running", "candidate", "startup")


@dataclass
class _Confirmed:
    previous: list[etree._Element]
    session_id: int
    persist: str | None
    timer: threading.Timer


class Datastores:
    """The three configuration datastores of one agent."""

    def __init__(
        self,
        models: ModelSet,
        facts: validate.NodeFacts,
        drivers: Iterable[Driver] = (),
        startup_path: Path | None = None,
        initial: Iterable[etree._Element] = (),
        on_commit: Callable[[list[Change]], None] | None = None,
        running_path: Path | None = None,
    ) -> None:
        self.models = models
        self.facts = facts
        self.drivers = list(drivers)
        self.startup_path = startup_path
        self.running_path = running_path
        self.restored_from: str = "startup"  # where running came from at start: running (file), startup, or initial
        self.on_commit = on_commit
        self.lock = threading.RLock()
        self.locks: dict[str, int] = {}
        self.candidate_dirty_by: int | None = None  # the session that last modified candidate; None: unmodified
        self.confirmed: _Confirmed | None = None
        base = list(initial)
        if startup_path is not None and startup_path.exists():
            base = self._read_file(startup_path)
        else:
            self.restored_from = "initial"
        self.running: list[etree._Element] = []
        self._running_cfg = Config((), {})
        self.candidate: list[etree._Element] = []
        self._candidate_cfg = Config((), {})
        cfg, _ = self.check(base, with_devices=False)
        self.startup: list[etree._Element] = [copy.deepcopy(e) for e in cfg.elements]
        kept = self._load_running()
        if kept is not None:
            cfg = kept
            self.restored_from = "running"
        self.running, self._running_cfg = list(cfg.elements), cfg
        self._reset_candidate()

    # --- reading -----------------------------------------------------------------

    def get(self, target: str) -> list[etree._Element]:
        with self.lock:
            return [copy.deepcopy(e) for e in self._store(target)]

    def running_config(self) -> Config:
        """running as last validated: canonical XML and per-module RFC 7951 JSON. Replaced
        whole on every commit, never changed in place, so one read is a consistent snapshot
        (a <get> filling state into a copy of it does not hold up the next transaction)."""
        return self._running_cfg

    def _store(self, target: str) -> list[etree._Element]:
        if target not in TARGETS:
            raise errors.protocol(errors.BadElement, f"unknown datastore '{target}'", info={"bad-element": target})
        return getattr(self, target)

    # --- locks (RFC 6241 7.5) ----------------------------------------------------

    def lock_target(self, target: str, session_id: int) -> None:
        with self.lock:
            self._store(target)
            holder = self.locks.get(target)
            if holder:
                raise errors.LockDenied(f"{target} is locked by session {holder}", info={"session-id": str(holder)})
            if target == "candidate" and self.candidate_dirty_by is not None:
                raise errors.LockDenied("candidate has uncommitted changes", info={"session-id": "0"})
            if target == "running" and self.confirmed is not None and self.confirmed.session_id != session_id:
                raise errors.LockDenied("a confirmed commit is pending", info={"session-id": str(self.confirmed.session_id)})
            self.locks[target] = session_id

    def unlock_target(self, target: str, session_id: int) -> None:
        with self.lock:
            self._store(target)
            holder = self.locks.get(target)
            if holder != session_id:
                raise errors.OperationFailed(f"{target} is not locked by this session", info={"session-id": str(holder or 0)})
            del self.locks[target]
            if target == "candidate" and self.candidate_dirty_by == session_id:
                self._reset_candidate()  # RFC 6241 8.3.5.2

    def _check_writable(self, target: str, session_id: int) -> None:
        holder = self.locks.get(target)
        if holder and holder != session_id:
            raise errors.InUse(f"{target} is locked by session {holder}", info={"session-id": str(holder)})

    def session_ended(self, session_id: int) -> None:
        """Release what a closing session held (RFC 6241 7.5 and 8.4.1)."""
        with self.lock:
            for target in [t for t, s in self.locks.items() if s == session_id]:
                self.unlock_target(target, session_id)
            c = self.confirmed
            if c is not None and c.session_id == session_id and c.persist is None:
                self._rollback("session ended before confirming")

    # --- editing -----------------------------------------------------------------

    def edit(self, target: str, config: etree._Element, session_id: int, default_operation: str = "merge",
             test_option: str = "test-then-set", error_option: str = "stop-on-error") -> None:
        """edit-config (RFC 6241 7.2). stop-on-error and rollback-on-error are both atomic:
        the first error fails the edit and nothing changes (stop-on-error may leave earlier
        changes in place; we advertise :rollback-on-error and never do). continue-on-error
        applies the operations that succeed (_edit_each)."""
        with self.lock:
            if target not in ("running", "candidate"):
                raise errors.protocol(errors.BadElement, f"edit-config cannot target '{target}'", info={"bad-element": target})
            self._check_writable(target, session_id)
            if error_option == "continue-on-error":
                self._edit_each(target, config, session_id, default_operation, test_option)
                return
            new = edit.apply_edit(self._store(target), config, self.models, default_operation)
            if test_option == "test-only":
                self.check(new)
                return
            if target == "running":
                self._commit(new, session_id)
            else:
                self._set_candidate(self._validated(new), session_id)

    def _edit_each(self, target: str, config: etree._Element, session_id: int, default_operation: str, test_option: str) -> None:
        """continue-on-error: every operation that fails is left out and reported, all in one
        reply; the others are applied. The result is tested as a whole, as an atomic edit's
        is (libyang; for running and test-only also the semantic and device checks), and an
        operation whose result fails the test is left out too, reported with the error found.
        The error is pinned on the innermost operation that wrote the node it names, else on
        the operations that wrote inside that node, else on the one operation whose absence
        clears it (a delete that leaves a leafref dangling); then the rest is tested again.
        test-then-set's "do not perform the edit-config if validation errors occur" is thus
        applied per operation. An error that no operation explains fails the whole edit,
        as rollback-on-error would."""
        store = self._store(target)
        test = self.check if target == "running" or test_option == "test-only" else self._check_yang

        def run(skip: set[etree._Element]) -> tuple[edit.Outcome, list[errors.RpcError], Config | None]:
            """The edit without `skip`, and the errors its test finds (or its validation)."""
            out = edit.apply_each(store, config, self.models, default_operation, skip)
            try:
                return out, [], test(out.elements)[0]
            except (errors.RpcError, errors.RpcErrors) as exc:
                return out, _listed(exc), None

        def clearing(problem: errors.RpcError, written: list[tuple[etree._Element, str]],
                     skip: set[etree._Element]) -> list[etree._Element]:
            """The last operation without which `problem` is gone ([] if there is none)."""
            for el, _ in reversed(written):
                if _ident(problem) not in {_ident(p) for p in run(skip | {el})[1]}:
                    return [el]
            return []

        skip: set[etree._Element] = set()
        failures: list[errors.RpcError] = []
        while True:
            out, problems, cfg = run(skip)
            for el, exc in out.failed:
                skip.add(el)
                failures.append(exc)
            if cfg is not None:
                break
            for problem in problems:
                culprits = _culprits(problem.path, out.written) or clearing(problem, out.written, skip)
                if not culprits:
                    raise errors.RpcErrors(_unique(failures + problems))  # no operation explains it
                skip.update(culprits)
            failures.extend(problems)
        failures = _unique(failures)
        if test_option == "test-only" or (failures and not out.written):
            if failures:
                raise errors.RpcErrors(failures)
            return
        try:
            if target == "running":
                self._commit(cfg, session_id)
            else:
                self._set_candidate(cfg, session_id)
        except (errors.RpcError, errors.RpcErrors) as exc:
            raise errors.RpcErrors(failures + _listed(exc)) from None
        if failures:
            raise errors.RpcErrors(failures)

    def copy(self, source: list[etree._Element], target: str, session_id: int) -> None:
        with self.lock:
            self._check_writable(target, session_id)
            if target == "running":
                self._commit(source, session_id)
            elif target == "candidate":
                self._set_candidate(self._validated(source), session_id)
            elif target == "startup":
                self.startup = list(self._validated(source).elements)
                self._save_startup()
            else:
                self._store(target)

    def delete_startup(self, session_id: int) -> None:
        with self.lock:
            self._check_writable("startup", session_id)
            self.startup = []
            if self.startup_path is not None and self.startup_path.exists():
                self.startup_path.unlink()

    def discard_changes(self, session_id: int) -> None:
        with self.lock:
            self._check_writable("candidate", session_id)
            self._reset_candidate()

    # --- validation and commit ---------------------------------------------------

    def _set_candidate(self, cfg: Config, session_id: int | None) -> None:
        """candidate and its validation, kept together: a commit (or <validate>) of an
        unchanged candidate does not validate it again."""
        self.candidate, self._candidate_cfg = list(cfg.elements), cfg
        self.candidate_dirty_by = session_id

    def _reset_candidate(self) -> None:
        """candidate unmodified: running itself, the same list (nothing changes a stored
        list or its elements in place; every write replaces the list)."""
        self.candidate, self._candidate_cfg = self.running, self._running_cfg
        self.candidate_dirty_by = None

    def _validated(self, elements: Iterable[etree._Element] | Config) -> Config:
        """libyang's validation of a configuration; running's and candidate's are known,
        and a Config is one already validated."""
        if isinstance(elements, Config):
            return elements
        if elements is self.running:
            return self._running_cfg
        if elements is self.candidate:
            return self._candidate_cfg
        return self.models.check(elements)

    def _check_yang(self, elements: Iterable[etree._Element]) -> tuple[Config, list[Change]]:
        """What an edit of candidate is tested against: libyang's validation (the semantic
        and device checks come at commit)."""
        return self._validated(elements), []

    def check(self, elements: Iterable[etree._Element] | Config, *, with_devices: bool = True) -> tuple[Config, list[Change]]:
        """Full validation of a would-be running config; the changes it implies."""
        cfg = self._validated(elements)
        problems = validate.validate(cfg.json, self.facts)
        if problems:
            raise errors.RpcErrors(problems)
        changes = diff.changes(self._running_cfg.json, cfg.json)
        if not with_devices:
            return cfg, changes
        failures: list[errors.RpcError] = []
        for change in changes:
            driver = self._driver_for(change)
            if driver is None:
                continue
            try:
                driver.check(change)
            except DriverError as exc:
                failures.append(errors.from_driver(exc.reason, exc.message, _change_path(change)))
        if failures:
            raise errors.RpcErrors(failures)
        return cfg, changes

    def reapply(self) -> None:
        """Drive the devices to running (after they are opened at start-up). A device
        that refuses keeps its part unapplied and says so in its state; the node
        still comes up."""
        with self.lock:
            for change in diff.changes({}, self._running_cfg.json):
                driver = self._driver_for(change)
                if driver is None:
                    continue
                try:
                    driver.check(change)
                    driver.apply(change)
                except Exception as exc:  # noqa: BLE001
                    log.error("start-up config of %s %s not applied: %s", change.kind, change.key, exc)

    def _driver_for(self, change: Change) -> Driver | None:
        return next((d for d in self.drivers if d.handles(change)), None)

    def _commit(self, elements: Iterable[etree._Element] | Config, session_id: int, *,
                recoverable: Iterable[etree._Element] | None = None) -> None:
        """Validate, then check and apply change by change (deletions come first, so
        a device sees the resources they free); any failure undoes what was applied.
        Then the running file is written (`recoverable`: what a restart must come back
        with, when not the new running, i.e. during a confirmed commit); if it cannot
        be, the devices are undone too and the commit fails: running in memory, on the
        devices and on disk never disagree after a commit returns."""
        cfg, changes = self.check(elements, with_devices=False)
        done: list[tuple[Driver, Change]] = []

        def undo() -> None:
            for drv, ch in reversed(done):
                try:
                    drv.apply(ch.inverse())
                except Exception:  # noqa: BLE001
                    log.exception("rollback of %s %s failed", ch.kind, ch.key)

        for change in changes:
            driver = self._driver_for(change)
            if driver is None:
                continue
            try:
                driver.check(change)
                driver.apply(change)
                done.append((driver, change))
            except Exception as exc:  # noqa: BLE001 - any device failure rolls back
                log.warning("%s %s refused: %s", change.kind, change.key, exc)
                undo()
                if isinstance(exc, DriverError):
                    raise errors.from_driver(exc.reason, exc.message, _change_path(change)) from None
                raise errors.from_driver("operation-failed", "the device failed to apply the change", _change_path(change)) from None
        if self.confirmed is not None and recoverable is None:
            recoverable = self.confirmed.previous  # a confirmed commit pending: it is still what a restart keeps
        try:
            self._save_running(cfg.elements if recoverable is None else recoverable)
        except OSError as exc:
            log.error("cannot save running to %s: %s; the commit is undone", self.running_path, exc)
            undo()
            raise errors.OperationFailed(f"cannot save running: {exc.strerror or exc}") from None
        self.running, self._running_cfg = list(cfg.elements), cfg
        if self.candidate_dirty_by is None:
            self._reset_candidate()  # an unmodified candidate follows running (RFC 6241 8.3)
        if self.on_commit is not None and changes:
            try:
                self.on_commit(changes)
            except Exception:  # noqa: BLE001 - listeners never undo a commit
                log.exception("commit listener failed")

    def commit(self, session_id: int, *, confirmed: bool = False, timeout: int = 600, persist: str | None = None, persist_id: str | None = None) -> None:
        """candidate -> running; confirmed=True starts or extends a confirmed commit."""
        with self.lock:
            self._check_writable("running", session_id)
            pending = self.confirmed
            if pending is not None:
                if pending.persist is not None and persist_id != pending.persist:
                    if persist_id is None and pending.session_id != session_id:
                        raise errors.InUse("a persistent confirmed commit is pending; give its persist-id")
                    if persist_id is not None:
                        raise errors.InvalidValue("persist-id does not match the pending confirmed commit", info={"bad-element": "persist-id"})
                if pending.persist is None and pending.session_id != session_id:
                    raise errors.InUse("another session's confirmed commit is pending", info={"session-id": str(pending.session_id)})
            elif persist_id is not None:
                raise errors.InvalidValue("no confirmed commit is pending", info={"bad-element": "persist-id"})
            previous = pending.previous if pending else [copy.deepcopy(e) for e in self.running]
            # A confirmed commit (or its extension) leaves the pre-confirmed running as the
            # one a restart comes back with; a confirming commit makes the new one that.
            self._commit(self.candidate, session_id, recoverable=previous if confirmed else self.candidate)
            self._reset_candidate()
            if pending is not None:
                pending.timer.cancel()
                self.confirmed = None
            if confirmed:
                timer = threading.Timer(timeout, self._timeout)
                timer.daemon = True
                self.confirmed = _Confirmed(previous, session_id, persist, timer)
                timer.start()

    def cancel_commit(self, session_id: int, persist_id: str | None = None) -> None:
        with self.lock:
            c = self.confirmed
            if c is None:
                raise errors.OperationFailed("no confirmed commit is pending")
            if c.persist is not None and persist_id != c.persist:
                raise errors.InvalidValue("persist-id does not match", info={"bad-element": "persist-id"})
            if c.persist is None and c.session_id != session_id:
                raise errors.InUse("the confirmed commit belongs to another session", info={"session-id": str(c.session_id)})
            self._rollback("cancel-commit")

    def _timeout(self) -> None:
        with self.lock:
            if self.confirmed is not None:
                self._rollback("confirm-timeout expired")

    def _rollback(self, why: str) -> None:
        c = self.confirmed
        assert c is not None
        c.timer.cancel()
        self.confirmed = None
        log.warning("rolling back confirmed commit: %s", why)
        self._commit(c.previous, session_id=0)
        self._reset_candidate()

    # --- startup and running files ----------------------------------------------------

    def _read_file(self, path: Path) -> list[etree._Element]:
        root = etree.parse(str(path)).getroot()
        return [el for el in root if isinstance(el.tag, str)]

    def _load_running(self) -> Config | None:
        """The persisted running, validated as a commit would validate it (libyang, then the
        semantic checks: a file from another node's identity fails them); None if there is
        none. A file that cannot be read or is not valid is not used, and not silently: it is
        kept aside as <name>.corrupt-<time> for the operator, the error is logged, and the
        node starts from startup (the controller then sees what it lacks and pushes it)."""
        path = self.running_path
        if path is None or not path.exists():
            return None
        try:
            cfg, _ = self.check(self._read_file(path), with_devices=False)
            return cfg
        except (OSError, etree.XMLSyntaxError, errors.RpcError, errors.RpcErrors) as exc:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            detail = "; ".join(e.message for e in _listed(exc)) if isinstance(exc, (errors.RpcError, errors.RpcErrors)) else str(exc)
            try:
                os.replace(path, aside)
            except OSError as move_exc:
                log.error("persisted running %s is unusable (%s) and cannot be moved aside: %s", path, detail, move_exc)
            else:
                log.error("persisted running %s is unusable (%s): kept as %s; starting from startup", path, detail, aside)
            return None

    def _save_running(self, elements: Iterable[etree._Element]) -> None:
        if self.running_path is not None:
            _write_config(self.running_path, elements)

    def _save_startup(self) -> None:
        if self.startup_path is not None:
            _write_config(self.startup_path, self.startup)


def _write_config(path: Path, elements: Iterable[etree._Element]) -> None:
    """`elements` as a NETCONF <config> XML document at `path`, replacing it atomically: a
    reader (or a restart after kill -9 or a power cut) finds the old file or the new one,
    whole. The temporary file is created 0600 in the same directory (rename is atomic only
    within one file system), flushed to disk, renamed over the target, and the directory is
    flushed so that the rename itself survives a power cut."""
    # Each element serialized as it is (no copy into a new tree: running may be large and
    # this runs on every commit); each carries its own namespace declarations.
    data = b"".join([f'<?xml version="1.0" encoding="UTF-8"?>\n<config xmlns="{NC_NS}">\n'.encode(),
                     *(etree.tostring(el, encoding="UTF-8", xml_declaration=False, pretty_print=True) for el in elements),
                     b"</config>\n"])
    private_dir(path.parent)
    write_private(path, data, durable=True)


def _listed(exc: errors.RpcError | errors.RpcErrors) -> list[errors.RpcError]:
    return list(exc.errors) if isinstance(exc, errors.RpcErrors) else [exc]


def _ident(err: errors.RpcError) -> tuple[str, str | None, str]:
    return err.tag, err.path, err.message


def _unique(errs: list[errors.RpcError]) -> list[errors.RpcError]:
    """Each error once (an error met again after a retry is reported once)."""
    out: dict[tuple[str, str | None, str], errors.RpcError] = {}
    for e in errs:
        out.setdefault(_ident(e), e)
    return list(out.values())


def _within(path: str, top: str) -> bool:
    """`path` is `top` or a node below it (a list's path covers its entries)."""
    return path == top or path.startswith((top + "/", top + "["))


def _culprits(path: str | None, written: list[tuple[etree._Element, str]]) -> list[etree._Element]:
    """The operations an error at `path` is pinned on: the innermost one that wrote a node
    holding `path`, else every one that wrote below it; none when the error has no path."""
    if path is None:
        return []
    holding = [(el, top) for el, top in written if _within(path, top)]
    if holding:
        return [max(holding, key=lambda w: len(w[1]))[0]]
    return [el for el, top in written if _within(top, path)]


def _change_path(change: Change) -> str:
    if change.kind == "qkd-link":
        return f"/etsi-qkdn:qkd_node/etsi-qkdn:qkd_links/etsi-qkdn:qkd_link[etsi-qkdn:qkdl_id='{change.key}']"
    sw, _, port = change.key.partition("/")
    return f"/sdqkd-osw:optical-switches/sdqkd-osw:switch[sdqkd-osw:name='{sw}']/sdqkd-osw:cross-connect[sdqkd-osw:port-a='{port}']"
