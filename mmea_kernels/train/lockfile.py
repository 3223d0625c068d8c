"""A lock file held for the length of a run: ``fcntl.flock`` (advisory, released by the system
however the process ends) on a file that names the holder and is removed by its holder when done.
A fine-tuning run holds one in its ``--out`` (:func:`~.loop.lock_run_dir`), an md run one beside its
state file (:class:`~mmea_kernels.app.locks.SiblingLock`)."""
from __future__ import annotations

import errno
import os
import pathlib
import socket
import stat
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks
    fcntl = None

__all__ = ["LockHeld", "DirectoryInUse", "LockIsLink", "try_flock", "hold", "release"]


class DirectoryInUse(RuntimeError):
    """Another process holds the lock of a run's output directory (:func:`~.loop.lock_run_dir`)."""


class LockHeld(BlockingIOError):
    """Another process holds the lock; ``holder``: " (process PID on HOST)" when the file says, else ""."""

    def __init__(self, path, holder: str):
        super().__init__(errno.EWOULDBLOCK, "held by another process", str(path))
        self.holder = holder


class LockIsLink(FileExistsError):
    """The lock file's name is a symbolic link, a hard link (a file with another name elsewhere) or
    another non-regular file: it is never written, since taking the lock writes into the file (a link
    planted in a run directory would have a file the user never named emptied and overwritten)."""


def try_flock(fd: int) -> Optional[bool]:
    """An exclusive ``flock`` on ``fd`` without waiting: True taken, False held by another open file,
    None where there are no locks (no ``fcntl``; a file system without them: ENOLCK, EOPNOTSUPP)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return True


def hold(path) -> Optional[int]:
    """The open descriptor of the lock file ``path`` (created if missing) under an exclusive lock taken
    without waiting, the file holding ``PID HOST``; :class:`LockHeld` when another process holds it;
    None where there is no ``fcntl`` or the file system has no locks (a file this call made is removed
    again); :class:`LockIsLink` when ``path`` is a symbolic link, not a regular file, or a hard link
    (a file with more than one name: opened with ``O_NOFOLLOW``, checked with ``fstat`` after opening,
    before the file is emptied or written). A holder that removes the file between our open and our
    lock leaves us a name that is another file (or none): the lock is taken anew on what the name is now."""
    if fcntl is None:
        return None
    path = pathlib.Path(path)
    for _ in range(20):
        existed = path.exists()
        flags = os.O_RDWR | os.O_CREAT
        flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(str(path), flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(str(path)):
                raise _not_a_lock(path, "a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _not_a_lock(path, "not a regular file")
        if st.st_nlink == 0:  # its holder removed it since our open: take the lock on what the name is now
            os.close(fd)
            continue
        if st.st_nlink != 1:  # another name of the same file: taking the lock would empty and write that file
            os.close(fd)
            raise _not_a_lock(path, f"a hard link to another file ({st.st_nlink} names)")
        taken = try_flock(fd)
        if not taken:
            holder = _holder(fd) if taken is False else ""
            os.close(fd)
            if taken is False:
                raise LockHeld(path, holder)
            if not existed:
                path.unlink(missing_ok=True)
            return None  # no locks on this file system (ENOLCK, EOPNOTSUPP, ...)
        try:
            now = os.fstat(fd)
            same = os.path.samestat(now, os.stat(str(path)))
        except FileNotFoundError:
            same = False
        if same and now.st_nlink != 1:  # linked elsewhere since the check above
            os.close(fd)
            raise _not_a_lock(path, f"a hard link to another file ({now.st_nlink} names)")
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)
    return None


def _not_a_lock(path, what: str) -> LockIsLink:
    target = f" (to {os.readlink(str(path))})" if os.path.islink(str(path)) else ""
    return LockIsLink(f"the lock file {path} is {what}{target}: a lock file is written when taken, so a link is "
                      "never followed or written through; remove it (this package only ever makes it a plain file "
                      "with one name) and run again")


def _holder(fd: int) -> str:
    try:
        pid, host = os.pread(fd, 200, 0).decode().split()[:2]
        return f" (process {int(pid)} on {host})"
    except (OSError, ValueError):
        return ""


def release(fd: Optional[int], path) -> None:
    """Remove the lock file ``path`` (while still holding it: a run that opens it meanwhile finds the
    name gone, :func:`hold`) and let go of ``fd``; nothing for ``fd`` None."""
    if fd is None:
        return
    try:
        os.remove(str(path))
    except OSError:
        pass
    os.close(fd)
