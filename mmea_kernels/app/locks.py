"""Exclusive locks on the files a run writes (md's trajectory, log and state), held from before a
file is emptied to the end of the run: two runs given the same output both pass the "exists unless
--overwrite" check when they start together, and would then interleave their frames in one file.
With the lock the second run stops, before it writes anything, naming the file. ``fcntl.flock``
(advisory, released by the system when the process ends, a kill included); where there is no
``fcntl`` (Windows) files are opened without a lock."""
from __future__ import annotations

import os
import stat
from typing import Optional

__all__ = ["OutputInUseError", "open_output", "empty", "SiblingLock"]

_FLAGS = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class OutputInUseError(FileExistsError):
    """Another process holds the lock on an output file (it is writing it)."""


def _busy(option: str, path: str) -> OutputInUseError:
    return OutputInUseError(f"{option} {path}: another process is writing it (it holds the file's lock); wait for "
                            f"it to finish or give {option} another name")


def _lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting: False when another open file holds it (a file
    system without locks counts as taken: nothing to hold there)."""
    from ..train.lockfile import try_flock

    return try_flock(fd) is not False


def open_output(path: str, option: str, overwrite: bool) -> tuple:
    """``(fd, created)``: ``path`` opened for writing under an exclusive lock, and whether
    this call created it. The open neither empties nor replaces the file: the caller empties it
    (:func:`empty`) once it holds every lock it needs. :class:`OutputInUseError` when another
    process holds the lock; ``FileExistsError`` when the file appeared since the run checked its
    outputs (another run that has finished wrote it) and not ``overwrite``."""
    created = not overwrite
    try:
        fd = os.open(path, _FLAGS | (os.O_EXCL if created else 0), 0o666)
    except FileExistsError:
        created, fd = False, os.open(path, _FLAGS, 0o666)
    if not _lock(fd):
        os.close(fd)
        raise _busy(option, path)
    if not (created or overwrite):
        os.close(fd)
        raise FileExistsError(f"{option} {path} exists (written since this run checked its outputs); pass "
                              "--overwrite to replace it")
    return fd, created


def empty(fd: int) -> None:
    """Empty the file open as ``fd`` (a regular file; /dev/null and the like stay as they are)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)


class SiblingLock:
    """An exclusive lock for a file that is replaced rather than written in place (md's state file:
    a temporary file renamed over it, so a lock on the file would stay on the old one and the
    directory would stop unrelated runs writing beside it): ``.NAME.lock`` beside the file (beside the
    file a symlink names: :func:`~mmea_kernels.train.lockfile.hold`), removed by :meth:`release`.
    With the lock held, temporary files a killed run left (``.NAME.XXXXXXXX<temp_suffix>``, the names
    :func:`~mmea_kernels.train.atomic.atomic_path` gives) are removed: no other run can be writing them."""

    def __init__(self, path: str, option: str, temp_suffix: Optional[str] = None):
        import re

        from ..train import lockfile

        folder, name = os.path.split(os.path.realpath(path))
        self.path = os.path.join(folder, f".{name}.lock")
        try:
            self.fd = lockfile.hold(self.path)
        except lockfile.LockHeld:
            raise _busy(option, path) from None
        # mkstemp's names: ".NAME." + 8 random characters + suffix (not another file's, ".NAME.old...")
        own = re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}" + re.escape(temp_suffix or ""))
        for stale in (os.listdir(folder) if temp_suffix else []):
            if own.fullmatch(stale):
                try:
                    os.remove(os.path.join(folder, stale))
                except OSError:
                    pass

    def release(self) -> None:
        """Remove the lock file (while holding it) and let go."""
        from ..train import lockfile

        lockfile.release(self.fd, self.path)
        self.fd = None
