"""Reference backend: the gate primitives in plain vectorised PyTorch (any device, any dtype).

Kernel-level functions (no autograd): inputs are 2-D and contiguous, already validated.
"""
from __future__ import annotations

import torch

from ..tables import LayoutTables

name = "torch"


def available(device: torch.device):
    return True, ""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gate_mul(x: torch.Tensor, gates: torch.Tensor, t: LayoutTables, keep_ungated: bool) -> torch.Tensor:
    """``y[n,c] = x[n,c]·gates[n, gate(c)]``; 0e columns copied (keep_ungated) or zeroed."""
    acc = _acc_dtype(x.dtype)
    fill = 1.0 if keep_ungated else 0.0
    if gates.dim() == 1:
        g = torch.cat([gates.to(acc), gates.new_full((1,), fill, dtype=acc)])
        scale = g.index_select(0, t.gate_index_ext)
    else:
        g = torch.cat([gates.to(acc), gates.new_full((gates.shape[0], 1), fill, dtype=acc)], dim=1)
        scale = g.index_select(1, t.gate_index_ext)
    y = x.to(acc) * scale
    if not keep_ungated and t.scalar_columns.numel():  # zeroed, not times 0: an inf or nan there stays out
        y.index_fill_(-1, t.scalar_columns, 0.0)
    return y.to(x.dtype)


def seg_dot(a: torch.Tensor, b: torch.Tensor, t: LayoutTables, shared: bool) -> torch.Tensor:
    """``out[n,j] = Σ_{c in gate j} a[n,c]·b[n,c]`` (also summed over n when ``shared``)."""
    acc = _acc_dtype(a.dtype)
    prod = a.to(acc) * b.to(acc)
    if shared:
        res = torch.zeros(t.num_gates, dtype=acc, device=a.device)
        res.index_add_(0, t.gated_gate, prod.sum(0).index_select(0, t.gated_columns))
    else:
        res = torch.zeros(a.shape[0], t.num_gates, dtype=acc, device=a.device)
        res.index_add_(1, t.gated_gate, prod.index_select(1, t.gated_columns))
    return res.to(a.dtype)
