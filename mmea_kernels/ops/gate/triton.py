"""Triton backend: the gate primitives as Triton kernels (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``).

Kernel-level functions (no autograd) with the same interface as
:mod:`mmea_kernels.ops.gate.reference`: inputs are 2-D and contiguous, already validated.

* ``gate_mul``: one 2-D grid over (row blocks, column blocks); each program loads a
  ``[BLOCK_N, BLOCK_D]`` tile of ``x``, gathers the gate of every column from
  ``t.gate_of_column`` and the gate values from ``gates`` (row stride 0 for shared gates).
* ``seg_dot``: one 2-D grid over (row blocks, gate blocks); each program accumulates a
  ``[BLOCK_N, BLOCK_G]`` tile (one lane per (row, gate), as the CUDA kernel's thread) over the
  columns k of the gates, gathering ``a`` and ``b`` at column k of every gate through
  ``t.gate_cols_padded``; the loop runs to the widest gate, narrower gates mask the rest. (The
  first version gathered a padded ``[BLOCK_N, BLOCK_G, W]`` tile and reduced its last axis; on an
  H200 it reached 10-50 % of copy bandwidth where the CUDA kernel reached 84-98 %.) Shared mode reduces the rows of the tile too and writes one partial row per row-block
  program into a ``[num_row_programs, G]`` buffer, summed by torch afterwards (deterministic, no
  atomics).

Under ``TRITON_INTERPRET=1`` the kernels must have been decorated in interpreter mode, i.e. the
variable must be set before this module is imported.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from .._utils import INTERPRETED_AT_IMPORT as _INTERPRETED_AT_IMPORT
from .._utils import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from .._utils import check_grid, cols32, device_guard, interpreting, pow2, tl, triton
from ..tables import LayoutTables

name = "triton"



def available(device: torch.device) -> Tuple[bool, str]:
    if triton is None:
        return False, f"triton is not installed ({_TRITON_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if not _INTERPRETED_AT_IMPORT:
            return False, (
                "TRITON_INTERPRET=1 was set after mmea_kernels.ops.gate.triton was imported; "
                "set it before importing to run the triton backend on CPU tensors"
            )
        return True, ""
    return False, "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"


# ---------------------------------------------------------------------------- helpers
def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gate_mul_blocks(n: int, d: int, interpret: bool) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for gate_mul. The interpreter pays per program instance,
    so it gets big tiles. On GPU: tiles of at most 2048 elements, 512 columns wide (256 where that
    leaves fewer idle columns in the last column block, e.g. D = 640 or 1152), 4 warps (2 under 1024
    elements). On an H200 (bench/results/NVIDIA-H200-2026-12-04-run1-summary.md; 32000 rows of
    128x0e+128x1o+128x2e+128x3o, D = 2048, L2 flushed) 4 x 512 reached 89 / 75 / 94 % of copy
    bandwidth in fp32 / bf16 / fp64, 8 x 256 77 / 64 / 87 %, the earlier 16 x 256 62 / 42 / 66 %."""
    if interpret:
        block_d = min(pow2(d), 256)
        block_n = min(pow2(n), 64)
        return block_n, block_d, 1
    block_d = min(pow2(d), 512)
    if block_d == 512 and -(-d // 512) * 512 > -(-d // 256) * 256:
        block_d = 256
    block_n = min(pow2(n), max(1, 2048 // block_d))
    num_warps = 4 if block_n * block_d >= 1024 else 2
    return block_n, block_d, num_warps


def _seg_dot_blocks(n: int, g: int, w: int, interpret: bool) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_G, num_warps) for seg_dot: a [BLOCK_N, BLOCK_G] accumulator (one lane per
    (row, gate)); ``w`` no longer sizes the tile (the kernel loops over the columns). The interpreter
    pays per program instance, so it gets big tiles. On GPU, at most 4 lanes per thread: the
    unrolled column loop keeps every load of a lane in flight, and 8 lanes per thread took 92-128
    registers on sm_90 (4: 48-64; bench/gpu/kernel_report.py). 8 rows x 64 gates on 4 warps was the
    fastest tile of the H200 sweep of 2026-12-04 (36 / 36 / 28 % of copy bandwidth in fp32 / bf16 /
    fp64, L2 flushed, against 28 / 23 / 24 % for the earlier 16 x 64 on 8 warps)."""
    if interpret:
        block_g = min(pow2(g), 128)
        return min(pow2(n), max(1, 16384 // block_g), 128), block_g, 1
    block_g = min(pow2(g), 64)
    block_n = min(pow2(n), max(1, 512 // block_g))
    return block_n, block_g, 4


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _gate_mul_kernel(
        x_ptr, gates_ptr, gate_of_ptr, out_ptr,
        N, D,
        stride_xn, stride_xd,
        stride_gn, stride_gg,  # stride_gn == 0 for gates shared across rows
        stride_on, stride_od,
        FILL: tl.constexpr,  # scale of ungated columns: 1.0 (keep) or 0.0 (zero)
        ACC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < N
        col_ok = cols < D
        rows64 = rows.to(tl.int64)  # only the row offsets need 64 bits

        gate = tl.load(gate_of_ptr + cols, mask=col_ok, other=-1)
        gated = gate >= 0
        gate_safe = tl.where(gated, gate, 0)

        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xn + (cols * stride_xd)[None, :],
                    mask=tile_ok, other=0.0).to(ACC)
        g_ok = row_ok[:, None] & (col_ok & gated)[None, :]
        g = tl.load(gates_ptr + rows64[:, None] * stride_gn + (gate_safe * stride_gg)[None, :],
                    mask=g_ok, other=0.0).to(ACC)
        if FILL == 0.0:  # zeroed, not multiplied by 0: an inf or NaN there gives 0, as the torch reference
            y = tl.where(gated[None, :], x * g, 0.0)
        else:
            y = tl.where(gated[None, :], x * g, x)
        tl.store(out_ptr + rows64[:, None] * stride_on + (cols * stride_od)[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _seg_dot_kernel(
        a_ptr, b_ptr, cols_ptr, out_ptr,
        N, G,
        stride_an, stride_ad,
        stride_bn, stride_bd,
        stride_on, stride_og,  # per-row: out [N, G]; shared: partial [num_row_programs, G]
        SHARED: tl.constexpr,
        ACC: tl.constexpr,
        W: tl.constexpr,  # row length of the padded column table
        K: tl.constexpr,  # columns of the widest gate (<= W): the loop runs over these only
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_g = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        gids = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        row_ok = rows < N
        gate_ok = gids < G
        rows64 = rows.to(tl.int64)  # only the row offsets need 64 bits
        a_rows = a_ptr + rows64[:, None] * stride_an
        b_rows = b_ptr + rows64[:, None] * stride_bn

        # one [BLOCK_N, BLOCK_G] tile per column k of the gates (thread per (row, gate), as the CUDA
        # kernel): 2-D gathers whose lanes read neighbouring gates, no padded third axis
        s = tl.zeros([BLOCK_N, BLOCK_G], dtype=ACC)
        for k in tl.static_range(K):
            col = tl.load(cols_ptr + gids * W + k, mask=gate_ok, other=-1)  # -1: past this gate's width
            ok = col >= 0
            col = tl.where(ok, col, 0)
            m = row_ok[:, None] & ok[None, :]
            a = tl.load(a_rows + (col * stride_ad)[None, :], mask=m, other=0.0).to(ACC)
            b = tl.load(b_rows + (col * stride_bd)[None, :], mask=m, other=0.0).to(ACC)
            s += a * b
        if SHARED:
            part = tl.sum(s, axis=0)  # [BLOCK_G]
            tl.store(out_ptr + pid_n.to(tl.int64) * stride_on + gids * stride_og,
                     part.to(out_ptr.dtype.element_ty), mask=gate_ok)
        else:
            tl.store(out_ptr + rows64[:, None] * stride_on + (gids * stride_og)[None, :],
                     s.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & gate_ok[None, :])


# ---------------------------------------------------------------------------- entry points
def gate_mul(x: torch.Tensor, gates: torch.Tensor, t: LayoutTables, keep_ungated: bool) -> torch.Tensor:
    """``y[n,c] = x[n,c]·gates[n, gate(c)]``; 0e columns copied (keep_ungated) or zeroed."""
    N, D = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if N == 0 or D == 0:
        return out
    x, gates = cols32(x), cols32(gates)
    if gates.numel() == 0:  # G == 0: every column is ungated; never dereferenced
        gates = x.new_zeros(1)
    if gates.dim() == 1:
        stride_gn, stride_gg = 0, gates.stride(0)
    else:
        stride_gn, stride_gg = gates.stride(0), gates.stride(1)
    block_n, block_d, num_warps = _gate_mul_blocks(N, D, interpreting(x.device))
    grid = check_grid((triton.cdiv(N, block_n), triton.cdiv(D, block_d)), "gate_mul")
    with device_guard(x.device):
        _gate_mul_kernel[grid](
            x, gates, t.gate_of_column, out,
            N, D,
            x.stride(0), x.stride(1),
            stride_gn, stride_gg,
            out.stride(0), out.stride(1),
            FILL=1.0 if keep_ungated else 0.0,
            ACC=_tl_acc(x.dtype),
            BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return out


def seg_dot(a: torch.Tensor, b: torch.Tensor, t: LayoutTables, shared: bool) -> torch.Tensor:
    """``out[n,j] = Σ_{c in gate j} a[n,c]·b[n,c]`` (also summed over n when ``shared``)."""
    N = a.shape[0]
    G = t.num_gates
    if shared:
        if G == 0:
            return a.new_empty((0,))
        if N == 0:
            return a.new_zeros((G,))
    else:
        out = a.new_empty((N, G))
        if N == 0 or G == 0:
            return out

    W = t.gate_width
    a, b = cols32(a), cols32(b)
    block_n, block_g, num_warps = _seg_dot_blocks(N, G, W, interpreting(a.device))
    grid = check_grid((triton.cdiv(N, block_n), triton.cdiv(G, block_g)), "seg_dot")
    if shared:
        dst = torch.empty((grid[0], G), dtype=_acc_torch_dtype(a.dtype), device=a.device)
    else:
        dst = out
    with device_guard(a.device):
        _seg_dot_kernel[grid](
            a, b, t.gate_cols_padded, dst,
            N, G,
            a.stride(0), a.stride(1),
            b.stride(0), b.stride(1),
            dst.stride(0), dst.stride(1),
            SHARED=bool(shared),
            ACC=_tl_acc(a.dtype),
            W=W, K=max(t.layout.max_gate_width, 1),
            BLOCK_N=block_n, BLOCK_G=block_g,
            num_warps=num_warps,
        )
    if not shared:
        return out
    return dst.sum(0).to(a.dtype)
