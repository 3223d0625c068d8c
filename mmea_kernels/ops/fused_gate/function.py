"""The fused gate as ``torch.library`` custom ops with closed autograd:

* ``mmea_kernels::fused_gate(x, key, backend) -> y``: one pass (scalar activation, gate
  activation, gated multiply);
* ``mmea_kernels::fused_gate_backward(x, dy, key, backend) -> dx``: one pass from ``(x, dy)``
  (activations and their derivatives recomputed from ``x``; only ``x`` is saved);
* the backward of ``fused_gate_backward`` (second derivatives, e.g. training on forces): with no
  graph being recorded (a force step's loss backward), a one-pass kernel (cpp: ``fused_gate_dbwd``;
  triton: ``triton.double_backward``); otherwise (the torch backend, a recorded graph)
  :func:`reference.double_backward`, the same formulas with ``f''`` in torch ops on the saved
  ``x``, ``dy``, so autograd differentiates it again (third and higher orders run through torch).

Both ops have fake implementations: ``torch.compile`` sees one node per op, no graph break.
Eager calls skip the custom ops' dispatch (:func:`fused_gate_2d`: the kernels directly, or plain
autograd functions with the same formulas when a gradient is recorded).
Backends (``backend=`` > ``MMEA_BACKEND`` > auto: triton on CUDA, cpp on CPU when the extension has
the fused gate kernels, torch otherwise): ``torch`` (reference.py), ``cpp`` (csrc/fused_gate.cpp,
CPU), ``triton`` (triton.py). A backend asked for by name that cannot run raises with the reason.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Tuple

import torch

from .._utils import eager_function, forward_mode, reference_needed, rows2d, traced
from . import reference
from .spec import FusedGateSpec, spec_tables

__all__ = ["fused_gate", "fused_gate_backend_status", "FUSED_GATE_BACKENDS"]

FUSED_GATE_BACKENDS = ("torch", "cpp", "triton")


def _cpp_status(device) -> Tuple[bool, str]:
    from ..gate.cpp import _EXT, available

    ok, why = available(device)
    if not ok:
        return ok, why
    if torch.device(device).type != "cpu":
        return False, "the fused gate's C++ kernels run on CPU tensors (use the triton backend on CUDA)"
    if not hasattr(torch.ops.mmea_kernels_ext, "fused_gate_fwd"):
        return False, ("mmea_kernels._C was built before csrc/fused_gate.cpp was added (no fused gate kernels); "
                       "rebuild it with `python setup.py build_ext --inplace`")
    return _EXT is not None, ""


def fused_gate_backend_status(name: str, device) -> Tuple[bool, str]:
    """(available, reason) of fused-gate backend ``name`` for tensors on ``device``."""
    if name == "torch":
        return True, ""
    if name == "cpp":
        return _cpp_status(device)
    if name == "triton":
        try:
            mod = importlib.import_module(f"{__package__}.triton")
        except Exception as exc:  # noqa: BLE001
            return False, f"importing the triton fused gate failed: {exc}"
        return mod.available(device)
    raise ValueError(f"unknown backend {name!r}; expected one of {sorted(FUSED_GATE_BACKENDS + ('auto',))}")


_RESOLVED = {}  # (backend, MMEA_BACKEND, TRITON_INTERPRET, device type) -> backend name


def _resolve(backend: str, device) -> str:
    env = os.environ.get("MMEA_BACKEND", "auto")
    ck = (backend, env, os.environ.get("TRITON_INTERPRET"), torch.device(device).type)
    hit = _RESOLVED.get(ck)
    if hit is None:
        hit = _RESOLVED[ck] = _resolve_uncached(backend, env, device)
    return hit


def _resolve_uncached(backend: str, env: str, device) -> str:
    name = (backend or env).strip().lower()
    device = torch.device(device)
    if name == "auto":
        for cand in (("triton",) if device.type == "cuda" else ("cpp",)):
            if fused_gate_backend_status(cand, device)[0]:
                return cand
        return "torch"
    ok, why = fused_gate_backend_status(name, device)
    if not ok:
        src = "backend=" if backend else "MMEA_BACKEND="
        raise RuntimeError(f"{src}{name!r} is not available for {device.type} tensors: {why}")
    return name


def check_backend(backend: Optional[str], device) -> str:
    """'' (auto / MMEA_BACKEND) or the validated name; raises early with the reason."""
    if backend is None or torch.compiler.is_compiling():
        return backend or ""
    _resolve(backend, device)
    return backend


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mmea_kernels::fused_gate", mutates_args=())
def _fused_gate_op(x: torch.Tensor, key: str, backend: str) -> torch.Tensor:
    return _forward_kernel(x, key, backend)


def _forward_kernel(x: torch.Tensor, key: str, backend: str) -> torch.Tensor:
    x = x.contiguous()
    name = _resolve(backend, x.device)
    if name == "cpp":
        t = spec_tables(key, "cpu")
        return torch.ops.mmea_kernels_ext.fused_gate_fwd.default(x, t.cpp_segs, t.cpp_csts, t.spec.d_out,
                                                                 t.spec.num_gates)
    t = spec_tables(key, x.device)
    if name == "triton":
        from . import triton as tr

        return tr.forward(x, t)
    return reference.forward(x, t)


@_fused_gate_op.register_fake
def _(x, key, backend):
    return x.new_empty((x.shape[0], FusedGateSpec.from_key(key).d_out))


@torch.library.custom_op("mmea_kernels::fused_gate_backward", mutates_args=())
def _fused_gate_backward_op(x: torch.Tensor, dy: torch.Tensor, key: str, backend: str) -> torch.Tensor:
    return _backward_kernel(x, dy, key, backend)


def _backward_kernel(x: torch.Tensor, dy: torch.Tensor, key: str, backend: str) -> torch.Tensor:
    x = x.contiguous()
    dy = dy.contiguous()
    name = _resolve(backend, x.device)
    if name == "cpp":
        t = spec_tables(key, "cpu")
        return torch.ops.mmea_kernels_ext.fused_gate_bwd.default(x, dy, t.cpp_segs, t.cpp_csts, t.spec.num_gates)
    t = spec_tables(key, x.device)
    if name == "triton":
        from . import triton as tr

        return tr.backward(x, dy, t)
    return reference.backward(x, dy, t)


@_fused_gate_backward_op.register_fake
def _(x, dy, key, backend):
    return x.new_empty(x.shape)


def _fwd_setup(ctx, inputs, output):
    x, key, backend = inputs
    ctx.save_for_backward(x)
    ctx.key, ctx.backend, ctx.eager = key, backend, False


def _fwd_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    # in the form of the forward: a custom op's backward may run on fake tensors (AOT tracing)
    bwd = _fused_gate_backward_2d if ctx.eager else torch.ops.mmea_kernels.fused_gate_backward
    return bwd(x, dy, ctx.key, ctx.backend), None, None


def _bwd_setup(ctx, inputs, output):
    x, dy, key, backend = inputs
    ctx.save_for_backward(x, dy)
    ctx.key, ctx.backend = key, backend


@functools.lru_cache(maxsize=None)
def _cpp_has_dbwd() -> bool:
    """Whether the loaded extension has the double-backward kernel (a build from before 2026-12-02
    has the forward and backward only: the torch formulas run instead, same numbers)."""
    return hasattr(torch.ops.mmea_kernels_ext, "fused_gate_dbwd")


def _bwd_backward(ctx, v):
    x, dy = ctx.saved_tensors
    if not torch.is_grad_enabled() and not traced(x) and not traced(v) and not forward_mode(x, dy, v):
        # no graph recorded (the usual force step: its gradients are not differentiated again): one pass
        name = _resolve(ctx.backend, x.device)
        if name == "cpp" and _cpp_has_dbwd():
            t = spec_tables(ctx.key, "cpu")
            gx, gdy = torch.ops.mmea_kernels_ext.fused_gate_dbwd.default(
                x.contiguous(), dy.contiguous(), v.contiguous(), t.cpp_segs, t.cpp_csts, t.spec.num_gates)
            return gx, gdy, None, None
        if name == "triton":
            from . import triton as tr

            gx, gdy = tr.double_backward(x.contiguous(), dy.contiguous(), v.contiguous(), spec_tables(ctx.key, x.device))
            return gx, gdy, None, None
    # torch ops, so that autograd can differentiate them again; traced (AOTAutograd / fake tensors):
    # the index tables must be made inside the trace
    gx, gdy = reference.double_backward(x, dy, v, spec_tables(ctx.key, x.device, cache=not traced(x)))
    return gx, gdy, None, None


_fused_gate_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)
_fused_gate_backward_op.register_autograd(_bwd_backward, setup_context=_bwd_setup)


# ----------------------------------------------------------------------------- eager path
# Outside a trace the custom ops are skipped (their dispatch costs ~0.1 ms of host time per
# call, several times the kernel at MD sizes): the kernels run directly when no gradient is being
# recorded, else through plain autograd functions with the custom ops' own setup and backward.
def fused_gate_2d(x: torch.Tensor, key: str, backend: str) -> torch.Tensor:
    """``fused_gate`` of 2-D ``x`` (checked already): the custom op when traced, else the kernel (no
    gradient recorded) or ``_FusedGateFn``."""
    if reference_needed(x):  # the reference's torch ops carry tangents; kernels and ops would drop them
        return reference.forward(x, spec_tables(key, x.device))
    if traced(x):
        return torch.ops.mmea_kernels.fused_gate(x, key, backend)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _forward_kernel(x, key, backend)
    return _FusedGateFn.apply(x, key, backend)


def _fused_gate_backward_2d(x: torch.Tensor, dy: torch.Tensor, key: str, backend: str) -> torch.Tensor:
    if reference_needed(x, dy):
        return reference.backward(x, dy, spec_tables(key, x.device))
    if traced(x):
        return torch.ops.mmea_kernels.fused_gate_backward(x, dy, key, backend)
    if not (torch.is_grad_enabled() and (x.requires_grad or dy.requires_grad)):
        return _backward_kernel(x, dy, key, backend)
    return _FusedGateBackwardFn.apply(x, dy, key, backend)


_FusedGateFn = eager_function("_FusedGateFn", _fwd_setup, _forward_kernel, _fwd_backward)
_FusedGateBackwardFn = eager_function("_FusedGateBackwardFn", _bwd_setup, _backward_kernel, _bwd_backward)


def fused_gate(x: torch.Tensor, spec: FusedGateSpec, backend: Optional[str] = None) -> torch.Tensor:
    """``y = gate(x)`` for ``x`` of shape ``[..., spec.d_in]`` (see spec.py for what it computes)."""
    if x.shape[-1] != spec.d_in:
        raise ValueError(f"the input has shape {tuple(x.shape)}: its last dimension must be {spec.d_in}")
    lead = x.shape[:-1]
    y = fused_gate_2d(rows2d(x, spec.d_in), spec.key(), check_backend(backend, x.device))
    return y.reshape(lead + (spec.d_out,))
