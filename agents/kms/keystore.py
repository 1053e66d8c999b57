"""The node's key store: link keys from the QKD modules, end keys waiting for their
slave SAE, spent key IDs, open ETSI 004 streams and per-application usage, in one
SQLite file so that a restart loses no key and never hands one out twice.

Every key leaves the store at most once: taking it deletes the row (with
secure_delete, the bytes are overwritten on disk) and records its ID as spent in
the same transaction, so a key that comes back (a re-sent block, a replayed
message) is refused.

How long a key that left stays on disk. secure_delete zeroes the row in the page image
the delete writes; the next checkpoint (every `checkpoint_every`) carries that image into
the file, and freed pages are zeroed too. The WAL's older frames still hold the key (every
commit that touched its page since it came in), and a WAL that starts over is overwritten
from its start only, so its tail kept delivered keys for as long as the load stayed light.
Now the first sweep after a key left (delivered, taken, committed, expired, dropped)
truncates the WAL: its bytes are in none of the store's files at most `expire_every` +
`flush_every` after the deletion committed (1.05 s with the defaults; measured 0.7 s
by tests/agents/test_key_privacy.py), unless a reader blocks the checkpoint, which is then
retried at the next sweep. Blocks the file system freed (a truncated WAL, a deleted file)
are not overwritten by SQLite: a raw device read or an SSD's spare area is out of reach
here. The store's file, WAL and shm are 0600 in a 0700 directory (sdqkd/private.py).

Durability. The front ends answer only after the transaction that stored (or spent)
the key has committed; several requests may share one commit (group()). In WAL mode
with synchronous=NORMAL (the default here) a commit is a write() into the WAL, in the
OS page cache: it survives the agent process crashing or being killed at any point,
so a crash can neither deliver a key twice nor lose the slave's copy of a key the
master already has. It does not survive the OS crashing or the power going before the
next WAL fsync (at the latest at the next checkpoint, every `checkpoint_every` s):
commits of that window would roll back, so a key could be lost or served again.
`durable=True` (synchronous=FULL) closes that window at the price of one fsync per
commit, i.e. per group of requests.

Reservations. A relay takes link keys before it knows whether the hop will go through:
it reserves them (reserve: moved to the `reserved` table with their order fields, so
no other consumer sees them), then either commits the reservation
(the keys are deleted and spent; a second commit finds nothing: at most once) or
releases it (the keys are back in link_keys exactly as they were, same order). A
reservation is in SQLite, so it outlives the process that made it; but whether its
keys left the node before a crash is not known (the message may be on the wire, the
peer may have consumed its copy), so a store opened on a file with reservations
commits them: a key is lost rather than risk being used twice or with a peer whose
copy is gone (see Lkms._hop for how both ends of a hop agree). The receiving end of a
hop needs no reservation: it reads the keys a message names (peek_ids), checks the
message, and consumes them in one transaction (take_ids), with nothing in between that
could fail halfway.

Link keys are bounded: like a QKD device's key buffer, a link holds at most
`link_key_limit` keys at this node (both halves); `room(link)` tells the QKD
modules, which then keep distilling (the link's SKR is still measured) but store
nothing until keys are used. Unbounded, one fast MadQCI link (2.8 Mb/s, 11,000
keys/s) filled 170 MB of disk in two minutes of an idle lab.

Faults. A disk that is full, an I/O error, a lock held past the busy timeout (5 s) fail
the call with SQLite's error; is_store_failure() tells them from a refusal or a bug, and
the front ends answer them 503 "key store unavailable". Nothing half-done stays: a failed
COMMIT is rolled back, a group whose transaction SQLite undid on its own answers none of
its calls, link keys not yet flushed are kept for the next try. The outage is logged once
(_Health), and its end once no call failed for 2 s. The flusher (flush, sweep, checkpoint)
outlives errors: it backs off to 5 s between tries, reconnects, and once checkpoints work
again truncates the WAL, which grows while they fail.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdqkd.private import private_sqlite

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS link_keys (
    key_id TEXT PRIMARY KEY,
    link   TEXT NOT NULL,
    mine   INTEGER NOT NULL,      -- 1: this end allocates it (the other end takes it by ID)
    key    BLOB NOT NULL,
    added  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS link_keys_pick ON link_keys(link, mine, added);
CREATE TABLE IF NOT EXISTS reserved (
    key_id TEXT PRIMARY KEY,
    link   TEXT NOT NULL,
    mine   INTEGER NOT NULL,
    key    BLOB NOT NULL,
    added  REAL NOT NULL,
    rsv    TEXT NOT NULL          -- the reservation holding it
);
CREATE INDEX IF NOT EXISTS reserved_rsv ON reserved(rsv);
CREATE TABLE IF NOT EXISTS deliverable (
    key_id  TEXT NOT NULL,
    slave   TEXT NOT NULL,
    master  TEXT NOT NULL,
    key     BLOB NOT NULL,
    expires REAL,
    stream  TEXT,
    idx     INTEGER,
    PRIMARY KEY (key_id, slave)
);
CREATE INDEX IF NOT EXISTS deliverable_stream ON deliverable(stream, idx);
CREATE TABLE IF NOT EXISTS spent (
    key_id TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    app        TEXT NOT NULL,
    window_end INTEGER NOT NULL,
    start      INTEGER NOT NULL,
    bits       INTEGER NOT NULL,
    PRIMARY KEY (app, window_end)
);
CREATE TABLE IF NOT EXISTS streams (
    ksid TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
"""


class MissingKeys(KeyError):
    """Some requested key IDs are not (or no longer) in the store."""

    def __init__(self, key_ids: list[str]) -> None:
        super().__init__(", ".join(key_ids))
        self.key_ids = key_ids


@dataclass(frozen=True)
class Reservation:
    """Link keys set aside for one message: commit or release it (KeyStore)."""

    rsv: str
    link: str
    keys: list[tuple[str, bytes]]  # (key ID, key), in the order asked for


@dataclass(frozen=True)
class Deliverable:
    key_id: str
    slave: str
    master: str
    key: bytes
    expires: float | None = None
    stream: str | None = None
    idx: int | None = None


class KeyStore:
    """Thread-safe; QKD drivers write from their threads, the front ends read from theirs."""

    def __init__(self, path: Path, *, flush_every: float = 0.05, checkpoint_every: float = 0.1, usage_window: int = 60,
                 durable: bool = False, link_key_limit: int = 100_000, expire_every: float = 1.0) -> None:
        self.path = Path(path)
        self.link_key_limit = link_key_limit
        private_sqlite(self.path)  # the file, its WAL and shm: 0600 in a 0700 directory
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        # Checkpoints (copying the WAL back into the file, with its fsyncs) run on the
        # flusher's own connection, never inside a request's commit (wal_autocheckpoint=0).
        sync = "FULL" if durable else "NORMAL"  # see the module's docstring
        # temp_store=MEMORY: a statement journal (a savepoint of group()) or a sort spills
        # page images, keys among them, into an unlinked temporary file otherwise.
        for pragma in ("journal_mode=WAL", f"synchronous={sync}", "secure_delete=ON", "foreign_keys=ON", "wal_autocheckpoint=0",
                       "temp_store=MEMORY",
                       # 1 MiB of page cache, not SQLite's 2 MiB default: the hot pages (the link-key
                       # index, the deliverable table) fit, the rest is the OS page cache's, and an
                       # idle agent stays within its memory budget (bench/labscale.py)
                       "cache_size=-1024",
                       "journal_size_limit=16777216"):  # the WAL file shrinks back to 16 MiB when it starts over
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._grouped = False  # in group(): calls are savepoints of one transaction
        self._pending: list[tuple[str, str, bytes, float]] = []
        self._mine: dict[str, Callable[[str], bool]] = {}
        # Link keys held per (link, mine): read on every relayed request, where COUNT(*)
        # over a well-stocked link would scan the whole index. Kept by every write below.
        self._counts: dict[tuple[str, int], int] = {}
        self.usage_window = usage_window
        self._flush_every = flush_every
        self._checkpoint_every = checkpoint_every
        self._expire_every = expire_every  # the sweep of end keys past their TTL (secure_delete overwrites them)
        # Keys left the store since the WAL was last truncated: their bytes may still be in
        # older WAL frames until the next sweep truncates it (_erase_history).
        self._erased = False
        self._closed = threading.Event()
        self._health = _Health("key store")  # commits failing (disk full, I/O error, locked)
        self._checkpoints = _Health("key store checkpoint")  # the WAL not copied back, so growing
        self._group_lost = False
        self._burn_reservations()
        self._flusher = threading.Thread(target=self._flush_loop, name="keystore-flush", daemon=True)
        self._flusher.start()

    @property
    def synchronous(self) -> str:
        """SQLite's sync level in force on this store: FULL (a commit survives power loss) or
        NORMAL (it survives a crash of the process: see the module's docstring)."""
        with self._lock:
            level = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[level]

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Several calls in one transaction (group commit), held by this thread.

        Each call inside is a savepoint, so one that fails undoes only its own writes;
        none of them is stored until the block ends, so nothing they return may leave
        this node before then. If the commit fails, all of them are undone.
        """
        with self._lock:
            if self._grouped:  # already in one: part of it
                yield
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._health.failed(exc)
                raise
            self._grouped = True
            self._group_lost = False
            changes = self._db.total_changes
            try:
                yield
                if self._group_lost:  # SQLite rolled the whole transaction back (disk full, I/O
                    # error): the calls that went through before are undone too, so none may answer
                    raise sqlite3.OperationalError("the key store's transaction was rolled back")
            except BaseException:
                self._grouped = False
                self._undo_group()
                raise
            self._grouped = False
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._health.failed(exc)
                self._undo_group()
                raise
            if self._db.total_changes != changes:  # a commit that wrote: the store works (again)
                self._health.ok()

    def _undo_group(self) -> None:
        self._counts.clear()  # adjusted by calls that are now undone
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:  # what failed the group may fail this too: SQLite undoes it on the next open
                self._health.failed(exc)

    # --- link keys ------------------------------------------------------------------

    def set_allocator(self, link: str, mine: Callable[[str], bool]) -> None:
        """Which link keys this end may allocate (the other end takes the rest by ID)."""
        with self._lock:
            self._mine[link] = mine

    def room(self, link: str) -> bool:
        """Whether `link` holds fewer than `link_key_limit` keys, counting those waiting
        for the next flush (a block's keys go in at once: the limit is soft by one block)."""
        with self._lock:
            pending = sum(1 for _, lk, _, _ in self._pending if lk == link)
            return self._count_locked(link, 0) + self._count_locked(link, 1) + pending < self.link_key_limit

    def sink(self, link: str, key_id: str, key: bytes) -> None:
        """Key sink for a QKD driver: buffered, written in batches."""
        with self._lock:
            self._pending.append((key_id, link, bytes(key), time.time()))
            if len(self._pending) >= 1024 and not self._health.down:
                try:
                    self._flush_locked()
                except sqlite3.Error:  # kept for the flusher to retry (room() still bounds them)
                    pass

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending or self._grouped:  # a group may roll back: link keys wait for the next flush
            return
        groups: dict[tuple[str, int], list[tuple[str, str, int, bytes, float]]] = {}
        for key_id, link, key, added in self._pending:
            mine = 1 if self._mine.get(link, _default_mine)(key_id) else 0
            groups.setdefault((link, mine), []).append((key_id, link, mine, key, added))
        pending, self._pending = self._pending, []
        added_rows = {}
        try:
            with _tx(self):
                for group, rows in groups.items():
                    added_rows[group] = self._db.executemany(
                        "INSERT OR IGNORE INTO link_keys(key_id, link, mine, key, added) "
                        "SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM spent WHERE key_id = ?1) "
                        "AND NOT EXISTS (SELECT 1 FROM reserved WHERE key_id = ?1)",
                        rows,
                    ).rowcount
        except sqlite3.Error:
            self._pending = pending + self._pending  # not stored: the next flush tries again
            raise
        for group, n in added_rows.items():
            self._adjust(group, n)

    def _adjust(self, group: tuple[str, int], delta: int) -> None:
        """After a commit: `delta` more (or fewer) keys in `group`, if its count is cached."""
        if group in self._counts:
            self._counts[group] += delta

    def _count_locked(self, link: str, mine: int) -> int:
        if (link, mine) not in self._counts:
            self._counts[(link, 0)] = self._counts[(link, 1)] = 0
            for m, n in self._db.execute("SELECT mine, COUNT(*) FROM link_keys WHERE link = ? GROUP BY mine", (link,)):
                self._counts[(link, int(m))] = int(n)
        return self._counts[(link, mine)]

    def _flush_loop(self) -> None:
        """Flush, sweep and checkpoint until close(). A failing store (disk full, I/O error,
        locked) does not stop it: the outage is logged once (_Health), the loop backs off
        (flush_every doubling up to 5 s) and keeps trying, and once the store works again
        the WAL is truncated at the next sweep (what piled up meanwhile goes)."""
        checkpointer: sqlite3.Connection | None = None
        next_checkpoint = time.monotonic() + self._checkpoint_every
        next_sweep = time.monotonic() + self._expire_every
        wait = self._flush_every
        while not self._closed.wait(wait):
            try:
                if checkpointer is None:
                    checkpointer = sqlite3.connect(str(self.path), isolation_level=None)
                    checkpointer.execute("PRAGMA cache_size=-128")  # it reads the WAL index, not the tables
                self.flush()
                if time.monotonic() >= next_sweep:
                    self.expire()
                    if self._erased:
                        self._erase_history(checkpointer)
                    next_sweep = time.monotonic() + self._expire_every
                if time.monotonic() >= next_checkpoint:
                    self._checkpoint(checkpointer)
                    next_checkpoint = time.monotonic() + self._checkpoint_every
                wait = self._flush_every
                self._health.settle()
                self._checkpoints.settle()
            except sqlite3.Error as exc:
                if self._closed.is_set():
                    break
                if is_store_failure(exc):
                    self._health.failed(exc)
                else:  # a bug, not the disk: said with its traceback, and the loop goes on
                    log.exception("key store flusher")
                if checkpointer is not None:  # a fresh connection after the error
                    checkpointer.close()
                    checkpointer = None
                wait = min(max(wait, self._flush_every) * 2, _MAX_BACKOFF)
        if checkpointer is not None:
            checkpointer.close()

    def _checkpoint(self, checkpointer: sqlite3.Connection) -> None:
        """Copy the WAL back into the database file, mostly while requests go on.

        A PASSIVE checkpoint neither waits for nor blocks a writer, but under steady
        load it never catches up with the last commit, and SQLite only starts the WAL
        over once all of it is copied: a second pass under the store's lock copies the
        few frames written meanwhile, so the WAL stays small.
        """
        try:
            checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            with self._lock:
                checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            self._checkpoints.failed(exc, wal=self._wal_size())
            raise
        if self._checkpoints.down:
            self._erased = True  # the WAL grew while checkpoints failed: truncate it at the next sweep
        self._checkpoints.ok()

    def _erase_history(self, checkpointer: sqlite3.Connection) -> None:
        """After keys left the store (delivered, taken, committed, expired, dropped), at the
        next sweep: copy the WAL into the file and truncate it.

        secure_delete overwrites a deleted row in the page image that the delete writes, and
        the checkpoint carries that image into the file; but the WAL's older frames (every
        commit that touched the page since the key came in) still hold the key's bytes, and
        a WAL that starts over after a PASSIVE checkpoint is overwritten from its start only:
        under light load its tail would keep delivered keys indefinitely (up to
        journal_size_limit). So a key's bytes stay on disk at most until the first sweep
        after it left: `expire_every` + `flush_every` (1.05 s with the defaults), unless a
        reader blocks the checkpoint, which is then retried at the next sweep."""
        with self._lock:
            try:
                busy = checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.Error as exc:
                self._checkpoints.failed(exc, wal=self._wal_size())
                raise  # _erased stays set: tried again at the next sweep
            self._erased = bool(busy)

    def _wal_size(self) -> int:
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except OSError:
            return 0

    @property
    def available(self) -> bool:
        """False from a failed commit (disk full, I/O error, locked too long) until one succeeds."""
        return not self._health.down

    def count(self, link: str, *, mine: bool = True) -> int:
        with self._lock:
            self._flush_locked()
            return self._count_locked(link, int(mine))

    def stock(self, link: str) -> tuple[int, int, int]:
        """(this end's keys, the peer's half, bits of one key; 0 while none) of a link, keys
        reserved for a relay in progress not counted. A link's keys are all of the size its
        QKD module delivers, so one row gives the size."""
        with self._lock:
            self._flush_locked()
            mine, theirs = self._count_locked(link, 1), self._count_locked(link, 0)
            row = self._db.execute("SELECT LENGTH(key) FROM link_keys WHERE link = ? LIMIT 1", (link,)).fetchone() \
                if mine + theirs else None
        return mine, theirs, 8 * int(row[0]) if row else 0

    def take(self, link: str, n: int) -> list[tuple[str, bytes]]:
        """n of this end's keys of `link`, oldest first, removed and marked spent; all or nothing."""
        with self._lock:
            self._flush_locked()
            with _tx(self):
                rows = self._db.execute(
                    "SELECT key_id, key FROM link_keys WHERE link = ? AND mine = 1 ORDER BY added, key_id LIMIT ?", (link, n)
                ).fetchall()
                if len(rows) < n:
                    return []
                self._spend([r[0] for r in rows])
            self._adjust((link, 1), -n)
            return [(r[0], bytes(r[1])) for r in rows]

    def take_ids(self, link: str, key_ids: list[str]) -> list[bytes]:
        """The keys with these IDs (the peer allocated them), removed and marked spent."""
        with self._lock:
            self._flush_locked()
            with _tx(self):
                # +link: look the keys up by ID; with many IDs SQLite would rather scan the link's index
                rows = self._db.execute(
                    f"SELECT key_id, key, mine FROM link_keys WHERE +link = ? AND key_id IN ({_marks(key_ids)})", (link, *key_ids)
                ).fetchall()
                found = {r[0]: r[1] for r in rows}
                missing = [k for k in key_ids if k not in found]
                if missing:
                    raise MissingKeys(missing)
                self._spend(key_ids)
            mine = sum(r[2] for r in rows)
            self._adjust((link, 1), -mine)
            self._adjust((link, 0), mine - len(rows))
            return [bytes(found[k]) for k in key_ids]

    def peer_ids(self, link: str, n: int) -> list[str]:
        """Up to n IDs of the link keys the peer allocates (held here too), oldest first."""
        with self._lock:
            self._flush_locked()
            rows = self._db.execute(
                "SELECT key_id FROM link_keys WHERE link = ? AND mine = 0 ORDER BY added, key_id LIMIT ?", (link, n)
            ).fetchall()
        return [r[0] for r in rows]

    def cede(self, link: str, key_ids: list[str], n: int, grace: float = 60.0) -> tuple[list[str], tuple[str, bytes] | None, list[str]]:
        """Give the peer up to n of these keys this end allocates, in one transaction: they
        stay here (the peer will name them) but this end never allocates them again. One
        more of them is taken (removed, spent) as the one-time MAC key of the answer; none
        is ceded unless there is one. Also says which of them are dead here: held as the
        peer's (so nobody will allocate them), or spent more than `grace` seconds ago (a
        message that used one is no longer on its way to the peer)."""
        with self._lock:
            self._flush_locked()
            with _tx(self):
                marks = _marks(key_ids)
                rows = self._db.execute(
                    f"SELECT key_id, key FROM link_keys WHERE +link = ? AND mine = 1 AND key_id IN ({marks}) "
                    f"ORDER BY added, key_id LIMIT ?", (link, *key_ids, n + 1)
                ).fetchall() if key_ids and n > 0 else []
                dead = {r[0] for r in self._db.execute(
                    f"SELECT key_id FROM spent WHERE key_id IN ({marks}) AND at < ?", (*key_ids, time.time() - grace))}
                dead |= {r[0] for r in self._db.execute(
                    f"SELECT key_id FROM link_keys WHERE +link = ? AND mine = 0 AND key_id IN ({marks})", (link, *key_ids))}
                mac = None
                if len(rows) >= 2:
                    self._spend([rows[0][0]])
                    mac, rows = (rows[0][0], bytes(rows[0][1])), rows[1:]
                    ids = [r[0] for r in rows]
                    self._db.execute(f"UPDATE link_keys SET mine = 0 WHERE key_id IN ({_marks(ids)})", ids)
                else:
                    ids = []
            self._adjust((link, 1), -len(ids) - (mac is not None))
            self._adjust((link, 0), len(ids))
            return ids, mac, sorted(dead)

    def adopt(self, link: str, key_ids: list[str]) -> int:
        """The peer ceded these: this end may allocate them from now on (those still held)."""
        if not key_ids:
            return 0
        with self._lock:
            with _tx(self):
                n = self._db.execute(
                    f"UPDATE link_keys SET mine = 1 WHERE +link = ? AND mine = 0 AND key_id IN ({_marks(key_ids)})", (link, *key_ids)
                ).rowcount
            self._adjust((link, 1), n)
            self._adjust((link, 0), -n)
            return n

    def drop_ids(self, link: str, key_ids: list[str]) -> int:
        """Forget these keys of the peer's half: the peer says nobody will ever use them."""
        with self._lock:
            self._flush_locked()
            with _tx(self):
                ids = [r[0] for r in self._db.execute(
                    f"SELECT key_id FROM link_keys WHERE +link = ? AND mine = 0 AND key_id IN ({_marks(key_ids)})", (link, *key_ids))]
                if ids:
                    self._spend(ids)
            self._adjust((link, 0), -len(ids))
            return len(ids)

    def reserve(self, link: str, n: int) -> Reservation | None:
        """n of this end's keys of `link`, oldest first, set aside (invisible to every other
        consumer) until commit() or release(); None (nothing set aside) if there are fewer."""
        with self._lock:
            self._flush_locked()
            rsv = uuid.uuid4().hex
            with _tx(self):
                rows = self._db.execute(
                    "SELECT key_id, key FROM link_keys WHERE link = ? AND mine = 1 ORDER BY added, key_id LIMIT ?", (link, n)
                ).fetchall()
                if len(rows) < n or n < 1:
                    return None
                self._move_to_reserved(rsv, [r[0] for r in rows])
            self._adjust((link, 1), -n)
            return Reservation(rsv, link, [(r[0], bytes(r[1])) for r in rows])

    def peek_ids(self, link: str, key_ids: list[str]) -> list[bytes]:
        """The keys of `link` with these IDs, left in place (MissingKeys names those not held):
        what a receiving end checks a message with before it consumes them (take_ids)."""
        with self._lock:
            self._flush_locked()
            rows = dict(self._db.execute(
                f"SELECT key_id, key FROM link_keys WHERE +link = ? AND key_id IN ({_marks(key_ids)})", (link, *key_ids)
            ).fetchall())
        missing = [k for k in key_ids if k not in rows]
        if missing:
            raise MissingKeys(missing)
        return [bytes(rows[k]) for k in key_ids]

    def _move_to_reserved(self, rsv: str, key_ids: list[str]) -> None:
        marks = _marks(key_ids)
        self._db.execute(f"INSERT INTO reserved(key_id, link, mine, key, added, rsv) SELECT key_id, link, mine, key, added, ? "
                         f"FROM link_keys WHERE key_id IN ({marks})", (rsv, *key_ids))
        self._db.execute(f"DELETE FROM link_keys WHERE key_id IN ({marks})", key_ids)

    def commit(self, reservation: Reservation) -> int:
        """The reserved keys are used: deleted (overwritten on disk) and spent. At most once:
        a second commit, or a commit after release, changes nothing and returns 0."""
        with self._lock:
            with _tx(self):
                ids = [r[0] for r in self._db.execute("SELECT key_id FROM reserved WHERE rsv = ?", (reservation.rsv,))]
                if ids:
                    self._erased = True
                    self._db.execute("DELETE FROM reserved WHERE rsv = ?", (reservation.rsv,))
                    now = time.time()
                    self._db.executemany("INSERT OR IGNORE INTO spent(key_id, at) VALUES (?, ?)", [(k, now) for k in ids])
            return len(ids)

    def release(self, reservation: Reservation) -> int:
        """The reserved keys were not used: back in the store as they were (same IDs, same
        order, same end allocating them), visible to every consumer again. At most once, and
        nothing after a commit."""
        with self._lock:
            with _tx(self):
                rows = self._db.execute("SELECT mine, COUNT(*) FROM reserved WHERE rsv = ? GROUP BY mine",
                                        (reservation.rsv,)).fetchall()
                self._db.execute("INSERT OR IGNORE INTO link_keys(key_id, link, mine, key, added) "
                                 "SELECT key_id, link, mine, key, added FROM reserved WHERE rsv = ?", (reservation.rsv,))
                self._db.execute("DELETE FROM reserved WHERE rsv = ?", (reservation.rsv,))
            for mine, n in rows:
                self._adjust((reservation.link, int(mine)), int(n))
            return sum(int(n) for _, n in rows)

    def is_reserved(self, key_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM reserved WHERE key_id = ?", (key_id,)).fetchone() is not None

    def _burn_reservations(self) -> None:
        """At open: reservations a previous process left are committed (module docstring)."""
        with self._lock, _tx(self):
            ids = [r[0] for r in self._db.execute("SELECT key_id FROM reserved")]
            if ids:
                self._erased = True
                now = time.time()
                self._db.executemany("INSERT OR IGNORE INTO spent(key_id, at) VALUES (?, ?)", [(k, now) for k in ids])
                self._db.execute("DELETE FROM reserved")
        if ids:
            log.warning("%d link keys reserved by a relay in flight when the node stopped are discarded", len(ids))

    def put_back(self, link: str, keys: list[tuple[str, bytes]]) -> None:
        """Return keys taken for a request that failed before anything left this node."""
        with self._lock:
            with _tx(self):
                self._db.executemany("DELETE FROM spent WHERE key_id = ?", [(k,) for k, _ in keys])
                n = self._db.executemany(
                    "INSERT OR IGNORE INTO link_keys(key_id, link, mine, key, added) VALUES (?, ?, 1, ?, 0)",
                    [(k, link, v) for k, v in keys],
                ).rowcount
            self._adjust((link, 1), n)

    def _spend(self, key_ids: list[str]) -> None:
        now = time.time()
        self._erased = True
        self._db.execute(f"DELETE FROM link_keys WHERE key_id IN ({_marks(key_ids)})", key_ids)
        self._db.executemany("INSERT OR IGNORE INTO spent(key_id, at) VALUES (?, ?)", [(k, now) for k in key_ids])

    def drop_link(self, link: str) -> int:
        """Forget a deleted link's keys (they can no longer be matched with the peer)."""
        with self._lock:
            self._flush_locked()
            with _tx(self):
                ids = [r[0] for r in self._db.execute("SELECT key_id FROM link_keys WHERE link = ?", (link,))]
                if ids:
                    self._spend(ids)
                held = [r[0] for r in self._db.execute("SELECT key_id FROM reserved WHERE link = ?", (link,))]
                if held:  # a relay in flight on the link: its commit or release then finds nothing
                    self._erased = True
                    self._db.execute("DELETE FROM reserved WHERE link = ?", (link,))
                    self._db.executemany("INSERT OR IGNORE INTO spent(key_id, at) VALUES (?, ?)", [(k, time.time()) for k in held])
            self._counts.pop((link, 0), None)
            self._counts.pop((link, 1), None)
            return len(ids)

    # --- end keys waiting for their slave ----------------------------------------------

    def put_deliverable(self, items: Iterable[Deliverable]) -> None:
        items = list(items)
        with self._lock, _tx(self):
            spent = self._spent_among([d.key_id for d in items])
            if spent:
                raise ValueError(f"key IDs already used: {', '.join(sorted(spent))}")
            self._db.executemany(
                "INSERT INTO deliverable(key_id, slave, master, key, expires, stream, idx) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(d.key_id, d.slave, d.master, d.key, d.expires, d.stream, d.idx) for d in items],
            )

    def fetch_deliverable(self, slave: str, master: str, key_ids: list[str]) -> list[bytes]:
        """All of them or none; each at most once."""
        now = time.time()
        with self._lock, _tx(self):
            rows = dict(
                self._db.execute(
                    f"SELECT key_id, key FROM deliverable WHERE slave = ? AND master = ? AND (expires IS NULL OR expires > ?) "
                    f"AND key_id IN ({_marks(key_ids)})",
                    (slave, master, now, *key_ids),
                ).fetchall()
            )
            missing = [k for k in key_ids if k not in rows]
            if missing or len(set(key_ids)) != len(key_ids):
                raise MissingKeys(missing or key_ids)
            self._db.execute(f"DELETE FROM deliverable WHERE slave = ? AND key_id IN ({_marks(key_ids)})", (slave, *key_ids))
            self._erased = True
            self._mark_spent_if_last(key_ids)
        return [bytes(rows[k]) for k in key_ids]

    def fetch_stream_key(self, slave: str, stream: str, idx: int, master: str | None = None) -> tuple[str, bytes] | None:
        """Chunk `idx` of an ETSI 004 stream for its destination, taken (delivered once);
        `master`: only if it came from the stream's source."""
        now = time.time()
        with self._lock, _tx(self):
            row = self._db.execute(
                "SELECT key_id, key FROM deliverable WHERE slave = ? AND stream = ? AND idx = ? AND (expires IS NULL OR expires > ?)"
                + ("" if master is None else " AND master = ?"),
                (slave, stream, idx, now) + (() if master is None else (master,)),
            ).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM deliverable WHERE slave = ? AND key_id = ?", (slave, row[0]))
            self._erased = True
            self._mark_spent_if_last([row[0]])
        return row[0], bytes(row[1])

    def _mark_spent_if_last(self, key_ids: list[str]) -> None:
        """A key for several slaves is spent once the last of them has it."""
        left = {r[0] for r in self._db.execute(f"SELECT key_id FROM deliverable WHERE key_id IN ({_marks(key_ids)})", key_ids)}
        now = time.time()
        self._db.executemany("INSERT OR IGNORE INTO spent(key_id, at) VALUES (?, ?)", [(k, now) for k in key_ids if k not in left])

    def mark_spent(self, key_ids: list[str]) -> None:
        now = time.time()
        with self._lock, _tx(self):
            self._db.executemany("INSERT OR IGNORE INTO spent(key_id, at) VALUES (?, ?)", [(k, now) for k in key_ids])

    def is_spent(self, key_id: str) -> bool:
        with self._lock:
            return bool(self._spent_among([key_id]))

    def _spent_among(self, key_ids: list[str]) -> set[str]:
        if not key_ids:
            return set()
        return {r[0] for r in self._db.execute(f"SELECT key_id FROM spent WHERE key_id IN ({_marks(key_ids)})", key_ids)}

    def waiting(self, slave: str, master: str) -> int:
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM deliverable WHERE slave = ? AND master = ? AND (expires IS NULL OR expires > ?)",
                    (slave, master, time.time()),
                ).fetchone()[0]
            )

    def expire(self, now: float | None = None) -> int:
        """Drop end keys whose TTL ran out; they count as spent."""
        now = time.time() if now is None else now
        with self._lock, _tx(self):
            ids = [r[0] for r in self._db.execute("SELECT key_id FROM deliverable WHERE expires IS NOT NULL AND expires <= ?", (now,))]
            if ids:
                self._erased = True
                self._db.execute("DELETE FROM deliverable WHERE expires IS NOT NULL AND expires <= ?", (now,))
                self._db.executemany("INSERT OR IGNORE INTO spent(key_id, at) VALUES (?, ?)", [(k, now) for k in ids])
            return len(ids)

    # --- usage statistics (ETSI 015 app_statistics) -----------------------------------

    def record_usage(self, app: str, bits: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        start = int(now // self.usage_window * self.usage_window)
        with self._lock, _tx(self):
            self._db.execute(
                "INSERT INTO usage(app, window_end, start, bits) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(app, window_end) DO UPDATE SET bits = bits + excluded.bits",
                (app, start + self.usage_window, start, bits),
            )

    def usage(self, app: str, last: int = 10) -> list[tuple[int, int, int]]:
        """(start, end, consumed bits) of the latest windows, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT start, window_end, bits FROM usage WHERE app = ? ORDER BY window_end DESC LIMIT ?", (app, last)
            ).fetchall()
        return [(int(a), int(b), int(c)) for a, b, c in reversed(rows)]

    # --- ETSI 004 streams -----------------------------------------------------------------

    def save_stream(self, ksid: str, data: dict[str, Any]) -> None:
        with self._lock, _tx(self):
            self._db.execute("INSERT OR REPLACE INTO streams(ksid, data) VALUES (?, ?)", (ksid, json.dumps(data)))

    def load_stream(self, ksid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM streams WHERE ksid = ?", (ksid,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_streams(self, prefix: str | None = None) -> list[dict[str, Any]]:
        """Every stream record, or those whose key starts with `prefix` (an index range scan)."""
        with self._lock:
            if prefix is None:
                rows = self._db.execute("SELECT data FROM streams").fetchall()
            else:
                rows = self._db.execute("SELECT data FROM streams WHERE ksid >= ? AND ksid < ?",
                                        (prefix, prefix + "\U0010ffff")).fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete_stream(self, ksid: str) -> None:
        with self._lock, _tx(self):
            self._db.execute("DELETE FROM streams WHERE ksid = ?", (ksid,))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._flusher.join(2)
        with self._lock:
            try:
                self._flush_locked()
            except sqlite3.Error as exc:  # the store failing at the end too: what it could not take is lost
                log.error("key store closed with %d link keys unstored: %s", len(self._pending), exc)
            self._db.close()


def _default_mine(key_id: str) -> bool:
    return True


def _marks(items: list[Any]) -> str:
    return ",".join("?" * len(items))


_MAX_BACKOFF = 5.0  # s between the flusher's tries while the store fails


def is_store_failure(exc: BaseException) -> bool:
    """Whether `exc` says the key store cannot work now (disk full, I/O error, locked too
    long, a corrupt file), as opposed to a request it refused (a constraint) or a bug."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError, sqlite3.NotSupportedError))


class _Health:
    """One line when `what` starts failing and one when it works again, however many
    calls fail in between (the error's SQLite name and message: never a key). A nearly full
    disk flaps (a commit that fits in the WAL's old blocks goes through, the next does not):
    the outage is over only once a call succeeded and none failed for SETTLE s."""

    SETTLE = 2.0

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None  # the outage being reported, from its first failure
        self.failures = 0
        self._last_failure = self._last_ok = self._back = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        """The last call failed."""
        return self.since is not None and self._last_failure >= self._last_ok

    def failed(self, exc: BaseException, **more: Any) -> None:
        if not is_store_failure(exc):
            return
        with self._lock:
            self.failures += 1
            self._last_failure = time.monotonic()
            if self.since is not None:
                return
            self.since = self._last_failure
        extra = "".join(f", {k} {v}" for k, v in more.items())
        log.error("%s unavailable: %s (%s%s); retrying", self.what, exc, getattr(exc, "sqlite_errorname", "?"), extra)

    def ok(self) -> None:
        if self.since is None:
            return
        now = time.monotonic()
        if self._last_ok <= self._last_failure:
            self._back = now  # the first success after a failure
        self._last_ok = now
        self.settle()

    def settle(self) -> None:
        """Report the end of the outage once it is over (the flusher asks regularly)."""
        if self.since is None or self._last_ok <= self._last_failure or time.monotonic() - self._last_failure < self.SETTLE:
            return
        with self._lock:
            since, failures, self.since, self.failures = self.since, self.failures, None, 0
        if since is not None:
            log.warning("%s available again after %.1f s (%d failed calls)", self.what, self._back - since, failures)


class _tx:
    """BEGIN IMMEDIATE ... COMMIT / ROLLBACK on an autocommit connection; inside group(), a savepoint.

    SQLite may roll a whole transaction back on its own after SQLITE_FULL, IOERR or BUSY:
    then there is nothing to roll back here, and inside group() the group is lost
    (every call of it fails, group())."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        store = self.store
        if store._grouped and (store._group_lost or not store._db.in_transaction):
            store._group_lost = True  # a SAVEPOINT now would start a transaction of its own
            raise sqlite3.OperationalError("the key store's transaction was rolled back")
        try:
            store._db.execute("SAVEPOINT call" if store._grouped else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            store._health.failed(exc)
            raise
        self._changes = store._db.total_changes
        return store._db

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        store, db = self.store, self.store._db
        try:
            if store._grouped:
                if not db.in_transaction:
                    store._group_lost = True
                    if exc_type is None:
                        raise sqlite3.OperationalError("the key store's transaction was rolled back")
                    return
                if exc_type:
                    db.execute("ROLLBACK TO call")
                db.execute("RELEASE call")
            elif exc_type:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            else:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error:
                    if db.in_transaction:  # a COMMIT that failed may leave it open: no later BEGIN would work
                        db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as err:
            store._health.failed(err)
            raise
        if exc is not None:
            store._health.failed(exc)
        elif not store._grouped and db.total_changes != self._changes:  # a read-only commit proves nothing
            store._health.ok()
