"""The two gate primitives, ``gate_mul`` and ``seg_dot``, registered as ``torch.library`` custom
ops (``torch.ops.mmea_kernels.*``: one node each under ``torch.compile``) with autograd closed
under differentiation: the backward of each is written with the other, so any order of
derivative (forces, then the loss gradient) runs the same kernels.

The ops carry the layout as a key string (``"<irreps>|<layout>"``) and the backend as a name
(``""``: ``MMEA_BACKEND`` or auto); both are resolved inside the op, in eager code.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...layout import IrrepsLayout
from .._utils import grad_needed
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
    be = resolve_backend(backend or None, x.device)
    return be.gate_mul(x.contiguous(), gates.contiguous(), layout_tables(_from_key(key), x.device), keep_ungated)


@_gate_mul_op.register_fake
def _(x, gates, key, keep_ungated, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("mmea_kernels::seg_dot", mutates_args=())
def _seg_dot_op(a: torch.Tensor, b: torch.Tensor, key: str, shared: bool, backend: str) -> torch.Tensor:
    be = resolve_backend(backend or None, a.device)
    return be.seg_dot(a.contiguous(), b.contiguous(), layout_tables(_from_key(key), a.device), shared)


@_seg_dot_op.register_fake
def _(a, b, key, shared, backend):
    G = _from_key(key).num_gates
    return a.new_empty((G,) if shared else (a.shape[0], G))


def _gate_mul_setup(ctx, inputs, output):
    x, gates, key, keep, backend = inputs
    ctx.save_for_backward(x, gates)
    ctx.key, ctx.keep, ctx.backend = key, keep, backend


def _gate_mul_backward(ctx, grad_y):
    x, gates = ctx.saved_tensors
    gx = gg = None
    if grad_needed(ctx, 0):
        gx = torch.ops.mmea_kernels.gate_mul(grad_y, gates, ctx.key, ctx.keep, ctx.backend)
    if grad_needed(ctx, 1):
        gg = torch.ops.mmea_kernels.seg_dot(grad_y, x, ctx.key, gates.dim() == 1, ctx.backend)
    return gx, gg, None, None, None


def _seg_dot_setup(ctx, inputs, output):
    a, b, key, shared, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.key, ctx.backend = key, backend


def _seg_dot_backward(ctx, grad_out):
    a, b = ctx.saved_tensors
    ga = gb = None
    # d/da Σ a·b·g = g[gate(c)]·b, zero on 0e columns (seg_dot ignores them)
    if grad_needed(ctx, 0):
        ga = torch.ops.mmea_kernels.gate_mul(b, grad_out, ctx.key, False, ctx.backend)
    if grad_needed(ctx, 1):
        gb = torch.ops.mmea_kernels.gate_mul(a, grad_out, ctx.key, False, ctx.backend)
    return ga, gb, None, None, None


_gate_mul_op.register_autograd(_gate_mul_backward, setup_context=_gate_mul_setup)
_seg_dot_op.register_autograd(_seg_dot_backward, setup_context=_seg_dot_setup)


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


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.reshape(-1, dim) if dim > 0 else t.reshape(int(torch.Size(t.shape[:-1]).numel()), 0)


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
    x2 = _rows(x, layout.dim)
    g2 = gates if gates.dim() == 1 else gates.reshape(x2.shape[0], G)
    y = torch.ops.mmea_kernels.gate_mul(x2, g2, layout_key(layout), True, backend)
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
    out = torch.ops.mmea_kernels.seg_dot(_rows(a, layout.dim), _rows(b, layout.dim), layout_key(layout),
                                         bool(shared), backend)
    return out if shared else out.reshape(tuple(a.shape[:-1]) + (layout.num_gates,))
