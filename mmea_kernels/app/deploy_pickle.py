"""The pickled export formats (``lammps-mliap``, ``mace-model``, ``sevenn-checkpoint``): pickled and
checked in memory, then written. A file is never unpickled by name: the directory may be writable by
others, who could swap the temporary file between its write and its check."""
from __future__ import annotations

import io
import pathlib
from typing import Callable, Tuple

import torch

from .deploy import _write_verified


def write_checked_pickle(out: pathlib.Path, obj, fmt: str, tol: float,
                         difference: Callable[[object], float]) -> Tuple[float, bytes]:
    """Pickle ``obj``, unpickle those bytes and take ``difference(loaded)`` (the largest relative
    difference from the checkpoint's model); above ``tol`` nothing is written, else the bytes go to
    ``out`` (:func:`~mmea_kernels.app.deploy._write_verified`). Returns the difference and the bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    raw = buffer.getvalue()

    def verify(_tmp):
        rel = difference(torch.load(io.BytesIO(raw), weights_only=False))  # the bytes this process made
        if not rel <= tol:
            raise ValueError(f"the exported {fmt} file does not reproduce the checkpoint's model on its reference "
                             f"frame (relative difference {rel:.3g} > {tol:g}); nothing was written")
        return rel

    return _write_verified(pathlib.Path(out), lambda tmp: pathlib.Path(tmp).write_bytes(raw), verify), raw
