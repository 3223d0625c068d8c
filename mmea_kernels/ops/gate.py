"""The two gate primitives, ``gate_mul`` and ``seg_dot``, with autograd closed under
differentiation: the backward of each is written with the other, so any order of derivative
(forces, then the loss gradient) goes through the same fast kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layout import IrrepsLayout
from .backends import resolve_backend
from .tables import layout_tables

__all__ = ["gate_mul", "seg_dot"]


class _GateMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gates, layout, backend, keep_ungated):
        ctx.save_for_backward(x, gates)
        ctx.layout, ctx.backend, ctx.keep = layout, backend, keep_ungated
        return backend.gate_mul(x, gates, layout_tables(layout, x.device), keep_ungated)

    @staticmethod
    def backward(ctx, grad_y):
        x, gates = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        gx = gg = None
        if ctx.needs_input_grad[0]:
            gx = _GateMul.apply(grad_y, gates, ctx.layout, ctx.backend, ctx.keep)
        if ctx.needs_input_grad[1]:
            gg = _SegDot.apply(grad_y, x, ctx.layout, ctx.backend, gates.dim() == 1)
        return gx, gg, None, None, None


class _SegDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, layout, backend, shared):
        ctx.save_for_backward(a, b)
        ctx.layout, ctx.backend = layout, backend
        return backend.seg_dot(a, b, layout_tables(layout, a.device), shared)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        ga = gb = None
        # d/da Σ a·b·g = g[gate(c)]·b (zero on 0e columns, which seg_dot ignores)
        if ctx.needs_input_grad[0]:
            ga = _GateMul.apply(b, grad_out, ctx.layout, ctx.backend, False)
        if ctx.needs_input_grad[1]:
            gb = _GateMul.apply(a, grad_out, ctx.layout, ctx.backend, False)
        return ga, gb, None, None, None


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
    lead = x.shape[:-1]
    if gates.dim() == 1:
        if gates.shape[0] != G:
            raise ValueError(f"shared gates have shape {tuple(gates.shape)}, expected ({G},) for irreps {layout.irreps_str}")
    elif tuple(gates.shape) != tuple(lead) + (G,):
        raise ValueError(
            f"gates have shape {tuple(gates.shape)}, expected {tuple(lead) + (G,)} (per row) or ({G},) (shared) "
            f"for x of shape {tuple(x.shape)} and irreps {layout.irreps_str}"
        )
    be = resolve_backend(backend, x.device)
    rows = int(torch.Size(lead).numel())
    x2 = x.reshape(rows, layout.dim).contiguous()
    g2 = gates.contiguous() if gates.dim() == 1 else gates.reshape(rows, G).contiguous()
    return _GateMul.apply(x2, g2, layout, be, True).reshape(x.shape)


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
    be = resolve_backend(backend, a.device)
    G = layout.num_gates
    rows = int(torch.Size(a.shape[:-1]).numel())
    a2 = a.reshape(rows, layout.dim).contiguous()
    b2 = b.reshape(rows, layout.dim).contiguous()
    out = _SegDot.apply(a2, b2, layout, be, bool(shared))
    return out if shared else out.reshape(tuple(a.shape[:-1]) + (G,))
