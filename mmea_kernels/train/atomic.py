"""Files written whole or not at all (a temporary file beside the target, fsync, rename): a kill, an
interrupt or a full disk leaves the old file or the whole new one, never half of one; a failed write
is a :class:`WriteFailed` that names the file. Used for the run's files (state, checkpoint, metrics),
``evaluate --json``, ``relax --out``; :func:`atomic_path` for files a library writes by name (``predict``,
``export``, md's state file, the rMD17 files)."""
from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import stat
import tempfile
from typing import Optional

__all__ = ["WriteFailed", "DISK_ERRNOS", "write_failed", "atomic_write", "atomic_write_text", "atomic_path",
           "is_stream", "umask_mode", "current_umask"]


class WriteFailed(OSError):
    """A file could not be written (the disk full, a quota, an I/O error); its temporary file is removed
    and a file already under that name is left as it was. ``errno`` is the underlying error's."""


DISK_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e is not None)


def write_failed(path, exc: OSError) -> WriteFailed:
    """A :class:`WriteFailed` naming ``path``, with the cause and what it may mean."""
    why = exc.strerror or str(exc)
    hint = "the disk, or your quota, is full" if exc.errno in DISK_ERRNOS else "the disk may be full or failing"
    err = WriteFailed(f"could not write {path}: {why} ({hint}); the partial file was removed, "
                      f"{pathlib.Path(path).name} is as it was")
    err.errno = exc.errno
    return err


class _Sink:
    """The file torch.save writes to: keeps the first OSError of a write (torch reports it as a
    RuntimeError 'unexpected pos ...'); ``str()`` is the file's name."""

    def __init__(self, fh, name: str):
        self.fh, self.name, self.error = fh, name, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        self.fh.flush()

    def __str__(self):
        return self.name


def _os_cause(exc: BaseException, sink: Optional[_Sink]):
    """The OSError behind a failed write: ``exc`` itself, the one the sink saw, or one in its chain."""
    if isinstance(exc, OSError) or (sink is not None and sink.error is not None):
        return exc if isinstance(exc, OSError) else sink.error
    for _ in range(10):
        exc = exc.__cause__ or exc.__context__
        if exc is None or isinstance(exc, OSError):
            return exc
    return None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(path) -> None:
    """Give ``path`` the mode open() would (``tempfile.mkstemp`` creates files 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write(path, write) -> None:
    """``write(sink)`` into a new temporary file beside ``path`` (a name unique to this call), fsync,
    then rename it to ``path``: ``path`` is either the old file or the whole new one. On any failure
    (an interrupt too) the temporary file is removed; a failed write raises :class:`WriteFailed`.
    A symlink is written through (the file it names is replaced; the link stays), an existing file
    keeps its mode, and a stream (:func:`is_stream`: a FIFO, a device, ``--json /dev/stdout``) is
    written into directly, appended to (:func:`atomic_path`)."""
    real = pathlib.Path(os.path.realpath(path))
    sink = None
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "ab" if is_stream(path) else "wb") as fh:
                sink = _Sink(fh, tmp)
                write(sink)
    except WriteFailed:
        raise
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        cause = _os_cause(exc, sink)
        if cause is None or isinstance(cause, (FileNotFoundError, PermissionError)):
            raise
        raise write_failed(real, cause) from exc


def atomic_write_text(path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda sink: sink.write(data))


_FD_ALIAS = re.compile(r"/dev/(stdin|stdout|stderr|fd/\d+)|/proc/(self|thread-self|\d+)/fd/\d+")


def is_stream(path) -> bool:
    """Whether ``path`` is written into as it is, never replaced: a FIFO, a device or another file that
    is not a regular one, and a name for an open file descriptor (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``: whatever the shell connected; a file renamed over there would replace the
    user's file, and a pipe has no directory). A regular file elsewhere under /dev (``/dev/shm``) is
    a file like any other."""
    if _FD_ALIAS.fullmatch(os.path.abspath(path)):
        return True
    real = os.path.realpath(path)
    return os.path.exists(real) and not os.path.isfile(real)


def _fsync_dir(directory) -> None:
    """The rename itself durable (best effort: not every file system opens directories)."""
    try:
        dfd = os.open(str(directory), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temporary file name beside ``path`` for code that writes files by name (ASE, numpy,
    ``torch.jit.save``); when the block ends without an error the file is fsynced and takes the name
    ``path``, as in :func:`atomic_write`: a symlink is written through (the file it names is replaced,
    the link stays), an existing file keeps its mode, a new one gets the umask's; on any error or
    interrupt the temporary file is removed and ``path`` is as it was, and a full disk is a
    :class:`WriteFailed` naming ``path``. A stream (:func:`is_stream`) is yielded as given, to be
    written directly (opened to append: ``/dev/stdout`` may be a file the shell appends to).
    ``suffix`` ends the temporary name (``.npz``: numpy adds none)."""
    if is_stream(path):
        yield str(path)
        return
    real = pathlib.Path(os.path.realpath(path))
    if not real.parent.is_dir():
        link = f" (where the symlink {path} points)" if os.path.islink(path) else ""
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: the directory {real.parent} does not exist{link}")
    mode = stat.S_IMODE(real.stat().st_mode) if real.exists() else None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=suffix, dir=str(real.parent))
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise write_failed(path, exc) from exc
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode is None:
            umask_mode(tmp)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, real)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS and not isinstance(exc, WriteFailed):
            raise write_failed(path, exc) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(real.parent)
