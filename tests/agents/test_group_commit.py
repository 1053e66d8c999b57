"""Group commit of store-only key deliveries (https.GroupCommit over KeyStore.group), on a
real SQLite key store: a key is on disk before its caller hears of it, a failing call
undoes only its own writes, and a failed group leaves nothing behind."""
from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from sdqkd.agents.kms.https import GroupCommit
from sdqkd.agents.kms.keystore import Deliverable, KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig
from sdqkd.agents.kms.interface import KmsError

KME = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-test/group-commit"))
L1 = "10000000-0000-4000-8000-000000000001"


def on_disk(path: Path, key_id: str) -> bool:
    """Seen by another connection: committed, not just written inside a transaction."""
    db = sqlite3.connect(str(path))
    try:
        return db.execute("SELECT 1 FROM deliverable WHERE key_id = ?", (key_id,)).fetchone() is not None
    finally:
        db.close()


def test_calls_of_one_iteration_share_a_commit_and_fail_alone(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    lkms = Lkms(LkmsConfig(KME, "n", {"sa": KME, "sb": KME}), KeyStore(path))
    seen: list[bool] = []

    async def scenario() -> list[object]:
        group = GroupCommit(lkms.batch)
        futs = [
            group.submit(lkms.enc_keys, ("sa", "sb", 2, None, [])),
            group.submit(lkms.dec_keys, ("sb", "sa", [str(uuid.uuid4())])),  # unknown key: 400
            group.submit(lkms.enc_keys, ("sa", "sb", 1, None, [])),
        ]
        futs[0].add_done_callback(lambda f: seen.extend(on_disk(path, k.key_id) for k in f.result()))
        return await asyncio.gather(*futs, return_exceptions=True)

    first, missing, second = asyncio.run(scenario())
    assert seen == [True, True]  # on disk when the caller got them
    assert isinstance(missing, KmsError) and missing.http_status == 400
    got = lkms.dec_keys("sb", "sa", [k.key_id for k in [*first, *second]])
    assert [k.key for k in got] == [k.key for k in [*first, *second]]
    lkms.shutdown()


def test_a_failing_call_in_a_group_undoes_only_its_own_writes(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.sqlite")
    spent = str(uuid.uuid4())
    store.mark_spent([spent])
    ok, other = str(uuid.uuid4()), str(uuid.uuid4())
    with store.group():
        store.put_deliverable([Deliverable(ok, "sb", "sa", b"k" * 32)])
        with pytest.raises(ValueError):
            store.put_deliverable([Deliverable(other, "sb", "sa", b"x" * 32), Deliverable(spent, "sb", "sa", b"y" * 32)])
    store.close()
    store = KeyStore(tmp_path / "k.sqlite")
    assert store.fetch_deliverable("sb", "sa", [ok]) == [b"k" * 32]
    assert store.waiting("sb", "sa") == 0  # `other` went with its call
    store.close()


def test_a_group_that_fails_leaves_nothing_and_keeps_counts_true(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.sqlite")
    for n in range(4):
        store.sink(L1, str(uuid.uuid4()), bytes([n]) * 32)
    assert store.count(L1) == 4
    kid = str(uuid.uuid4())
    with pytest.raises(RuntimeError), store.group():
        store.put_deliverable([Deliverable(kid, "sb", "sa", b"k" * 32)])
        assert len(store.take(L1, 3)) == 3
        raise RuntimeError("the group fails before its commit")
    assert store.count(L1) == 4 and store.waiting("sb", "sa") == 0
    assert len(store.take(L1, 4)) == 4  # the keys taken in the failed group are still there
    store.close()


def test_link_keys_arriving_during_a_group_are_not_lost_with_it(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.sqlite")
    with pytest.raises(RuntimeError), store.group():
        store.sink(L1, str(uuid.uuid4()), b"q" * 32)
        store.count(L1)  # would flush the sink's buffer into the doomed transaction
        raise RuntimeError("undo")
    assert store.count(L1) == 1
    store.close()


def test_the_wal_is_checkpointed_off_the_request_path(tmp_path: Path) -> None:
    """Commits never checkpoint (no fsync on the event loop); the flusher thread does, soon after.
    Only a checkpoint copies pages from the WAL into the database file, so its size tells."""

    def fill(store: KeyStore) -> None:
        for _ in range(1500):  # well past the 1000 WAL pages SQLite would checkpoint at by default
            store.put_deliverable([Deliverable(str(uuid.uuid4()), "sb", "sa", b"k" * 32)])

    idle = KeyStore(tmp_path / "idle.sqlite", checkpoint_every=3600)
    before = (tmp_path / "idle.sqlite").stat().st_size
    fill(idle)
    assert (tmp_path / "idle.sqlite").stat().st_size == before  # all of it still in the WAL
    idle.close()

    store = KeyStore(tmp_path / "k.sqlite", checkpoint_every=0.05)
    before = (tmp_path / "k.sqlite").stat().st_size
    fill(store)
    deadline = time.monotonic() + 5
    while (tmp_path / "k.sqlite").stat().st_size == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "k.sqlite").stat().st_size > before
    store.close()


def test_durable_store_syncs_every_commit(tmp_path: Path) -> None:
    """synchronous=FULL when asked for power-loss durability, NORMAL otherwise."""
    for durable, level in ((True, "FULL"), (False, "NORMAL")):
        store = KeyStore(tmp_path / f"{durable}.sqlite", durable=durable)
        assert store.synchronous == level
        store.close()
