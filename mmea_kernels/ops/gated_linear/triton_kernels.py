"""Triton kernels and launchers of the fused linear + gate (no autograd here: see function.py).

Forward: ``_gl_fwd_kernel``, a grouped GEMM. A *task* is (output block, tile of output channels).
Its GEMM rows are the pairs (row n, component m) of the block, so one program covers ``BLOCK_M``
such pairs (``BLOCK_M // (2l+1)`` rows, all their components): every weight tile it loads serves
all 2l+1 components, and in ``mul_ir`` the x slab of those rows is read once per channel tile. A
task loops over the instructions feeding its block and over tiles of their input channels,
accumulating ``path_weight · x[(n, m), u] @ W_i[u, w]`` with ``tl.dot`` (fp32 accumulation for
fp32/fp16/bf16, fp64 for fp64), then applies the epilogue (gate, bias, additive) and stores its
tile. Both layouts go through the per-block channel and component strides of the task tables.
Each task gets programs for ``cdiv(N, BLOCK_M // max(2l+1))`` row groups; those past the rows of
a task with smaller 2l+1 do nothing.

fp32 dot products use ``input_precision="tf32x3"`` by default (three TF32 tensor-core products,
close to fp32 accuracy); ``MMEA_FP32_DOT=ieee`` selects plain FMA (the reference numerics, slower
on tensor-core GPUs) and ``tf32`` one TF32 product (fastest, ~1e-3 relative).

Weight gradient: ``_gl_wgrad_kernel``; a task is (instruction, input-channel tile, output-channel
tile), its rows are split over programs (partial sums, summed by torch: deterministic, no atomics).

Both grids are 1-D (CUDA caps grid dimensions 1 and 2 at 65,535); row indices enter pointer
arithmetic as int64, everything else (columns, table entries) as int32.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import tables as ls
from .._utils import check_grid, cols32, device_guard, interpreting, pow2, tl, triton
from ...linear_spec import LinearSpec
from .tables import LinearTables, linear_tables

__all__ = ["triton_forward", "triton_forward_u", "triton_wgrad", "fwd_launch", "wgrad_launch", "fp32_precision"]

FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")


def fp32_precision() -> str:
    """``input_precision`` of fp32 dot products (``MMEA_FP32_DOT``, default ``tf32x3``)."""
    p = os.environ.get("MMEA_FP32_DOT", "tf32x3").strip().lower()
    if p not in FP32_PRECISIONS:
        raise ValueError(f"MMEA_FP32_DOT={p!r}; expected one of {FP32_PRECISIONS}")
    return p


# ============================================================================ tile sizes and grids
# GPU tiles of the forward kernel per dtype: GEMM rows (pairs (n, m)) per program, output- and
# input-channel tiles, warps and software-pipelining stages; the weight gradient uses block_w,
# block_k, the warps and the stages too. Chosen so that no kernel spills registers on sm_90
# (`bench/gpu/kernel_report.py`, ptxas -v: 4 warps with 3 stages spilled up to 472 bytes in fp32
# and 580 in fp64; 8 warps with 2 stages spill none). bench/gpu/bench_gpu.py --sweep times
# alternatives on a card.
GPU_TILES = {
    torch.float32: dict(block_m=64, block_w=64, block_k=32, num_warps=8, num_stages=2),
    torch.bfloat16: dict(block_m=64, block_w=64, block_k=32, num_warps=8, num_stages=2),
    torch.float16: dict(block_m=64, block_w=64, block_k=32, num_warps=8, num_stages=2),
    torch.float64: dict(block_m=32, block_w=64, block_k=32, num_warps=8, num_stages=2),
}


def tile_sizes(spec: LinearSpec, interpret: bool, dtype: torch.dtype = torch.float32) -> Tuple[int, int]:
    """(block_w, block_u): tiles of output and input channels (>= 16, the tl.dot minimum). The
    interpreter pays per program instance, so it gets whole blocks when it can."""
    if interpret:
        cap_w, cap_u = 128, 128
    else:
        t = GPU_TILES[dtype]
        cap_w, cap_u = t["block_w"], t["block_k"]
    mo = max((b.mul for b in spec.out_layout.blocks), default=1)
    mi = max((b.mul for b in spec.in_layout.blocks), default=1)
    return min(max(pow2(mo), 16), cap_w), min(max(pow2(mi), 16), cap_u)


def block_m(n: int, max_ir_dim: int, dtype: torch.dtype, interpret: bool) -> int:
    """GEMM rows (pairs (n, m)) per forward program: at least the largest irrep's 2l+1 (a program
    holds whole rows; with fewer, l >= 16 in fp64 or >= 32 in fp32 left its columns unwritten,
    found in review)."""
    if interpret:
        return max(min(max(pow2(n * max_ir_dim), 16), 512), pow2(max_ir_dim))
    return max(GPU_TILES[dtype]["block_m"], pow2(max_ir_dim))


def block_n_wgrad(n: int, dtype: torch.dtype, interpret: bool) -> int:
    """Rows per step of the weight gradient's reduction. 16-bit types take 64; fp32 and fp64 take
    32: fp32 (tf32x3) at 64 spilled on sm_90, 36 B with triton 3.6 (the device machine's) and
    156-380 B with both gates (a higher derivative), and at 32 spills none with triton 3.6 or 3.7."""
    if interpret:
        return min(max(pow2(n), 16), 128)
    return 64 if dtype in (torch.bfloat16, torch.float16) else 32


def _launch_options(dtype: torch.dtype, interpret: bool) -> dict:
    if interpret:
        return dict(num_warps=1)
    t = GPU_TILES[dtype]
    return dict(num_warps=t["num_warps"], num_stages=t["num_stages"])


def fwd_launch(n: int, num_tasks: int, max_ir_dim: int, bm: int) -> Tuple[int, Tuple[int]]:
    """(row groups, 1-D grid) of the forward: each task gets ``cdiv(n, bm // max_ir_dim)`` programs
    (a task of smaller 2l+1 needs fewer; its surplus programs return at once)."""
    rows_per_program = max(bm // max(max_ir_dim, 1), 1)
    groups = -(-n // rows_per_program)
    return groups, check_grid((groups * num_tasks,), "gated_linear forward")


def wgrad_launch(n: int, num_wtasks: int, bn: int, num_sms: int, interpret: bool) -> Tuple[int, int, Tuple[int]]:
    """(splits, rows per split, 1-D grid) of the weight gradient: about 8 programs per SM, each
    split keeping >= 4 row blocks."""
    splits = 1
    if not interpret:
        splits = max(1, min(-(-8 * num_sms // max(num_wtasks, 1)), -(-n // (4 * bn))))
    rows_per_split = -(-(-(-n // splits)) // bn) * bn
    splits = -(-n // rows_per_split)
    return splits, rows_per_split, check_grid((num_wtasks * splits,), "gated_linear weight gradient")


# ============================================================================ kernels
if triton is not None:
    # table columns as compile-time constants (linear_spec names them)
    _TF = tl.constexpr(ls.TASK_FIELDS)
    _T_COL0, _T_COL_SU, _T_COL_SM = tl.constexpr(ls.T_COL0), tl.constexpr(ls.T_COL_SU), tl.constexpr(ls.T_COL_SM)
    _T_W0, _T_MUL_OUT, _T_IR_DIM = tl.constexpr(ls.T_W0), tl.constexpr(ls.T_MUL_OUT), tl.constexpr(ls.T_IR_DIM)
    _T_GATE, _T_SCALAR, _T_BIAS = tl.constexpr(ls.T_GATE), tl.constexpr(ls.T_SCALAR), tl.constexpr(ls.T_BIAS)
    _T_INS_LO, _T_INS_HI = tl.constexpr(ls.T_INS_LO), tl.constexpr(ls.T_INS_HI)
    _IF = tl.constexpr(ls.INS_FIELDS)
    _I_IN_OFF, _I_IN_SU, _I_IN_SM = tl.constexpr(ls.I_IN_OFF), tl.constexpr(ls.I_IN_SU), tl.constexpr(ls.I_IN_SM)
    _I_MUL_IN, _I_GATE_IN, _I_W_OFF = tl.constexpr(ls.I_MUL_IN), tl.constexpr(ls.I_GATE_IN), tl.constexpr(ls.I_W_OFF)
    _I_W_SU, _I_W_SW = tl.constexpr(ls.I_W_SU), tl.constexpr(ls.I_W_SW)
    _GF = tl.constexpr(ls.WTASK_FIELDS)
    _G_IN_OFF, _G_IN_SU, _G_IN_SM = tl.constexpr(ls.G_IN_OFF), tl.constexpr(ls.G_IN_SU), tl.constexpr(ls.G_IN_SM)
    _G_MUL_IN, _G_GATE_IN = tl.constexpr(ls.G_MUL_IN), tl.constexpr(ls.G_GATE_IN)
    _G_OUT_OFF, _G_OUT_SU, _G_OUT_SM = tl.constexpr(ls.G_OUT_OFF), tl.constexpr(ls.G_OUT_SU), tl.constexpr(ls.G_OUT_SM)
    _G_MUL_OUT, _G_GATE_OUT, _G_IR_DIM = tl.constexpr(ls.G_MUL_OUT), tl.constexpr(ls.G_GATE_OUT), tl.constexpr(ls.G_IR_DIM)
    _G_W_OFF, _G_W_SU, _G_W_SW = tl.constexpr(ls.G_W_OFF), tl.constexpr(ls.G_W_SU), tl.constexpr(ls.G_W_SW)
    _G_U0, _G_W0, _G_INS = tl.constexpr(ls.G_U0), tl.constexpr(ls.G_W0), tl.constexpr(ls.G_INS)

    @triton.jit
    def _gl_epilogue(acc, gpost_ptr, b_ptr, add_ptr, rows64, ws, w_ok, tile_ok, gate_out, bias0, scal,
                     stride_qn, stride_qg, stride_an, stride_as,
                     HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, ACC: tl.constexpr):
        """The forward tile's epilogue: gate multiply, bias, additive terms (in the accumulator)."""
        if HAS_POST:
            g = tl.load(gpost_ptr + rows64[:, None] * stride_qn + ((gate_out + ws) * stride_qg)[None, :],
                        mask=tl.where(gate_out >= 0, tile_ok, False), other=1.0)
            acc = acc * g.to(ACC)
        if HAS_BIAS:
            b = tl.load(b_ptr + bias0 + ws, mask=tl.where(bias0 >= 0, w_ok, False), other=0.0)
            acc = acc + b.to(ACC)[None, :]
        if HAS_ADD:
            a = tl.load(add_ptr + rows64[:, None] * stride_an + ((scal + ws) * stride_as)[None, :],
                        mask=tl.where(scal >= 0, tile_ok, False), other=0.0)
            acc = acc + a.to(ACC)
        return acc

    @triton.jit
    def _gl_fwd_kernel(
        x_ptr, w_ptr, pw_ptr, b_ptr, gpre_ptr, gpost_ptr, add_ptr, out_ptr, u_ptr,
        task_ptr, ins_ptr,
        N, T,
        stride_xn, stride_xd,
        stride_on, stride_od,
        stride_pn, stride_pg,  # prologue gates; stride_pn == 0 when shared
        stride_qn, stride_qg,  # epilogue gates; stride_qn == 0 when shared
        stride_an, stride_as,  # additive; stride_an == 0 when shared
        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
        HAS_U: tl.constexpr = False,  # also store the pre-gate output L_W(G_pre ⊙ x) to u (strides of out)
    ):
        pid = tl.program_id(0)
        pid_t = pid % T  # consecutive programs: same rows, other tasks (x stays in L2)
        pid_r = pid // T
        tp = task_ptr + pid_t * _TF
        ir_dim = tl.load(tp + _T_IR_DIM)
        rows_per_program = BLOCK_M // ir_dim
        n0 = pid_r * rows_per_program  # >= N for the surplus programs of a task of small 2l+1:
        # they run no instruction and store nothing (every row masked)
        col0 = tl.load(tp + _T_COL0)  # output column of (w = 0, m = 0)
        col_su = tl.load(tp + _T_COL_SU)  # output column stride of the channel w
        col_sm = tl.load(tp + _T_COL_SM)  # output column stride of the component m
        w0 = tl.load(tp + _T_W0)
        mul_out = tl.load(tp + _T_MUL_OUT)
        gate_out = tl.load(tp + _T_GATE)  # gate of channel 0, -1 for 0e blocks
        scal = tl.load(tp + _T_SCALAR)  # additive index of channel 0, -1 unless 0e
        bias0 = tl.load(tp + _T_BIAS)  # bias index of channel 0, -1 without bias
        ins_lo = tl.load(tp + _T_INS_LO)
        ins_hi = tl.load(tp + _T_INS_HI)
        ins_hi = tl.where(n0 < N, ins_hi, ins_lo)

        r = tl.arange(0, BLOCK_M)  # GEMM row = (local row, component)
        nl = r // ir_dim
        m = r - nl * ir_dim
        rows = n0 + nl
        row_ok = (nl < rows_per_program) & (rows < N)
        rows64 = rows.to(tl.int64)
        ws = w0 + tl.arange(0, BLOCK_W)
        w_ok = ws < mul_out
        ks = tl.arange(0, BLOCK_K)
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=ACC)

        for i in range(ins_lo, ins_hi):
            ip = ins_ptr + i * _IF
            in_off = tl.load(ip + _I_IN_OFF)
            in_su = tl.load(ip + _I_IN_SU)
            in_sm = tl.load(ip + _I_IN_SM)
            mul_in = tl.load(ip + _I_MUL_IN)
            gate_in = tl.load(ip + _I_GATE_IN)
            w_off = tl.load(ip + _I_W_OFF)
            w_su = tl.load(ip + _I_W_SU)
            w_sw = tl.load(ip + _I_W_SW)
            pw = tl.load(pw_ptr + i).to(ACC)
            x_row = x_ptr + rows64 * stride_xn + (in_off + m * in_sm) * stride_xd  # [BLOCK_M]
            for k0 in range(0, mul_in, BLOCK_K):
                us = k0 + ks
                u_ok = us < mul_in
                xm = row_ok[:, None] & u_ok[None, :]
                xt = tl.load(x_row[:, None] + (us * in_su * stride_xd)[None, :], mask=xm, other=0.0)
                if HAS_PRE:
                    g = tl.load(gpre_ptr + rows64[:, None] * stride_pn + ((gate_in + us) * stride_pg)[None, :],
                                mask=tl.where(gate_in >= 0, xm, False), other=1.0)
                    xt = (xt.to(ACC) * g.to(ACC)).to(dt)
                wt = tl.load(w_ptr + w_off + us[:, None] * w_su + ws[None, :] * w_sw,
                             mask=u_ok[:, None] & w_ok[None, :], other=0.0)
                acc += tl.dot(xt.to(DOT), wt.to(DOT), input_precision=PREC, out_dtype=ACC) * pw

        tile_ok = row_ok[:, None] & w_ok[None, :]
        out_cols = ((col0 + m * col_sm) * stride_od)[:, None] + (ws * col_su * stride_od)[None, :]
        if HAS_U:  # the same tile before the gate, bias and additive: the gate gradient's operand
            tl.store(u_ptr + (rows64 * stride_on)[:, None] + out_cols, acc.to(u_ptr.dtype.element_ty), mask=tile_ok)
        acc = _gl_epilogue(acc, gpost_ptr, b_ptr, add_ptr, rows64, ws, w_ok, tile_ok, gate_out, bias0, scal,
                           stride_qn, stride_qg, stride_an, stride_as, HAS_POST, HAS_BIAS, HAS_ADD, ACC)
        tl.store(out_ptr + (rows64 * stride_on)[:, None] + out_cols, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _gl_wgrad_kernel(
        a_ptr, b_ptr, gpre_ptr, gpost_ptr, pw_ptr, out_ptr, wtask_ptr,
        N, S, rows_per_split,
        stride_an, stride_ad,
        stride_bn, stride_bd,
        stride_pn, stride_pg,
        stride_qn, stride_qg,
        stride_os,  # partial-buffer stride of the row split (0 when there is one split)
        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_t = pid // S  # consecutive programs: the splits of one task (heaviest tasks first)
        pid_s = pid % S
        tp = wtask_ptr + pid_t * _GF
        in_off = tl.load(tp + _G_IN_OFF)
        in_su = tl.load(tp + _G_IN_SU)
        in_sm = tl.load(tp + _G_IN_SM)
        mul_in = tl.load(tp + _G_MUL_IN)
        gate_in = tl.load(tp + _G_GATE_IN)
        out_off = tl.load(tp + _G_OUT_OFF)
        out_su = tl.load(tp + _G_OUT_SU)
        out_sm = tl.load(tp + _G_OUT_SM)
        mul_out = tl.load(tp + _G_MUL_OUT)
        gate_out = tl.load(tp + _G_GATE_OUT)
        ir_dim = tl.load(tp + _G_IR_DIM)
        w_off = tl.load(tp + _G_W_OFF)
        w_su = tl.load(tp + _G_W_SU)
        w_sw = tl.load(tp + _G_W_SW)
        u0 = tl.load(tp + _G_U0)
        w0 = tl.load(tp + _G_W0)
        ins = tl.load(tp + _G_INS)
        pw = tl.load(pw_ptr + ins).to(ACC)

        us = u0 + tl.arange(0, BLOCK_U)
        u_ok = us < mul_in
        ws = w0 + tl.arange(0, BLOCK_W)
        w_ok = ws < mul_out
        dt = a_ptr.dtype.element_ty
        n_lo = pid_s * rows_per_split
        n_hi = tl.minimum(n_lo + rows_per_split, N)
        acc = tl.zeros((BLOCK_U, BLOCK_W), dtype=ACC)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            r_ok = rows < n_hi
            rows64 = rows.to(tl.int64)
            am = r_ok[:, None] & u_ok[None, :]
            bm = r_ok[:, None] & w_ok[None, :]
            if HAS_PRE:
                gp = tl.load(gpre_ptr + rows64[:, None] * stride_pn + ((gate_in + us) * stride_pg)[None, :],
                             mask=tl.where(gate_in >= 0, am, False), other=1.0).to(ACC)
            if HAS_POST:
                gq = tl.load(gpost_ptr + rows64[:, None] * stride_qn + ((gate_out + ws) * stride_qg)[None, :],
                             mask=tl.where(gate_out >= 0, bm, False), other=1.0).to(ACC)
            a_row = a_ptr + rows64 * stride_an
            b_row = b_ptr + rows64 * stride_bn
            for m in range(0, ir_dim):
                at = tl.load(a_row[:, None] + ((in_off + us * in_su + m * in_sm) * stride_ad)[None, :],
                             mask=am, other=0.0)
                bt = tl.load(b_row[:, None] + ((out_off + ws * out_su + m * out_sm) * stride_bd)[None, :],
                             mask=bm, other=0.0)
                if HAS_PRE:
                    at = (at.to(ACC) * gp).to(dt)
                if HAS_POST:
                    bt = (bt.to(ACC) * gq).to(dt)
                acc += tl.dot(tl.trans(at.to(DOT)), bt.to(DOT), input_precision=PREC, out_dtype=ACC)
        acc = acc * pw
        tl.store(out_ptr + pid_s * stride_os + w_off + us[:, None] * w_su + ws[None, :] * w_sw,
                 acc.to(out_ptr.dtype.element_ty), mask=u_ok[:, None] & w_ok[None, :])


_TL_DTYPES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
              torch.bfloat16: "bfloat16"}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_dtype(dtype: torch.dtype, interpret: bool):
    """tl.dot operand dtype: the storage dtype, except bf16 under the interpreter (its numpy
    matmul multiplies the raw bf16 bit patterns), which goes through fp32: exact for bf16 inputs,
    with the same fp32 accumulation."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"the triton backend supports float64/32/16 and bfloat16, not {dtype}")
    if dtype == torch.bfloat16 and interpret:
        return tl.float32
    return getattr(tl, _TL_DTYPES[dtype])


def _precision(dtype: torch.dtype) -> str:
    return fp32_precision() if dtype == torch.float32 else "ieee"


def _gate_strides(g: Optional[torch.Tensor]) -> Tuple[int, int]:
    if g is None:
        return 0, 0
    return (0, g.stride(0)) if g.dim() == 1 else (g.stride(0), g.stride(1))


def tables(spec: LinearSpec, device: torch.device, dtype: torch.dtype = torch.float32) -> LinearTables:
    """The task tables for launches on ``device`` in ``dtype``; cached on the spec per (device,
    dtype) (every launch asks: the tile sizes cost ~6 µs of host time to recompute)."""
    cache = spec.__dict__.setdefault("_launch_tables", {})
    key = (device, dtype)
    hit = cache.get(key)
    if hit is None:
        bw, bu = tile_sizes(spec, interpreting(device), dtype)
        hit = linear_tables(spec, device, bw, bu)
        if device.type != "cuda" or device.index is not None:  # "cuda" alone follows the current device
            cache[key] = hit
    return hit


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
                   additive: Optional[torch.Tensor], spec: LinearSpec) -> torch.Tensor:
    """Kernel-level ``G_post ⊙ L_W(G_pre ⊙ x) + bias + additive`` on 2-D ``x`` (no autograd)."""
    return _forward(x, weight, bias, g_pre, g_post, additive, spec, False)[0]


def triton_forward_u(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
                     additive: Optional[torch.Tensor], spec: LinearSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`triton_forward` and the pre-gate output ``u = L_W(G_pre ⊙ x)`` (no gate, bias or
    additive), stored by the same program from the same accumulator (no autograd)."""
    return _forward(x, weight, bias, g_pre, g_post, additive, spec, True)


def _forward(x, weight, bias, g_pre, g_post, additive, spec: LinearSpec, with_u: bool):
    N = x.shape[0]
    out = x.new_empty((N, spec.dim_out))
    u = x.new_empty((N, spec.dim_out)) if with_u else None  # every element stored, as out's
    if N == 0 or spec.dim_out == 0:
        return out, u
    t = tables(spec, x.device, x.dtype)
    if t.num_tasks == 0:
        return out, u
    interpret = interpreting(x.device)
    bm = block_m(N, t.max_ir_dim, x.dtype, interpret)
    _, grid = fwd_launch(N, t.num_tasks, t.max_ir_dim, bm)
    has_pre = g_pre is not None and g_pre.shape[-1] > 0
    has_post = g_post is not None and g_post.shape[-1] > 0
    has_bias = bias is not None and bias.numel() > 0
    has_add = additive is not None and additive.shape[-1] > 0
    # the kernel reads weight and bias by offset (a strided view would be read wrong); gates and
    # additive terms go with their strides
    weight, bias = weight.contiguous(), (None if bias is None else bias.contiguous())
    x, g_pre, g_post, additive = cols32(x), cols32(g_pre), cols32(g_post), cols32(additive)
    dummy = x
    with device_guard(x.device):
        _gl_fwd_kernel[grid](
            x, weight if weight.numel() > 0 else dummy,
            t.path_weights if t.path_weights.numel() > 0 else t.tasks,
            bias if has_bias else dummy, g_pre if has_pre else dummy, g_post if has_post else dummy,
            additive if has_add else dummy, out, u if with_u else dummy,
            t.tasks, t.instructions if t.instructions.numel() > 0 else t.tasks,
            N, t.num_tasks,
            x.stride(0), x.stride(1),
            out.stride(0), out.stride(1),
            *_gate_strides(g_pre if has_pre else None),
            *_gate_strides(g_post if has_post else None),
            *_gate_strides(additive if has_add else None),
            HAS_PRE=has_pre, HAS_POST=has_post, HAS_BIAS=has_bias, HAS_ADD=has_add,
            ACC=_acc(x.dtype), DOT=_dot_dtype(x.dtype, interpret), PREC=_precision(x.dtype),
            BLOCK_M=bm, BLOCK_K=t.block_u, BLOCK_W=t.block_w, HAS_U=with_u,
            **_launch_options(x.dtype, interpret),
        )
    return out, u


def triton_wgrad(a: torch.Tensor, b: torch.Tensor, g_pre: Optional[torch.Tensor],
                 g_post: Optional[torch.Tensor], spec: LinearSpec) -> torch.Tensor:
    """Kernel-level flat weight gradient ``dW_i[u, w] = pw_i Σ_{n,m} (G_pre⊙a)[n,in(u,m)] (G_post⊙b)[n,out(w,m)]``."""
    N = a.shape[0]
    numel = spec.weight_numel
    if numel == 0:
        return a.new_zeros((0,))
    t = tables(spec, a.device, a.dtype)
    if N == 0 or t.num_wtasks == 0:
        return a.new_zeros((numel,))
    interpret = interpreting(a.device)
    bn = block_n_wgrad(N, a.dtype, interpret)
    splits, rows_per_split, grid = wgrad_launch(N, t.num_wtasks, bn, _num_sms(a.device), interpret)
    if splits == 1:
        dst = a.new_zeros((1, numel))
    else:
        dst = torch.zeros((splits, numel), dtype=torch.float64 if a.dtype == torch.float64 else torch.float32,
                          device=a.device)
    has_pre = g_pre is not None and g_pre.shape[-1] > 0
    has_post = g_post is not None and g_post.shape[-1] > 0
    a, b, g_pre, g_post = cols32(a), cols32(b), cols32(g_pre), cols32(g_post)
    with device_guard(a.device):
        _gl_wgrad_kernel[grid](
            a, b, g_pre if has_pre else a, g_post if has_post else a, t.path_weights, dst, t.wtasks,
            N, splits, rows_per_split,
            a.stride(0), a.stride(1),
            b.stride(0), b.stride(1),
            *_gate_strides(g_pre if has_pre else None),
            *_gate_strides(g_post if has_post else None),
            dst.stride(0),
            HAS_PRE=has_pre, HAS_POST=has_post,
            ACC=_acc(a.dtype), DOT=_dot_dtype(a.dtype, interpret), PREC=_precision(a.dtype),
            BLOCK_N=bn, BLOCK_U=t.block_u, BLOCK_W=t.block_w,
            **_launch_options(a.dtype, interpret),
        )
    if splits == 1:
        return dst[0]
    return dst.sum(0).to(a.dtype)
