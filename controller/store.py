"""The services the controller has set up, in SQLite, so a restart keeps them:
key-relay applications (SAE pair, QoS, the paths that back it) and direct quantum
channels (transmitter, receiver, optical path, wavelength). Together they are the
desired state the controller reconciles the agents against.

Plus what the controller owns on each agent: every entry (qkd_app, qkd_link,
cross-connect) it is about to push is recorded here before the push. Reconciliation
removes only owned entries that are no longer desired (leftovers of a transaction that
failed half-way, of a controller that died before recording its service), and never
anything another manager (an ONOS, an operator) wrote: those ids were never recorded.
ETSI 015 has no leaf to mark an entry's manager, so the record lives here, not on the agent."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdqkd.private import private_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS applications (app_id TEXT PRIMARY KEY, data TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS channels (chan_id TEXT PRIMARY KEY, data TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS owned (node TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, since REAL NOT NULL,
                                  PRIMARY KEY (node, kind, key));
"""

Owned = tuple[str, str, str]  # (qkdn_id, kind: app | link | xc, key: app_id | qkdl_id | "switch/port-a")


@dataclass
class Application:
    app_id: str
    master_sae: str
    slave_sae: str
    src: str  # qkdn_id
    dst: str
    min_bps: float = 0.0
    max_bps: float = 0.0
    ttl: int = 0
    priority: int = 0
    paths: list[dict[str, Any]] = field(default_factory=list)  # {"vlink", "nodes", "links", "bps"}
    backing: list[str] = field(default_factory=list)  # qkdl_ids the app uses at its ends
    state: str = "ACTIVE"  # ACTIVE | DEGRADED (no path after a failure)
    created: float = field(default_factory=time.time)


@dataclass
class Channel:
    chan_id: str  # also the qkdl_id of the PHYS link it makes
    tx: tuple[str, int]
    rx: tuple[str, int]
    channel: int | None
    fibres: list[str]
    hops: list[list[Any]]  # [switch, port_in, port_out]
    loss_db: float
    switch_nodes: dict[str, str] = field(default_factory=dict)  # switch -> qkdn_id of its agent
    created: float = field(default_factory=time.time)


class ServiceStore:
    def __init__(self, path: Path) -> None:
        private_sqlite(path)  # the file, its WAL and shm: 0600 in a 0700 directory
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def put_app(self, app: Application) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO applications VALUES (?, ?, ?)", (app.app_id, json.dumps(asdict(app)), time.time()))

    def delete_app(self, app_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM applications WHERE app_id = ?", (app_id,))

    def apps(self) -> list[Application]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM applications ORDER BY app_id").fetchall()
        return [Application(**json.loads(r[0])) for r in rows]

    def app(self, app_id: str) -> Application | None:
        """One application by its primary key (create and delete ask for it on every call)."""
        with self._lock:
            row = self._db.execute("SELECT data FROM applications WHERE app_id = ?", (app_id,)).fetchone()
        return Application(**json.loads(row[0])) if row else None

    def put_channel(self, ch: Channel) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO channels VALUES (?, ?, ?)", (ch.chan_id, json.dumps(asdict(ch)), time.time()))

    def delete_channel(self, chan_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM channels WHERE chan_id = ?", (chan_id,))

    def channels(self) -> list[Channel]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM channels ORDER BY chan_id").fetchall()
        out = []
        for r in rows:
            d = json.loads(r[0])
            d["tx"], d["rx"] = tuple(d["tx"]), tuple(d["rx"])
            out.append(Channel(**d))
        return out

    def own(self, entries: list[Owned]) -> None:
        """Record entries as the controller's, before it pushes them (see the module docstring)."""
        if not entries:
            return
        now = time.time()
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO owned VALUES (?, ?, ?, ?)", [(*e, now) for e in entries])

    def disown(self, entries: list[Owned]) -> None:
        """Forget entries that are gone from their agent for good (deleted, or found absent
        and not desired)."""
        if not entries:
            return
        with self._lock:
            self._db.executemany("DELETE FROM owned WHERE node = ? AND kind = ? AND key = ?", entries)

    def owned(self, node: str) -> set[tuple[str, str]]:
        """(kind, key) of every entry the controller owns on one agent."""
        with self._lock:
            rows = self._db.execute("SELECT kind, key FROM owned WHERE node = ?", (node,)).fetchall()
        return {(k, v) for k, v in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
