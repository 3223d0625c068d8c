"""The two gate primitives, ``gate_mul`` and ``seg_dot``, registered as ``torch.library`` custom
ops (``torch.ops.mmea_kernels.*``: one node each under ``torch.compile``) with autograd closed
under differentiation: the backward of each is written with the other, so any order of
derivative (forces, then the loss gradient) runs the same kernels.

The ops carry the layout as a key string (``"<irreps>|<layout>"``) and the backend as a name
(``""``: ``MMEA_BACKEND`` or auto); both are resolved inside the op, in eager code.

Eager calls do not go through the custom ops: a ``torch.library`` custom op costs ~0.1 ms of host
time per call on this project's CPU (dispatch, autograd wrapper, dynamo guard) against ~10 µs for
the kernel at MD sizes, which a launch-bound GPU run pays per call too. Outside a trace,
:func:`gate_mul` and :func:`seg_dot` call the backend's kernel directly when no gradient is being
recorded, and otherwise ``_GateMulFn`` / ``_SegDotFn``, plain autograd functions with the same
kernels and the custom ops' own setup and backward. Under ``torch.compile`` (or on fake tensors of
another tracer) they are the custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...layout import IrrepsLayout
from .._utils import eager_function, grad_needed, reference_needed, rows2d, traced
from ..backends import resolve_backend
from ..tables import layout_tables

__all__ = ["gate_mul", "seg_dot", "layout_key"]


def layout_key(layout: IrrepsLayout) -> str:
    return f"{layout.irreps_str}|{layout.layout}"


def _from_key(key: str) -> IrrepsLayout:
    irreps, _, name = key.rpartition("|")
    return IrrepsLayout.of(irreps, name)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mmea_kernels::gate_mul", mutates_args=())
def _gate_mul_op(x: torch.Tensor, gates: torch.Tensor, key: str, keep_ungated: bool, backend: str) -> torch.Tensor:
    return _gate_mul_kernel(x, gates, _from_key(key), keep_ungated, backend)


@_gate_mul_op.register_fake
def _(x, gates, key, keep_ungated, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("mmea_kernels::seg_dot", mutates_args=())
def _seg_dot_op(a: torch.Tensor, b: torch.Tensor, key: str, shared: bool, backend: str) -> torch.Tensor:
    return _seg_dot_kernel(a, b, _from_key(key), shared, backend)


@_seg_dot_op.register_fake
def _(a, b, key, shared, backend):
    G = _from_key(key).num_gates
    return a.new_empty((G,) if shared else (a.shape[0], G))


def _layout_of(key) -> IrrepsLayout:
    return key if isinstance(key, IrrepsLayout) else _from_key(key)


# Autograd of both forms (the custom ops: inputs carry the layout key; the eager autograd functions:
# the IrrepsLayout). The backward of each op is the other op, in the form of the forward: a custom
# op's backward may run on fake tensors (AOT tracing), where only the custom ops can run.
def _gate_mul_setup(ctx, inputs, output):
    x, gates, key, keep, backend = inputs
    ctx.save_for_backward(x, gates)
    ctx.eager = False
    ctx.layout, ctx.keep, ctx.backend = _layout_of(key), keep, backend


def _seg_dot_setup(ctx, inputs, output):
    a, b, key, shared, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.eager = False
    ctx.layout, ctx.backend = _layout_of(key), backend


def _mul(ctx, x, gates, keep):
    if ctx.eager:
        return gate_mul_2d(x, gates, ctx.layout, keep, ctx.backend)
    return torch.ops.mmea_kernels.gate_mul(x, gates, layout_key(ctx.layout), keep, ctx.backend)


def _dot(ctx, a, b, shared):
    if ctx.eager:
        return seg_dot_2d(a, b, ctx.layout, shared, ctx.backend)
    return torch.ops.mmea_kernels.seg_dot(a, b, layout_key(ctx.layout), shared, ctx.backend)


def _gate_mul_backward(ctx, grad_y):
    x, gates = ctx.saved_tensors
    gx = _mul(ctx, grad_y, gates, ctx.keep) if grad_needed(ctx, 0) else None
    gg = _dot(ctx, grad_y, x, gates.dim() == 1) if grad_needed(ctx, 1) else None
    return gx, gg, None, None, None


def _seg_dot_backward(ctx, grad_out):
    a, b = ctx.saved_tensors
    # d/da Σ a·b·g = g[gate(c)]·b, zero on 0e columns (seg_dot ignores them)
    ga = _mul(ctx, b, grad_out, False) if grad_needed(ctx, 0) else None
    gb = _mul(ctx, a, grad_out, False) if grad_needed(ctx, 1) else None
    return ga, gb, None, None, None


_gate_mul_op.register_autograd(_gate_mul_backward, setup_context=_gate_mul_setup)
_seg_dot_op.register_autograd(_seg_dot_backward, setup_context=_seg_dot_setup)


# ----------------------------------------------------------------------------- eager path
def _gate_mul_kernel(x, gates, layout: IrrepsLayout, keep: bool, backend: str) -> torch.Tensor:
    be = resolve_backend(backend or None, x.device)
    return be.gate_mul(x.contiguous(), gates.contiguous(), layout_tables(layout, x.device), keep)


def _seg_dot_kernel(a, b, layout: IrrepsLayout, shared: bool, backend: str) -> torch.Tensor:
    be = resolve_backend(backend or None, a.device)
    return be.seg_dot(a.contiguous(), b.contiguous(), layout_tables(layout, a.device), shared)


def _recording(*ts) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def gate_mul_2d(x, gates, layout: IrrepsLayout, keep: bool, backend: str) -> torch.Tensor:
    """``gate_mul`` of 2-D ``x`` (rows) with per-row or shared ``gates``, checked already: the custom op
    when traced, else the kernel (no gradient recorded) or :class:`_GateMulFn`."""
    if reference_needed(x, gates):  # the reference's torch ops carry tangents; kernels and ops would drop them
        return _gate_mul_kernel(x, gates, layout, keep, "torch")
    if traced(x):
        return torch.ops.mmea_kernels.gate_mul(x, gates, layout_key(layout), keep, backend)
    if not _recording(x, gates):
        return _gate_mul_kernel(x, gates, layout, keep, backend)
    return _GateMulFn.apply(x, gates, layout, keep, backend)


def seg_dot_2d(a, b, layout: IrrepsLayout, shared: bool, backend: str) -> torch.Tensor:
    """``seg_dot`` of 2-D ``a``, ``b`` (checked already); as :func:`gate_mul_2d`."""
    if reference_needed(a, b):
        return _seg_dot_kernel(a, b, layout, shared, "torch")
    if traced(a):
        return torch.ops.mmea_kernels.seg_dot(a, b, layout_key(layout), shared, backend)
    if not _recording(a, b):
        return _seg_dot_kernel(a, b, layout, shared, backend)
    return _SegDotFn.apply(a, b, layout, shared, backend)


_GateMulFn = eager_function("_GateMulFn", _gate_mul_setup, _gate_mul_kernel, _gate_mul_backward)
_SegDotFn = eager_function("_SegDotFn", _seg_dot_setup, _seg_dot_kernel, _seg_dot_backward)


# ----------------------------------------------------------------------------- checks
def _as_layout(layout) -> IrrepsLayout:
    if isinstance(layout, IrrepsLayout):
        return layout
    if isinstance(layout, tuple) and len(layout) == 2 and isinstance(layout[1], str):
        return IrrepsLayout.of(layout[0], layout[1])
    return IrrepsLayout.of(layout, "mul_ir")


def _check_features(name: str, t: torch.Tensor, layout: IrrepsLayout) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < 1 or t.shape[-1] != layout.dim:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: its last dimension must be {layout.dim}, the dim of "
            f"irreps {layout.irreps_str} ({layout.layout})"
        )


def _check_pair(n1: str, t1: torch.Tensor, n2: str, t2: torch.Tensor) -> None:
    if t1.dtype != t2.dtype:
        raise TypeError(f"{n1} has dtype {t1.dtype} but {n2} has dtype {t2.dtype}; they must match")
    if t1.device != t2.device:
        raise ValueError(f"{n1} is on {t1.device} but {n2} is on {t2.device}; they must be on one device")


def _check_backend(backend: Optional[str], device) -> str:
    if backend is None:
        return ""
    if torch.compiler.is_compiling():
        return backend
    resolve_backend(backend, device)  # raises a clear error for unknown or unavailable backends
    return backend


# ----------------------------------------------------------------------------- public API
def gate_mul(x: torch.Tensor, gates: torch.Tensor, layout, backend: Optional[str] = None) -> torch.Tensor:
    """Multiply every gated column of ``x`` by its gate.

    ``x``: ``[..., D]`` features with the irreps of ``layout`` (an :class:`IrrepsLayout`, or irreps in
    ``mul_ir``, or an ``(irreps, layout_name)`` pair). ``gates``: ``[..., G]`` (one gate per row and
    (order, multiplicity)) or ``[G]`` (shared by all rows). 0e columns are returned unchanged.
    """
    layout = _as_layout(layout)
    _check_features("x", x, layout)
    if not isinstance(gates, torch.Tensor):
        raise TypeError(f"gates must be a torch.Tensor, got {type(gates).__name__}")
    _check_pair("x", x, "gates", gates)
    G = layout.num_gates
    lead = tuple(x.shape[:-1])
    if gates.dim() == 1:
        if gates.shape[0] != G:
            raise ValueError(f"shared gates have shape {tuple(gates.shape)}, expected ({G},) for irreps {layout.irreps_str}")
    elif tuple(gates.shape) != lead + (G,):
        raise ValueError(
            f"gates have shape {tuple(gates.shape)}, expected {lead + (G,)} (per row) or ({G},) (shared) "
            f"for x of shape {tuple(x.shape)} and irreps {layout.irreps_str}"
        )
    backend = _check_backend(backend, x.device)
    x2 = rows2d(x, layout.dim)
    g2 = gates if gates.dim() == 1 else gates.reshape(x2.shape[0], G)
    y = gate_mul_2d(x2, g2, layout, True, backend)
    return y.reshape(x.shape)


def seg_dot(a: torch.Tensor, b: torch.Tensor, layout, shared: bool = False,
            backend: Optional[str] = None) -> torch.Tensor:
    """Per-gate sums of ``a·b``: ``out[..., j] = Σ_{c: gate(c)=j} a[..., c]·b[..., c]``.

    With ``shared=True`` the rows are summed too and the result has shape ``[G]``. 0e columns
    do not contribute.
    """
    layout = _as_layout(layout)
    _check_features("a", a, layout)
    _check_features("b", b, layout)
    _check_pair("a", a, "b", b)
    if a.shape != b.shape:
        raise ValueError(f"a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}; they must match")
    backend = _check_backend(backend, a.device)
    out = seg_dot_2d(rows2d(a, layout.dim), rows2d(b, layout.dim), layout, bool(shared), backend)
    return out if shared else out.reshape(tuple(a.shape[:-1]) + (layout.num_gates,))
