"""Output files of the commands that write them (md, relax, predict, export): checked before any
work starts (never a directory, an existing file only with ``overwrite``, never one of the command's
input files), and given the permissions a file created with open() gets."""
from __future__ import annotations

import os
from typing import Optional

from ..train.atomic import current_umask, umask_mode  # noqa: F401 - importable from here

__all__ = ["check_outputs", "checkpoint_inputs", "same_file", "input_path", "umask_mode"]


def input_path(spec: str) -> str:
    """The file of an input ``path[@selection]`` (the whole string when it names a file)."""
    from ..train.checks import split_spec

    return split_spec(spec)[0]


def same_file(a, b) -> bool:
    """Whether ``a`` and ``b`` name one file: :func:`os.path.samefile` when both exist (links, hard
    links), else their resolved absolute paths."""
    a, b = os.fspath(a), os.fspath(b)
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def checkpoint_inputs(checkpoint, model=None) -> dict:
    """The files a command that runs a checkpoint reads: the checkpoint and the base model, which is
    ``model`` or, when that is None, the file the checkpoint names and its model config (where the
    absolute paths are gone, the ones given at training that loading falls back to:
    :func:`~mmea_kernels.train.checkpoint.base_files`). An unreadable checkpoint adds nothing: loading
    it reports the problem."""
    inputs = {"--checkpoint": checkpoint, "--model": model}
    if model is None and checkpoint is not None:
        from ..train.checkpoint import base_files
        from ..train.safe_load import safe_load

        try:
            named = base_files(safe_load(checkpoint, "checkpoint"))
        except Exception:  # noqa: BLE001
            named = (None, None)
        for what, file in zip(("checkpoint's base model", "checkpoint's base model config"), named):
            if isinstance(file, str) and os.path.isfile(file):
                inputs[what] = file
    return inputs


def check_outputs(paths: dict, overwrite: bool, inputs: Optional[dict] = None, regular: bool = False) -> None:
    """For each ``{option: path}`` (None and "-" skipped): ``ValueError`` if it is the same file
    as one of ``inputs`` (``{option: path or path@selection}``, None skipped), with ``overwrite`` or
    without: an output never replaces an input; ``ValueError`` if two options name the same file;
    ``IsADirectoryError`` for a directory; with ``regular`` (an output written and read back, as
    export's), ``ValueError`` for an existing path that is not a regular file (a FIFO, a device such
    as /dev/stdout), before the next check, which ``--overwrite`` would not settle;
    ``FileExistsError`` if the file exists and not ``overwrite``, ``FileNotFoundError`` if its
    directory does not exist."""
    given = [(k, os.fspath(p)) for k, p in paths.items() if p is not None and p != "-"]
    read = [(k, input_path(os.fspath(p))) for k, p in (inputs or {}).items() if p is not None and p != "-"]
    for name, path in given:
        for src, file in read:
            if same_file(path, file):
                raise ValueError(f"{name} {path} is the {src} file: an output never replaces an input; "
                                 f"give {name} another name")
    for i, (name, path) in enumerate(given):
        twin = next((k for k, p in given[i + 1:] if same_file(path, p)), None)
        if twin is not None:
            raise ValueError(f"{name}, {twin}: two outputs are the same file ({path}); give each its own name")
    for name, path in given:
        if os.path.isdir(path):
            raise IsADirectoryError(f"{name} {path} is a directory; give a file name")
        if regular and os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f"{name} {path} exists and is not a regular file; this output is written to a file "
                             "and read back to be checked: give a file path")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{name} {path} exists; pass --overwrite to replace it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{name} {path}: the directory {parent} does not exist")
