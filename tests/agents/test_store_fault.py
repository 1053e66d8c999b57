"""A key store that fails for real (issue 17): a real agent process whose state dir is a
small tmpfs that the test fills up. Meanwhile every key request that finds no room is 503
"key store unavailable" (no traceback, no key in the log, the outage logged once); once there is room
again requests succeed, and the checkpoint thread, which survived, truncates the WAL
again. Unit tests: the checkpoint thread through I/O errors, a group whose transaction
SQLite rolled back on its own."""
from __future__ import annotations

import base64
import errno
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdqkd.agents.kms.keystore import Deliverable, KeyStore
from kmeproc import KmeAgent, kme, start_kme_agent  # noqa: F401 - kme: the in-process KME fixture

UNAVAILABLE = {"message": "key store unavailable"}
TTL = 10  # s: kms.default_ttl of the agent whose disk fills (the outage loop must end well before)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own (a disk that can really fill up), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir(mode=0o700)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class Filler:
    """Takes every free block of a file system, and keeps taking what gets freed (SQLite
    truncating its WAL) until stopped: a disk that stays full."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "wb", buffering=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def fill(self) -> int:
        chunk = b"\0" * 65536
        while True:
            try:
                self._fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 512:
                    return os.fstat(self._fh.fileno()).st_size
                chunk = chunk[: len(chunk) // 2]

    def __enter__(self) -> "Filler":
        self.fill()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.fill()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._fh.close()
        self.path.unlink()


def wal_size(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def key_round(node: KmeAgent) -> tuple[int, int, list[str]]:
    """enc_keys (sae-a) then dec_keys (sae-b): their statuses, and the keys (base64) delivered."""
    with node.client("sae-a") as a, node.client("sae-b") as b:
        r = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 2})
        if r.status_code != 200:
            return r.status_code, 0, []
        keys = r.json()["keys"]
        d = b.post("/api/v1/keys/sae-a/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]})
        assert d.status_code == 200 and d.json()["keys"] == keys, d.text
        return 200, 200, [k["key"] for k in keys]


def test_disk_full_is_503_and_the_store_recovers(tmp_path: Path, small_fs: Path) -> None:
    state = small_fs / "state"
    node = start_kme_agent(tmp_path, "alice", state_dir=state, default_ttl=TTL)
    db = state / "keys.sqlite"
    seen: list[str] = []
    try:
        for _ in range(100):
            a, b, keys = key_round(node)
            assert a == b == 200
            seen += keys
        wal_before = wal_size(db)
        time.sleep(1.5)  # a sweep: the WAL truncated after the deliveries
        wal_idle = wal_size(db)
        # keys made for sae-b just before the disk fills: dec_keys of them fails too, and they
        # expire during the outage, so the flusher's sweep (a delete) meets the full disk
        with node.client("sae-a") as a:
            r = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 3})
            assert r.status_code == 200
            waiting = r.json()["keys"]
            seen += [k["key"] for k in waiting]
            made = time.monotonic()

        with Filler(small_fs / "filler") as filler:
            answers = []
            start = time.monotonic()
            pool = list(waiting)  # not delivered yet (one may be, from the blocks the WAL still had)
            with node.client("sae-a") as a, node.client("sae-b") as b:
                for i in range(30):
                    answers.append(a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1}))
                    answers.append(a.get("/api/v1/keys/sae-b/enc_keys"))
                    for form, key in (("POST", pool[0]), ("GET", pool[-1])) if pool else ():
                        r = (b.post("/api/v1/keys/sae-a/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"]}]})
                             if form == "POST" else b.get("/api/v1/keys/sae-a/dec_keys", params={"key_ID": key["key_ID"]}))
                        answers.append(r)
                        if r.status_code == 200 and key in pool:
                            pool.remove(key)
                    answers.append(a.post("/api/open_connect", json={"source": "sae-a", "destination": "sae-b"}))
                    time.sleep(0.05)
                took = time.monotonic() - start
                # A commit may still find room: blocks the WAL already had, or freed by the
                # store's own WAL truncation before the filler takes them back. Every other
                # answer is the 503, and nearly all of the last 50 meet the full disk.
                last = answers[-50:]
                wal_during = wal_size(db)
                for r in answers:
                    assert r.status_code == 200 or (r.status_code == 503 and r.json() == UNAVAILABLE), \
                        (r.request.method, r.request.url, r.status_code)
                refused = sum(r.status_code == 503 for r in last)
                # (an OPEN_CONNECT writes one small stream record: it fits a freed block more often)
                assert refused >= 40, f"only {refused} of the last 50 requests met the full disk"
                ok = sum(r.status_code == 200 for r in answers)
                assert took < TTL - 1, "too slow: the keys expired while the test still wanted them"
                # the keys expire: the flusher's sweep meets the full disk (before, that killed its
                # thread: no checkpoint ever after, the WAL growing without end)
                time.sleep(max(0.0, made + TTL + 2.5 - time.monotonic()))
                filled = filler.path.stat().st_size
        print(f"disk full: {len(answers)} requests in {took:.1f} s, {ok} still found room, "
              f"{refused} of the last {len(last)} 503; filler {filled / 2**20:.1f} MiB")

        t = time.monotonic()
        while True:  # room again: the next request works
            a, b, keys = key_round(node)
            if a == 200 or time.monotonic() - t > 5:
                break
            time.sleep(0.1)
        assert a == b == 200, "no key request succeeds after the disk has room again"
        recovered_in = time.monotonic() - t
        time.sleep(1.5)  # the next sweep: the expired keys go now
        with node.client("sae-b") as b:  # expired during the outage: gone once the sweep could delete them
            r = b.post("/api/v1/keys/sae-a/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in waiting]})
            assert r.status_code in (400, 404), r.text
        peak = 0
        for _ in range(300):  # traffic again: the checkpoint thread is alive and keeps the WAL small
            a, b, keys = key_round(node)
            assert a == b == 200
            seen += keys
            peak = max(peak, wal_size(db))
        t = time.monotonic()
        while wal_size(db) > 0 and time.monotonic() - t < 5:
            time.sleep(0.05)
        wal_after = wal_size(db)
        truncated_in = time.monotonic() - t
        print(f"WAL bytes: after 100 rounds {wal_before}, idle {wal_idle}, disk full {wal_during}, "
              f"peak in 300 rounds after {peak}, then {wal_after} ({truncated_in:.2f} s after the last request); "
              f"first request served {recovered_in:.2f} s after the room came back")
        assert wal_after == 0, "the WAL is not truncated after the outage: is the checkpoint thread dead?"
        assert peak < 4 * 2**20
    finally:
        node.proc.stop()
    log = node.proc.log()
    print("\n".join(line for line in log.splitlines() if "key store" in line))
    assert log.count("key store unavailable:") == 1, "the outage is logged once"
    assert log.count("key store available again") == 1
    assert "Traceback" not in log and "internal error" not in log
    for k in seen:
        raw = base64.b64decode(k)
        assert k not in log and raw.hex() not in log


# --- the flusher and group() without a process --------------------------------------------

class _Faulty(sqlite3.Connection):
    """A connection whose checkpoints fail with a disk I/O error while `broken` is set."""

    broken = threading.Event()
    calls = 0

    def execute(self, sql: str, *args):  # type: ignore[override]
        if "wal_checkpoint" in sql:
            type(self).calls += 1
            if self.broken.is_set():
                raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


def test_the_checkpoint_thread_survives_errors_and_logs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    real_connect = sqlite3.connect

    def connect(*args, **kw):  # the flusher's own connection (its checkpoints) is the faulty one
        if threading.current_thread().name == "keystore-flush":
            kw["factory"] = _Faulty
        return real_connect(*args, **kw)

    monkeypatch.setattr(sqlite3, "connect", connect)
    caplog.set_level(logging.WARNING, logger="sdqkd.agents.kms.keystore")
    db = tmp_path / "keys.sqlite"
    store = KeyStore(db, expire_every=0.2)
    try:
        _Faulty.broken.set()
        for i in range(200):
            store.put_deliverable([Deliverable(f"k{i}", "b", "a", os.urandom(32))])
        store.fetch_deliverable("b", "a", ["k0"])
        time.sleep(2.0)
        calls_broken = _Faulty.calls
        grown = wal_size(db)
        assert store._flusher.is_alive()
        _Faulty.broken.clear()
        t = time.monotonic()
        while wal_size(db) > 0 and time.monotonic() - t < 10:
            time.sleep(0.05)
        print(f"{calls_broken} checkpoint tries in 2 s of errors (backing off); WAL {grown} -> {wal_size(db)} "
              f"{time.monotonic() - t:.2f} s after they stopped")
        assert wal_size(db) == 0 and grown > 0
        assert 2 <= calls_broken <= 20  # kept trying, backing off (at 0.1 s, 20+ tries)
        t = time.monotonic()  # the end of the outage is told once none failed for a while
        while not any("checkpoint available again" in r.getMessage() for r in caplog.records) and time.monotonic() - t < 5:
            time.sleep(0.1)
    finally:
        store.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("checkpoint unavailable" in m for m in msgs) == 1, msgs
    assert sum("checkpoint available again" in m for m in msgs) == 1, msgs


def test_a_group_whose_transaction_sqlite_rolled_back_answers_nothing(tmp_path: Path) -> None:
    """SQLite may roll a whole transaction back after SQLITE_FULL or IOERR. In a group
    commit, the calls that went through before are undone too: none of them may answer
    (a key delivered but still in the store would be delivered twice)."""
    store = KeyStore(tmp_path / "keys.sqlite")
    try:
        store.put_deliverable([Deliverable("k1", "b", "a", b"1" * 32), Deliverable("k2", "b", "a", b"2" * 32)])
        with pytest.raises(sqlite3.OperationalError):
            with store.group():
                assert store.fetch_deliverable("b", "a", ["k1"]) == [b"1" * 32]
                store._db.execute("ROLLBACK")  # what SQLite does on its own after some errors
                store.fetch_deliverable("b", "a", ["k2"])
        assert store.waiting("b", "a") == 2 and not store.is_spent("k1")
        with store.group():  # the store works on
            assert store.fetch_deliverable("b", "a", ["k1", "k2"]) == [b"1" * 32, b"2" * 32]
    finally:
        store.close()


def test_a_store_locked_too_long_is_503_then_served_again(kme) -> None:  # noqa: F811 - the fixture
    """Another process holding the store's write lock past SQLite's busy timeout (5 s): 503
    "key store unavailable", not an internal error; served again once the lock goes."""
    other = sqlite3.connect(str(kme.lkms.store.path), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with kme.client("sae-a") as a:
            t = time.monotonic()
            r = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1})
            waited = time.monotonic() - t
            assert r.status_code == 503 and r.json() == UNAVAILABLE, r.text
            other.execute("ROLLBACK")
            r = a.post("/api/v1/keys/sae-b/enc_keys", json={"number": 1})
            assert r.status_code == 200, r.text
        print(f"503 after {waited:.1f} s of a locked store; served again once unlocked")
    finally:
        other.close()
