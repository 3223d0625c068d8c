"""Output files of the commands that write them (md, relax, predict, export): checked before any
work starts, and given the permissions a file created with open() gets."""
from __future__ import annotations

import os

__all__ = ["check_outputs", "umask_mode"]


def check_outputs(paths: dict, overwrite: bool) -> None:
    """For each ``{option: path}`` (None and "-" skipped): ``IsADirectoryError`` for a directory,
    ``FileExistsError`` if the file exists and not ``overwrite``, ``FileNotFoundError`` if its directory does not exist; ``ValueError`` if two
    options name the same file."""
    given = [os.path.abspath(p) for p in paths.values() if p is not None and p != "-"]
    if len(set(given)) < len(given):
        raise ValueError(f"{', '.join(k for k, p in paths.items() if p is not None and p != '-')}: two outputs "
                         "are the same file; give each its own name")
    for name, path in paths.items():
        if path is None or path == "-":
            continue
        if os.path.isdir(path):
            raise IsADirectoryError(f"{name} {path} is a directory; give a file name")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{name} {path} exists; pass --overwrite to replace it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{name} {path}: the directory {parent} does not exist")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(path) -> None:
    """Give ``path`` the mode open() would (``tempfile.mkstemp`` creates files 0600)."""
    os.chmod(path, 0o666 & ~current_umask())
