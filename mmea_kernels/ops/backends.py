"""Backend registry and selection for the gate primitives.

``backend=`` argument > ``MMEA_BACKEND`` environment variable > ``"auto"`` (triton on CUDA,
the compiled cpp extension on CPU when it is built, torch otherwise). A backend asked for by
name that cannot run is an error naming the reason; when ``auto`` has to fall back from the faster
backend of a device, it says why once (a warning) and then stays quiet.

A resolution is computed once per (name, device type, TRITON_INTERPRET) and cached: what is
installed does not change while the process runs. :func:`clear_backend_cache` forgets it (tests
that simulate a missing extension use it).
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

__all__ = ["BACKENDS", "resolve_backend", "backend_status", "clear_backend_cache", "cache_generation",
           "check_backend_name"]

# name -> module path; modules are imported lazily so that TRITON_INTERPRET can be set first.
BACKENDS: Dict[str, str] = {
    "torch": "mmea_kernels.ops.gate.reference",
    "triton": "mmea_kernels.ops.gate.triton",
    "cpp": "mmea_kernels.ops.gate.cpp",
}

_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _load(name: str):
    return importlib.import_module(BACKENDS[name])


def check_backend_name(backend) -> None:
    """``ValueError`` unless ``backend`` is None, "auto" or a backend name (checked when a module is built,
    not at its first call)."""
    if backend is not None and (not isinstance(backend, str) or backend.strip().lower() not in (*BACKENDS, "auto")):
        raise ValueError(f"unknown backend {backend!r}; expected None or one of {sorted([*BACKENDS, 'auto'])}")


def backend_status(name: str, device) -> Tuple[bool, str]:
    """(available, reason) of backend ``name`` for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(list(BACKENDS) + ['auto'])}")
    try:
        mod = _load(name)
    except Exception as exc:  # a broken optional backend must not break the package
        return False, f"importing the {name} backend failed: {exc}"
    return mod.available(torch.device(device))


_RESOLVED: Dict[tuple, object] = {}
_WARNED: set = set()


def clear_backend_cache() -> None:
    """Forget cached resolutions and fallback warnings (and, through :func:`cache_generation`,
    every decision cached from them)."""
    _RESOLVED.clear()
    _WARNED.clear()
    _GENERATION[0] += 1


_GENERATION = [0]


def cache_generation() -> int:
    """Changes whenever :func:`clear_backend_cache` runs: part of the key of any cache that holds a
    decision derived from a backend resolution."""
    return _GENERATION[0]


def resolve_backend(backend: Optional[str], device):
    """The backend module to use for tensors on ``device``."""
    name = backend if backend is not None else os.environ.get("MMEA_BACKEND", "auto")
    dtype_ = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (name, dtype_, os.environ.get("TRITON_INTERPRET"))
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    mod = _resolve(name.strip().lower(), torch.device(device), backend is not None)
    _RESOLVED[key] = mod
    return mod


def _resolve(name: str, device: torch.device, explicit: bool):
    if name == "auto":
        order = _AUTO_ORDER.get(device.type, ("torch",))
        for cand in order:
            ok, why = backend_status(cand, device)
            if ok:
                return _load(cand)
            if cand == order[0] and cand != "torch" and device.type not in _WARNED:
                _WARNED.add(device.type)
                warnings.warn(f"mmea_kernels: the {cand} backend is not available for {device.type} tensors "
                              f"({why}); using the slower torch backend", RuntimeWarning, stacklevel=3)
        return _load("torch")
    ok, reason = backend_status(name, device)
    if not ok:
        src = "backend=" if explicit else "MMEA_BACKEND="
        raise RuntimeError(f"{src}{name!r} is not available for {device.type} tensors: {reason}")
    return _load(name)
