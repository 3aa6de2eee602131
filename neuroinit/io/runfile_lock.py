"""Run-file writer lock: one writer per run file (run_file_lock, lock_holder) and stale temp-file cleanup."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from neuroinit._util import utc_now


# ------------------------------------------------------------------------------------------ one writer at a time
class RunFileLocked(ValueError):
    """Another process is writing this run file (one line: the file, the holder's pid and host)."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a run file: ``.NAME.lock`` beside it."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def _holder_text(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def run_file_lock(path: str | os.PathLike, *, wait: float = 1.0) -> Iterator[None]:
    """Hold the exclusive writer lock of run file ``path`` for the ``with`` block, or raise
    :class:`RunFileLocked` naming the process that holds it.

    The lock is ``flock`` on ``.NAME.lock`` (the file records ``pid host time`` for the message): the kernel
    releases it when the holder exits or is killed, so a lock left by a dead process is never stale. The file is
    removed on release; a process that locked a file already removed tries again on the new one. A holder that
    has not yet written its pid (it is just starting) is waited for up to ``wait`` seconds."""
    import fcntl
    import socket

    target = lock_path(path)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            if not holder and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise RunFileLocked(f"Run file {str(path)!r} is being written by another process "
                                f"({holder or 'unknown'}); wait for it to finish or choose another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            fd = -1  # a file system without locks (NFS mounted nolock): the file is written unguarded
            with contextlib.suppress(OSError):
                os.unlink(target)
            break
        try:
            same = os.fstat(fd).st_ino == os.stat(target).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a lock file its holder had just removed: lock the current one
    if fd < 0:
        yield
        return
    try:
        info = f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(target)
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the writer lock of run file ``path`` ("pid P on HOST since T"), or None when nobody does
    (a probe with a shared lock: it never creates the lock file)."""
    import fcntl

    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(fd) or "a process that is starting"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove the temporary files of atomic writes of run file ``path`` (``.NAME.XXXXXXXX.tmp``) that a killed
    writer left behind; call it while holding :func:`run_file_lock`. Returns how many were removed."""
    p = Path(path)
    pattern = re.compile(re.escape(f".{p.name}.") + r"[A-Za-z0-9_]{8}\.tmp")
    n = 0
    for q in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
        if pattern.fullmatch(q.name):
            with contextlib.suppress(FileNotFoundError):
                q.unlink()
                n += 1
    return n
