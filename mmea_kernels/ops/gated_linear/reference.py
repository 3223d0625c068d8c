"""Reference path of the fused linear + gate: plain differentiable torch (one einsum per
instruction, bias, gate, additive) and the argument checks shared by every path."""
from __future__ import annotations

from typing import Optional

import torch

from ...linear_spec import LinearSpec
from .._utils import rows2d

__all__ = ["gated_linear_reference", "validate"]


# ============================================================================ reference
def _block_view(t: torch.Tensor, b, layout: str) -> torch.Tensor:
    """``[N, mul, 2l+1]`` view of block ``b`` of the 2-D feature tensor ``t``."""
    seg = t[:, b.offset: b.offset + b.dim]
    if layout == "mul_ir":
        return seg.reshape(t.shape[0], b.mul, b.ir_dim)
    return seg.reshape(t.shape[0], b.ir_dim, b.mul).transpose(1, 2)


def gated_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           gates: Optional[torch.Tensor], additive: Optional[torch.Tensor],
                           spec: LinearSpec) -> torch.Tensor:
    """Plain differentiable torch: one einsum per instruction (times its path weight), bias, gate,
    additive. The numerical reference of :func:`gated_linear` (any dtype, any device)."""
    validate(x, weight, bias, gates, additive, spec)
    weight = weight.contiguous()  # read by offset below (a strided view would be read wrong)
    lead = tuple(x.shape[:-1])
    x2 = rows2d(x, spec.dim_in)
    N = x2.shape[0]
    gates2 = None if gates is None else (gates if gates.dim() == 1 else gates.reshape(N, gates.shape[-1]))
    add2 = None if additive is None else (additive if additive.dim() == 1 else additive.reshape(N, additive.shape[-1]))
    bin_, bout = spec.in_layout.blocks, spec.out_layout.blocks
    outs = [x2.new_zeros((N, b.mul, b.ir_dim)) for b in bout]
    for ins in spec.instructions:
        if ins.numel == 0:
            continue
        w = torch.as_strided(weight, (ins.mul_in, ins.mul_out), (ins.weight_stride_in, ins.weight_stride_out),
                             weight.storage_offset() + ins.weight_offset)
        xb = _block_view(x2, bin_[ins.i_in], spec.layout)
        outs[ins.i_out] = outs[ins.i_out] + ins.path_weight * torch.einsum("nui,uw->nwi", xb, w)
    s = 0
    for o, b in enumerate(bout):
        if b.mul == 0:
            continue
        if bias is not None and spec.biases[o]:
            off = spec.bias_offsets[o]
            outs[o] = outs[o] + bias[off: off + b.dim].reshape(1, b.mul, 1)
        if b.is_scalar:
            if add2 is not None:
                a = add2[s: s + b.mul] if add2.dim() == 1 else add2[:, s: s + b.mul]
                outs[o] = outs[o] + a.reshape(-1, b.mul, 1)
            s += b.mul
        elif gates2 is not None:
            g = gates2[b.first_gate: b.first_gate + b.mul] if gates2.dim() == 1 else \
                gates2[:, b.first_gate: b.first_gate + b.mul]
            outs[o] = outs[o] * g.reshape(-1, b.mul, 1)
    cols = [(o if spec.layout == "mul_ir" else o.transpose(1, 2)).reshape(N, o.shape[1] * o.shape[2]) for o in outs]
    y = torch.cat(cols, dim=1) if cols else x2.new_zeros((N, 0))
    return y.reshape(lead + (spec.dim_out,))


# ============================================================================ validation
def validate(x, weight, bias, gates, additive, spec) -> None:
    if not isinstance(spec, LinearSpec):
        raise TypeError(f"spec must be a LinearSpec (see LinearSpec.from_e3nn), got {type(spec).__name__}")
    if spec.layout_out != spec.layout:
        raise ValueError(f"{spec!r}: the fused kernels need one layout for input and output "
                         f"(got {spec.layout} -> {spec.layout_out})")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != spec.dim_in:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be {spec.dim_in}, the dim of "
                         f"irreps_in {spec.in_layout.irreps_str} ({spec.layout})")
    lead = tuple(x.shape[:-1])

    def same(name, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on one device")

    same("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != spec.weight_numel:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({spec.weight_numel},) (the flat "
                         f"weight of {spec!r})")
    if bias is not None:
        same("bias", bias)
        if spec.bias_numel == 0:
            raise ValueError(f"a bias was given but {spec!r} has no biased output block")
        if bias.dim() != 1 or bias.shape[0] != spec.bias_numel:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({spec.bias_numel},)")
    for name, t, n, what in (("gates", gates, spec.out_layout.num_gates, "gates"),
                             ("additive", additive, spec.out_layout.num_scalars, "0e output channels")):
        if t is None:
            continue
        same(name, t)
        if t.dim() == 1:
            if t.shape[0] != n:
                raise ValueError(f"shared {name} have shape {tuple(t.shape)}, expected ({n},): {n} {what} in "
                                 f"irreps_out {spec.out_layout.irreps_str}")
        elif tuple(t.shape) != lead + (n,):
            raise ValueError(f"{name} have shape {tuple(t.shape)}, expected {lead + (n,)} (per row) or ({n},) "
                             f"(shared) for x of shape {tuple(x.shape)}")
