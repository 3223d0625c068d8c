"""torch's default dtype is one setting for the whole process, and mace-torch reads it (graphs are
built in it; its model conversions set it). Code here that changes it does so under one lock and puts
it back before letting go: two threads each running a calculator on its own float64 model raced
without it (one thread's restore turned the other's half-built graph to float32: 'w_down has dtype
Double but x0 has Float'; and the default could stay float64 for the rest of the program). Code
outside this package that reads the default while such a block runs still sees the block's dtype."""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

__all__ = ["DEFAULT_DTYPE_LOCK", "default_dtype"]

DEFAULT_DTYPE_LOCK = threading.RLock()


@contextlib.contextmanager
def default_dtype(dtype: Optional[torch.dtype] = None):
    """Hold :data:`DEFAULT_DTYPE_LOCK`, with the default dtype ``dtype`` (None: left as it is) for the
    block; the default before it is put back at the end, whatever the block set."""
    with DEFAULT_DTYPE_LOCK:
        prev = torch.get_default_dtype()
        try:
            if dtype is not None:
                torch.set_default_dtype(dtype)
            yield
        finally:
            torch.set_default_dtype(prev)
