"""What the package's loaders share about files they are handed: :class:`UnsafeFileError`, raised
wherever reading a file would mean full unpickling the user has not vouched for (this package's
``train.safe_load`` and the SevenNet loader), and :func:`file_sha256`."""
from __future__ import annotations

import hashlib

__all__ = ["UnsafeFileError", "file_sha256"]


class UnsafeFileError(ValueError):
    """A file that only full unpickling (which can run code from it) would read."""


def file_sha256(path, digits: int = 16) -> str:
    """The SHA-256 of a file's bytes (hex, its first ``digits`` characters: 16 where a run compares
    files, 64 in a run's record), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:digits]
