"""Keys no one else can read (issue 17 item 3): the key store's file, WAL and shm are
0600 in a 0700 directory, as is everything an agent writes into its state dir; a key
that left the store (delivered, taken for a relay) is gone from the raw bytes of the
database and its WAL within one expiry sweep."""
from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

from sdqkd.agents.kms.keystore import Deliverable, KeyStore
from agentproc import agent_config


def _raw(db: Path) -> bytes:
    """Every byte SQLite keeps on disk for `db`: the file, its WAL and shm."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def _until_gone(db: Path, secret: bytes, limit: float) -> float | None:
    """Seconds until `secret` is in none of `db`'s files (None: still there after `limit`)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if secret not in _raw(db):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def test_delivered_and_taken_keys_leave_no_bytes_on_disk(tmp_path: Path) -> None:
    """Many commits (one per key, as requests come) fill the WAL with page images that hold
    the keys; a delivered key's own row is overwritten (secure_delete), but the older frames
    stay in the WAL's tail after it starts over, until a TRUNCATE checkpoint (the sweep's,
    at most `expire_every` after the delivery). The bound: expire_every + 0.5 s."""
    db = tmp_path / "keys.sqlite"
    store = KeyStore(db)  # the defaults an agent runs with: sweep every 1 s
    try:
        ends = {f"end-{i}": secrets.token_bytes(32) for i in range(300)}
        for kid, key in ends.items():
            store.put_deliverable([Deliverable(kid, "sae-b", "sae-a", key)])
        links = {f"lk-{i}": secrets.token_bytes(32) for i in range(300)}
        for kid, key in links.items():
            store.sink("link-1", kid, key)
            store.flush()
        time.sleep(0.3)  # checkpointed: the keys are in the file, their history in the WAL
        raw = _raw(db)
        assert ends["end-7"] in raw and links["lk-0"] in raw  # the scan does find keys that are there

        [delivered] = store.fetch_deliverable("sae-b", "sae-a", ["end-7"])
        [(taken_id, taken)] = store.take("link-1", 1)
        assert delivered == ends["end-7"] and taken == links[taken_id]
        bound = store._expire_every + 0.5
        for secret in (delivered, taken):
            took = _until_gone(db, secret, bound)
            assert took is not None, f"a key that left the store is still on disk {bound} s later"
            print(f"key bytes gone from the store's files after {took:.2f} s")
        raw = _raw(db)
        assert ends["end-8"] in raw and links["lk-1"] in raw  # keys still held stay, of course
    finally:
        store.close()


def _loose(root: Path) -> list[str]:
    """Files under `root` that group or others can read, write or run, and directories they
    can enter or list."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = Path(dirpath) / name
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            if mode & 0o077 and not stat.S_ISLNK(os.lstat(p).st_mode):
                out.append(f"{p.relative_to(root.parent)} {oct(mode)}")
    return sorted(set(out))


def test_agent_state_dir_is_private(tmp_path: Path) -> None:
    """A real agent (key store, running config, host key, plant, log) leaves nothing in its
    state dir that another local user could read, even when started from a directory and
    config written 0755/0644 (an older lab: tightened at start); the key store's WAL and shm
    exist while it runs and are 0600 like the file."""
    old = os.umask(0o022)  # what a shell gives: files 0644, directories 0755
    try:
        a = agent_config(tmp_path, "alice", extra={"plant": {"inventory": {"name": "t"}, "state": str(tmp_path / "alice" / "plant.sqlite")}})
        assert stat.S_IMODE(a.config_path.stat().st_mode) & 0o044 and stat.S_IMODE(a.state_dir.stat().st_mode) & 0o055
        a.start()
    finally:
        os.umask(old)
    try:
        with a.connect() as m:
            m.get_config("running")
        deadline = time.monotonic() + 10
        while not (a.state_dir / "keys.sqlite-wal").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        names = {p.name for p in a.state_dir.iterdir()}
        assert {"keys.sqlite", "keys.sqlite-wal", "keys.sqlite-shm", "ssh_host_ed25519_key", "agent.json"} <= names
        assert _loose(a.state_dir) == []
    finally:
        a.stop()
    assert _loose(a.state_dir) == []


def test_the_store_overwrites_and_never_spills_keys(tmp_path: Path) -> None:
    """secure_delete: freed cells and pages are zeroed (no key in free pages); temp_store in
    memory: a savepoint's statement journal or a sort never writes page images, keys among
    them, into a temporary file."""
    store = KeyStore(tmp_path / "keys.sqlite")
    try:
        assert store._db.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert store._db.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    finally:
        store.close()


def test_shared_directories_are_never_made_private(tmp_path: Path) -> None:
    """A store or config put straight into a shared directory (sticky, like /tmp) must not
    take that directory away from its other users; a directory a file is put in is not
    tightened either, only created 0700 when missing."""
    from sdqkd import private

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    private.private_dir(shared)
    private.write_private(shared / "x.json", "{}")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE((shared / "x.json").stat().st_mode) == 0o600
    plain = tmp_path / "plain"
    plain.mkdir()
    os.chmod(plain, 0o755)
    private.private_sqlite(plain / "a.sqlite")
    assert stat.S_IMODE(plain.stat().st_mode) == 0o755
    private.private_sqlite(plain / "new" / "a.sqlite")
    assert stat.S_IMODE((plain / "new").stat().st_mode) == 0o700
    private.private_dir(plain)  # a state dir: tightened
    assert stat.S_IMODE(plain.stat().st_mode) == 0o700
