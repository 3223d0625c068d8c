"""C++ kernels of the fused linear + gate on CPU (csrc/gated_linear.cpp, in the optional extension
``mmea_kernels._C``): the same two primitives as triton_kernels.py, so that function.py's closed
autograd runs on either (no autograd here).

* :func:`cpp_forward`: ``G_post ⊙ L_W(G_pre ⊙ x) + bias + additive``; tiles of rows, one BLAS GEMM
  per (instruction, tile) on packed operands, the gate, bias and additive applied to each tile as it
  is written.
* :func:`cpp_forward_u`: the same, also returning the pre-gate output ``L_W(G_pre ⊙ x)`` written by
  the same epilogue (for the autograd to save instead of recomputing).
* :func:`cpp_wgrad`: the flat weight gradient, per instruction, deterministic for any thread count.

Both read the task tables of ``tables.py`` built with whole blocks as channel tiles (one forward
task per output block, one weight-gradient task per instruction). float32 and float64.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .._utils import pow2
from ..gate.cpp import CPP_DTYPES, ext_op_status, register_fakes
from ...linear_spec import LinearSpec
from .tables import LinearTables, linear_tables

__all__ = ["cpp_forward", "cpp_forward_u", "cpp_wgrad", "cpp_tables", "CPP_DTYPES", "cpp_status", "cpp_built"]

def cpp_status(device, dtype: Optional[torch.dtype] = None):
    """(available, reason) of the fused cpp kernels for tensors on ``device`` (of ``dtype``)."""
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the fused cpp linear runs on cpu tensors, not {device.type}"
    if dtype is not None and dtype not in CPP_DTYPES:
        return False, f"the fused cpp linear supports float32 and float64, not {dtype}"
    return ext_op_status("gated_linear_fwd_u", "fused linear", "csrc/gated_linear.cpp")


@functools.lru_cache(maxsize=None)
def cpp_built() -> bool:
    """Whether the extension with the fused linear kernels is loaded (asked once)."""
    return cpp_status("cpu")[0]


def cpp_tables(spec: LinearSpec, device) -> LinearTables:
    """The task tables with whole blocks as channel tiles (cached on the spec per device)."""
    cache = spec.__dict__.setdefault("_cpp_tables", {})
    hit = cache.get(device)
    if hit is None:
        mo = max((b.mul for b in spec.out_layout.blocks), default=1)
        mi = max((b.mul for b in spec.in_layout.blocks), default=1)
        hit = cache[device] = linear_tables(spec, device, pow2(mo), pow2(mi))
    return hit


def _opt(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None for an absent or zero-width operand (nothing to read)."""
    return None if t is None or t.shape[-1] == 0 else t


def _forward_args(x, weight, bias, g_pre, g_post, additive, spec: LinearSpec) -> tuple:
    t = cpp_tables(spec, x.device)
    bias = bias if bias is not None and bias.numel() > 0 else None
    return (x, weight, bias, _opt(g_pre), _opt(g_post), _opt(additive), t.tasks, t.instructions, t.path_weights,
            spec.dim_out, t.block_w)


def cpp_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
                additive: Optional[torch.Tensor], spec: LinearSpec) -> torch.Tensor:
    """Kernel-level ``G_post ⊙ L_W(G_pre ⊙ x) + bias + additive`` on 2-D ``x`` (no autograd)."""
    args = _forward_args(x, weight, bias, g_pre, g_post, additive, spec)
    return torch.ops.mmea_kernels_ext.gated_linear_fwd.default(*args)


def cpp_forward_u(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
                  additive: Optional[torch.Tensor], spec: LinearSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`cpp_forward` and the pre-gate output ``u = L_W(G_pre ⊙ x)`` (no gate, bias or additive),
    written by the same tile epilogue (no autograd)."""
    args = _forward_args(x, weight, bias, g_pre, g_post, additive, spec)
    return torch.ops.mmea_kernels_ext.gated_linear_fwd_u.default(*args)


def cpp_wgrad(a: torch.Tensor, b: torch.Tensor, g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
              spec: LinearSpec) -> torch.Tensor:
    """Kernel-level flat weight gradient ``dW_i[u, w] = pw_i Σ_{n,m} (G_pre⊙a)[n,in(u,m)] (G_post⊙b)[n,out(w,m)]``."""
    t = cpp_tables(spec, a.device)
    return torch.ops.mmea_kernels_ext.gated_linear_wgrad.default(a, b, _opt(g_pre), _opt(g_post), t.wtasks,
                                                                 t.path_weights, spec.weight_numel, t.block_u,
                                                                 t.block_w)


def _register_fakes() -> None:
    """Shape-only implementations for torch.compile / FakeTensor tracing."""

    def fwd_fake(x, weight, bias, g_pre, g_post, additive, tasks, instructions, path_weights, d_out, block_w):
        return x.new_empty((x.shape[0], d_out))

    def fwd_u_fake(x, weight, bias, g_pre, g_post, additive, tasks, instructions, path_weights, d_out, block_w):
        return x.new_empty((x.shape[0], d_out)), x.new_empty((x.shape[0], d_out))

    def wgrad_fake(a, b, g_pre, g_post, wtasks, path_weights, numel, block_u, block_w):
        return a.new_empty((numel,))

    def mmea_linear_fake(x, *args):  # csrc/adapter_op.cpp: d_out = gate_of_column's length (args[12])
        return x.new_empty((x.shape[0], args[12].shape[0]))

    register_fakes((("mmea_kernels_ext::gated_linear_fwd", fwd_fake),
                    ("mmea_kernels_ext::gated_linear_fwd_u", fwd_u_fake),
                    ("mmea_kernels_ext::gated_linear_wgrad", wgrad_fake)))
    if hasattr(torch.ops.mmea_kernels_ext, "mmea_linear"):
        register_fakes((("mmea_kernels_ext::mmea_linear", mmea_linear_fake),))


if cpp_built():
    _register_fakes()
