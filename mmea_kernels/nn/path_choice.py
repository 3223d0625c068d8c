"""``MMEA_FUSED_LINEAR=auto``: each :class:`~mmea_kernels.nn.MMEALinear` times its two eager paths
on the call's own input, once per row-count bucket, and keeps the faster one.

The two paths compute the same function (tested against each other and against float64):

- **fused**: one kernel, the base linear with the gate and the additive terms in its epilogue
  (Triton on CUDA, the C++ extension on CPU);
- **unfused**: the base layer as it is (e3nn's ``o3.Linear`` on cuBLAS / MKL, or ``cuet.Linear``),
  then the gate kernels.

Which is faster depends on the card, the layer's shape, the row count and the dtype: on the H200 of
2026-11-28 the adapted layer on the fused kernel took 38-52 % less wall time than the bare
``o3.Linear`` at 2000 rows in fp32 (one launch instead of e3nn's several) and about twice as long
at 32000 (its grouped GEMM against cuBLAS). A choice is made the first time a layer sees a row
count in ``[2^(b-1), 2^b)`` with a given gradient need (forward only, or forward plus the input
gradient), by alternating the two paths ``rounds`` times on a detached copy of the input (the
call's own graph, the global RNG and every ``.grad`` are untouched), and reused for later calls of
that bucket. Ties go to the fused path; a fused kernel that fails (a compile or launch error on an
untested card) is reported in a warning that names the error, and the layer runs the unfused path
for that bucket. The timing runs carry their own saved-tensor hooks, so activation checkpointing
around the layer (which counts the tensors a forward saves) never sees them. Timing is skipped
(the fused path runs, undecided) during CUDA-graph capture, while a ``TorchDispatchMode`` is active
(a tracer such as make_fx, or FlopCounterMode, would take the timing runs for part of the call),
and under torch.compile (which always compiles the fused op).
:func:`auto_choices` lists what each layer chose and the times it measured.
"""
from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import nn

from ..ops._utils import rows2d

_ON, _OFF = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def fused_linear_mode() -> str:
    """``MMEA_FUSED_LINEAR``: ``1``/``true``/``yes``/``on`` or unset -> "fused" (the default: every
    :class:`MMEALinear` the fused kernels cover runs them); ``0``/``false``/``no``/``off`` ->
    "unfused" (the base layer, then the gate kernels); ``auto`` -> "auto" (each layer times both
    paths once per row-count bucket and keeps the faster, :mod:`mmea_kernels.nn.path_choice`). Any
    other value is an error that names the variable."""
    v = os.environ.get("MMEA_FUSED_LINEAR", "1").strip().lower()
    if v in _ON:
        return "fused"
    if v in _OFF:
        return "unfused"
    if v == "auto":
        return "auto"
    raise ValueError(f"MMEA_FUSED_LINEAR={v!r}; expected one of 1/true/yes/on (fused, the default), "
                     f"0/false/no/off (unfused) or auto (each layer times both and keeps the faster)")


# the environment variables an eager plan depends on (read on every call, so that a change takes
# effect at the next call): straight from os.environ's own mapping where it has one (POSIX CPython),
# which costs a dict lookup instead of three Python calls in os.py per variable
_PLAN_VARS = ("MMEA_FUSED_LINEAR", "MMEA_BACKEND", "TRITON_INTERPRET")
_ENV = os.environ
_ENV_DATA = getattr(_ENV, "_data", None)
_ENV_KEYS = tuple(_ENV.encodekey(k) for k in _PLAN_VARS) \
    if type(_ENV_DATA) is dict and callable(getattr(_ENV, "encodekey", None)) else None


def _plan_env() -> tuple:
    """The values (or None) of ``_PLAN_VARS``, as raw as the platform keeps them (a cache key)."""
    if _ENV_KEYS is not None and os.environ is _ENV:
        get = _ENV_DATA.get
        return get(_ENV_KEYS[0]), get(_ENV_KEYS[1]), get(_ENV_KEYS[2])
    env = os.environ
    return env.get(_PLAN_VARS[0]), env.get(_PLAN_VARS[1]), env.get(_PLAN_VARS[2])


def fused_linear_enabled() -> bool:
    """False only for ``MMEA_FUSED_LINEAR=0`` (see :func:`fused_linear_mode`); "auto" compiles the
    fused op under torch.compile."""
    return fused_linear_mode() != "unfused"

__all__ = ["PathChoice", "row_bucket", "time_paths", "timed_choice", "may_time", "auto_choices", "fused_linear_mode",
           "fused_linear_enabled"]


@dataclass(frozen=True)
class PathChoice:
    """One layer's choice for one bucket: ``fused`` (True: the fused kernel), the medians of the
    per-call times it measured (seconds), the row count it measured at, and whether the timed
    calls included the input gradient."""

    fused: bool
    t_fused: float
    t_unfused: float
    rows: int
    grad: bool
    error: str = ""  # why the fused path could not run (then t_fused is inf and the choice unfused)


def row_bucket(rows: int) -> int:
    """``b`` with ``2^(b-1) <= rows < 2^b`` (0 for no rows): the calls that share a choice."""
    return max(int(rows), 0).bit_length()


def time_paths(run_fused: Callable[[], None], run_unfused: Callable[[], None], device: torch.device,
               rounds: int = 7, reps: int = 2) -> Tuple[float, float]:
    """Median seconds per call of ``run_fused`` and ``run_unfused``, in alternating rounds (the
    order swapped every round) after one warm-up call each; on CUDA the device is synchronised
    around each timed block, so the times are wall times of launch plus kernels."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    run_fused()
    run_unfused()
    times = {run_fused: [], run_unfused: []}
    for i in range(rounds):
        for run in ((run_fused, run_unfused) if i % 2 == 0 else (run_unfused, run_fused)):
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            sync()
            times[run].append((time.perf_counter() - t0) / reps)
    return statistics.median(times[run_fused]), statistics.median(times[run_unfused])


def auto_choices(model: nn.Module) -> List[dict]:
    """Every choice made so far by the ``MMEALinear`` layers of ``model`` under
    ``MMEA_FUSED_LINEAR=auto``: one dict per (layer, bucket) with the layer's name, the row count
    timed, ``grad``, ``path`` ("fused" or "unfused"), both times in µs (``fused_us`` None and
    ``error`` set where the fused kernel failed)."""
    rows = []
    for name, module in model.named_modules():
        for (bucket, grad), c in sorted(module.__dict__.get("_auto_choices", {}).items()):
            rows.append({"layer": name, "rows": c.rows, "bucket": bucket, "grad": c.grad,
                         "path": "fused" if c.fused else "unfused",
                         "fused_us": None if c.error else round(c.t_fused * 1e6, 1),
                         "unfused_us": round(c.t_unfused * 1e6, 1), **({"error": c.error} if c.error else {})})
    return rows


def same(t):
    """The identity saved-tensor hook: the timing runs carry their own (see the module docstring)."""
    return t


def may_time(x: torch.Tensor) -> bool:
    """Whether ``MMEA_FUSED_LINEAR=auto`` may time its two paths on ``x``: a plain eager tensor,
    no ``TorchDispatchMode`` active (a tracer such as make_fx, or FlopCounterMode, would record the
    timing runs as part of the call) and no CUDA-graph capture (no synchronising there)."""
    if type(x) is not torch.Tensor or torch._is_functional_tensor(x) \
            or torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._len_torch_dispatch_stack():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


class _FusedFailed(RuntimeError):
    """The fused path raised while ``MMEA_FUSED_LINEAR=auto`` timed it."""


def timed_choice(layer: nn.Module, x: torch.Tensor, plan, rows: int, grad: bool) -> PathChoice:
    """Times ``layer``'s (an :class:`~mmea_kernels.nn.MMEALinear`) fused ``plan`` against its unfused
    path on a detached copy of ``x`` (with the input gradient when ``grad``); a fused path that
    raises is named in a warning and loses."""
    xs = rows2d(x.detach(), layer.in_layout.dim)
    if grad:
        xs = xs.clone().requires_grad_(True)

    def runner(p):
        def run():
            try:
                y = layer._eager_path(xs, p)
                if grad and y.requires_grad:  # a layer without paths (static gates) has none to time
                    torch.autograd.grad(y, xs, torch.ones_like(y), allow_unused=True)
            except Exception as exc:  # noqa: BLE001 - the fused kernel's failure, named below
                if p is None:
                    raise
                raise _FusedFailed(f"{type(exc).__name__}: {exc}") from exc
        return run
    try:
        t_f, t_u = time_paths(runner(plan), runner(None), x.device)
        return PathChoice(t_f <= t_u, t_f, t_u, rows, grad)
    except _FusedFailed as exc:
        error = str(exc)
    warnings.warn(f"mmea_kernels: MMEA_FUSED_LINEAR=auto: the fused {plan[1]} kernel failed on "
                  f"{layer.in_layout.irreps_str} -> {layer.out_layout.irreps_str} ({rows} rows, {x.dtype}, "
                  f"{x.device}): {error}; this layer runs the unfused path at this size")
    t_u = time_paths(runner(None), runner(None), x.device, rounds=1, reps=1)[1]
    return PathChoice(False, math.inf, t_u, rows, grad, error[:300])
