"""Backend registry and selection for the gate primitives.

``backend=`` argument > ``MMEA_BACKEND`` environment variable > ``"auto"`` (triton on CUDA,
the compiled cpp extension on CPU when it is built, torch otherwise). A backend asked for by
name that cannot run is an error naming the reason; ``auto`` falls back silently.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional, Tuple

import torch

__all__ = ["BACKENDS", "resolve_backend", "backend_status"]

# name -> module path; modules are imported lazily so that TRITON_INTERPRET can be set first.
BACKENDS: Dict[str, str] = {
    "torch": "mmea_kernels.ops.torch_backend",
    "triton": "mmea_kernels.ops.triton_backend",
    "cpp": "mmea_kernels.ops.cpp_backend",
}

_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _load(name: str):
    return importlib.import_module(BACKENDS[name])


def backend_status(name: str, device) -> Tuple[bool, str]:
    """(available, reason) of backend ``name`` for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(list(BACKENDS) + ['auto'])}")
    try:
        mod = _load(name)
    except Exception as exc:  # a broken optional backend must not break the package
        return False, f"importing the {name} backend failed: {exc}"
    return mod.available(torch.device(device))


def resolve_backend(backend: Optional[str], device):
    """The backend module to use for tensors on ``device``."""
    name = backend if backend is not None else os.environ.get("MMEA_BACKEND", "auto")
    name = name.strip().lower()
    device = torch.device(device)
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            ok, _ = backend_status(cand, device)
            if ok:
                return _load(cand)
        return _load("torch")
    ok, reason = backend_status(name, device)
    if not ok:
        src = "backend=" if backend is not None else "MMEA_BACKEND="
        raise RuntimeError(f"{src}{name!r} is not available for {device.type} tensors: {reason}")
    return _load(name)
