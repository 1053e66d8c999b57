"""Files only their owner can read: key stores and their WAL, configs with passwords or
service keys, private keys, running configs, logs. Everything a lab, an agent or the
controller writes is 0600 in 0700 directories.

Each file is *created* with its final mode (os.open/mkstemp/mkdir with a mode), never
chmod-ed after it has been written: between a create with the umask's default mode and a
later chmod, any local user could open it and keep reading through that descriptor.
SQLite gives a database's -wal and -shm the main file's mode, so a store opened through
private_sqlite() has all three 0600. Files and directories made by an older version
(0644/0755) are tightened when they are opened again.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
UMASK = 0o077  # for the daemons: what they (and the libraries they call) create is private too


def private_process(config_path: Path | str | None = None) -> None:
    """For a daemon: what it (and the libraries and helpers it runs) creates is for its
    owner only (key stores, logs, files charon writes): umask 077. Its config holds a
    password hash or a password and the service key: one written readable by others is
    tightened."""
    os.umask(UMASK)
    if config_path is not None:
        tighten(config_path)


def private_dir(path: Path | str, *, tighten_existing: bool = True) -> Path:
    """`path` as a directory only its owner can enter: the missing components are created
    0700 (mkdir with the mode: no window), and `path` itself, if it already existed with
    group/world access (a state dir of an older lab), is tightened unless
    `tighten_existing` is false (the directory a file happens to be put in). Existing
    parents are left as they are; so is a shared directory (sticky, like /tmp, or not
    ours), which is never made private."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process of the lab
            os.mkdir(d, DIR_MODE)
    if tighten_existing or missing:
        _tighten(path, DIR_MODE)
    return path


def _tighten(path: Path, mode: int) -> None:
    st = os.stat(path)
    if st.st_mode & stat.S_ISVTX or st.st_uid != os.geteuid():  # shared: /tmp, someone else's
        return
    if st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


def tighten(path: Path | str) -> None:
    """Drop group/world access from an existing file (e.g. a config with a password that
    someone wrote 0644); nothing if it does not exist or is not ours to change."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        _tighten(Path(path), FILE_MODE)


def private_file(path: Path | str) -> Path:
    """Make sure `path` exists and is 0600: created so if missing (O_CREAT with the mode),
    tightened if an older version left it readable."""
    path = Path(path)
    private_dir(path.parent, tighten_existing=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def private_sqlite(path: Path | str) -> Path:
    """Prepare an SQLite database path so that the file, its -wal and -shm are 0600 in a
    0700 directory: SQLite creates a missing database with 0644 (less the umask), but
    opens an existing one as it is and gives the -wal and -shm it creates the database
    file's mode; -wal/-shm left by a process that died (or by an older version) are
    tightened too."""
    path = private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        tighten(path.with_name(path.name + suffix))
    return path


def write_private(path: Path | str, data: bytes | str, *, durable: bool = False) -> Path:
    """Replace `path` atomically with `data`, the new file created 0600 (mkstemp) in the same
    0700 directory: a reader finds the old content or the new, and never a readable copy.
    durable: also flush the directory, so that the rename itself survives a power cut (what a
    datastore needs; configs written once before start do not)."""
    path = Path(path)
    private_dir(path.parent, tighten_existing=False)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def open_append(path: Path | str) -> int:
    """A descriptor appending to `path` (a log), the file created 0600 or tightened."""
    path = Path(path)
    private_dir(path.parent, tighten_existing=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, FILE_MODE)
    return fd


def tighten_tree(root: Path | str) -> int:
    """Drop group/world access from everything under `root` (and root): the directory of a
    lab made by a version that wrote 0644/0755, started again (`lab start`). Symbolic links
    are left alone (their mode means nothing, and their target may not be ours). Returns
    how many entries were changed."""
    root = Path(root)
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name, mode in [("", DIR_MODE), *((d, DIR_MODE) for d in dirnames), *((f, FILE_MODE) for f in filenames)]:
            p = Path(dirpath) / name
            with contextlib.suppress(FileNotFoundError, PermissionError):
                st = os.lstat(p)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(p, stat.S_IMODE(st.st_mode) & mode)
                    changed += 1
    return changed
