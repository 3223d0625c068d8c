"""Triton kernels of the fused gate (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``, which
must be set before this module is imported).

One 1-D grid over blocks of ``BLOCK_N`` rows (the row base in int64; no grid dimension grows with
anything but N / BLOCK_N); each program loops over the columns in ``BLOCK_D`` tiles, with masked
pointer arithmetic and per-column tables (spec.GateTables):

* forward, per output column: ``a = x[src]`` (scalar) or ``x[gate column]`` (gated), ``v = cst·f(a)``;
  ``y = v`` (scalar) or ``x[src]·v`` (gated): one activation per output element.
* backward, per input column: ``(f, f')`` of ``x`` (scalar, gate) or of its gate's input (gated);
  ``dx = dy[dst]·cst·f'`` (scalar), ``dy[dst]·cst·f`` (gated), ``cst·f'·Σ_w dy[w]·x[w]`` over the
  gate's members (gate: a ``[BLOCK_N, BLOCK_D, W]`` gather, W = the widest gate, a power of 2).
* double backward (the gradients of ``<dx, v>``: a force step's second derivatives, when no graph
  is recorded), one launch, two column loops: per output column ``gdy = v[src]·cst·f'`` (scalar),
  ``v[src]·cst·f + x[src]·cst·f'·v[gate]`` (gated); per input column ``gx = v·dy[dst]·cst·f''``
  (scalar), ``cst·f'·v[gate]·dy[dst]`` (gated), ``cst·f''·v·Σ_w dy·x + cst·f'·Σ_w v·dy`` (gate).

Activations are selected per column by code; only the codes a spec uses are compiled in (USED,
a constexpr bitmask). fp64 computes in fp64, everything else in fp32. No autotune.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from .._utils import device_guard, pow2, tl, triton
from .spec import GateTables

# whether this module's kernels were decorated in interpreter mode
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def available(device) -> Tuple[bool, str]:
    """The gate primitives' Triton conditions, and the interpreter set before this module's import."""
    from ..gate.triton import available as primitives_available

    ok, why = primitives_available(device)
    if ok and torch.device(device).type == "cpu" and not _INTERPRETED_AT_IMPORT:
        return False, ("TRITON_INTERPRET=1 was set after mmea_kernels.ops.fused_gate.triton was imported; set it "
                       "before importing to run the triton backend on CPU tensors")
    return ok, why


if triton is not None:

    @triton.jit
    def _act(a, code, USED: tl.constexpr):
        """(f(a), f'(a)) for the activation code of each element."""
        f = a
        d = tl.full(a.shape, 1.0, a.dtype)
        if USED & 0b1100110:  # silu, sigmoid, softplus, ssp: one exp
            e = tl.exp(-tl.abs(a))  # exp(-|a|) <= 1: no overflow
            s = tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(a)
            if USED & 0b10:
                f = tl.where(code == 1, a * s, f)
                d = tl.where(code == 1, s * (1.0 + a * (1.0 - s)), d)
            if USED & 0b100:
                f = tl.where(code == 2, s, f)
                d = tl.where(code == 2, s * (1.0 - s), d)
            if USED & 0b1100000:
                sp = tl.where(a > 20.0, a, tl.maximum(a, 0.0) + tl.log(1.0 + e))
                sd = tl.where(a > 20.0, 1.0, s)
                f = tl.where(code == 5, sp, f)
                f = tl.where(code == 6, sp - 0.6931471805599453, f)
                d = tl.where((code == 5) | (code == 6), sd, d)
        if USED & 0b1000:
            e2 = tl.exp(-2.0 * tl.abs(a))
            t = (1.0 - e2) / (1.0 + e2)
            t = tl.where(a < 0, -t, t)
            f = tl.where(code == 3, t, f)
            d = tl.where(code == 3, 1.0 - t * t, d)
        if USED & 0b10000:
            f = tl.where(code == 4, tl.abs(a), f)
            d = tl.where(code == 4, tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0)), d)
        return f, d

    @triton.jit
    def _act_d2(a, code, USED: tl.constexpr):
        """f''(a) for the activation code of each element (0 for identity and abs)."""
        dd = tl.zeros(a.shape, a.dtype)
        if USED & 0b1100110:
            e = tl.exp(-tl.abs(a))
            s = tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            ds = s * (1.0 - s)
            if USED & 0b10:
                dd = tl.where(code == 1, ds * (2.0 + a * (1.0 - 2.0 * s)), dd)
            if USED & 0b100:
                dd = tl.where(code == 2, ds * (1.0 - 2.0 * s), dd)
            if USED & 0b1100000:
                dd = tl.where((code == 5) | (code == 6), tl.where(a > 20.0, 0.0, ds), dd)
        if USED & 0b1000:
            e2 = tl.exp(-2.0 * tl.abs(a))
            t = (1.0 - e2) / (1.0 + e2)
            t = tl.where(a < 0, -t, t)
            dd = tl.where(code == 3, -2.0 * t * (1.0 - t * t), dd)
        return dd

    @triton.jit
    def _cols(cols_ptr, cst_ptr, cols, col_ok, D, ACC: tl.constexpr):
        """A column tile's entries of a [4, D] table (kind, src or dst, code, gate input column) and cst."""
        kind = tl.load(cols_ptr + cols, mask=col_ok, other=0)
        other = tl.load(cols_ptr + D + cols, mask=col_ok, other=0)
        code = tl.load(cols_ptr + 2 * D + cols, mask=col_ok, other=0)
        gsrc = tl.load(cols_ptr + 3 * D + cols, mask=col_ok, other=0)
        cst = tl.load(cst_ptr + cols, mask=col_ok, other=1.0).to(ACC)
        return kind, other, code, gsrc, cst

    @triton.jit
    def _members(mem_ptr, cols, col_ok, is_gate, row_ok, DIN, W: tl.constexpr):
        """The gate columns' members: (input column, output column) offsets [BLOCK_D, W], and which
        (row, column, member) exist [BLOCK_N, BLOCK_D, W]."""
        moff = cols[:, None] * W + tl.arange(0, W).to(tl.int64)[None, :]
        mok = col_ok[:, None] & is_gate[:, None]
        mx = tl.load(mem_ptr + moff, mask=mok, other=-1)
        my = tl.load(mem_ptr + DIN * W + moff, mask=mok, other=-1)
        return tl.maximum(mx, 0), tl.maximum(my, 0), row_ok[:, None, None] & (mx >= 0)[None, :, :]

    @triton.jit
    def _fwd_kernel(x_ptr, y_ptr, cols_ptr, cst_ptr, N, DIN, DOUT,
                    USED: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        xrow = x_ptr + rows[:, None] * DIN
        for d0 in range(0, DOUT, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < DOUT
            kind, src, code, gsrc, cst = _cols(cols_ptr, cst_ptr, cols, col_ok, DOUT, ACC)
            ok = row_ok[:, None] & col_ok[None, :]
            xv = tl.load(xrow + src[None, :], mask=ok, other=0.0).to(ACC)
            a = tl.load(xrow + gsrc[None, :], mask=ok, other=0.0).to(ACC)  # gsrc == src for scalars
            f, _ = _act(a, code[None, :], USED)
            v = cst[None, :] * f
            y = tl.where(kind[None, :] == 0, v, xv * v)
            tl.store(y_ptr + rows[:, None] * DOUT + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _bwd_kernel(x_ptr, dy_ptr, dx_ptr, cols_ptr, cst_ptr, mem_ptr, N, DIN, DOUT,
                    USED: tl.constexpr, ACC: tl.constexpr, W: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        xrow = x_ptr + rows[:, None] * DIN
        dyrow = dy_ptr + rows[:, None] * DOUT
        for d0 in range(0, DIN, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < DIN
            kind, dst, code, gsrc, cst = _cols(cols_ptr, cst_ptr, cols, col_ok, DIN, ACC)
            ok = row_ok[:, None] & col_ok[None, :]
            a = tl.load(xrow + gsrc[None, :], mask=ok, other=0.0).to(ACC)  # x itself unless gated
            f, d = _act(a, code[None, :], USED)
            is_gate = kind == 2
            dyv = tl.load(dyrow + dst[None, :], mask=ok & (~is_gate)[None, :], other=0.0).to(ACC)
            # gate columns: sum over the members (input column, output column) of dy * x
            mx, my, valid = _members(mem_ptr, cols, col_ok, is_gate, row_ok, DIN, W)
            gx = tl.load(xrow[:, :, None] + mx[None, :, :], mask=valid, other=0.0).to(ACC)
            gdy = tl.load(dyrow[:, :, None] + my[None, :, :], mask=valid, other=0.0).to(ACC)
            sg = tl.sum(gx * gdy, axis=2)
            k = kind[None, :]
            c = cst[None, :]
            dx = tl.where(k == 0, dyv * c * d, tl.where(k == 1, dyv * c * f, c * d * sg))
            tl.store(dx_ptr + rows[:, None] * DIN + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


    @triton.jit
    def _dbwd_kernel(x_ptr, dy_ptr, v_ptr, gx_ptr, gdy_ptr, fcols_ptr, fcst_ptr, bcols_ptr, bcst_ptr, mem_ptr,
                     N, DIN, DOUT, USED: tl.constexpr, ACC: tl.constexpr, W: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        xrow = x_ptr + rows[:, None] * DIN
        vrow = v_ptr + rows[:, None] * DIN
        dyrow = dy_ptr + rows[:, None] * DOUT
        for d0 in range(0, DOUT, BLOCK_D):  # gdy, per output column
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < DOUT
            kind, src, code, gsrc, c = _cols(fcols_ptr, fcst_ptr, cols, col_ok, DOUT, ACC)
            c = c[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            a = tl.load(xrow + gsrc[None, :], mask=ok, other=0.0).to(ACC)
            f, d = _act(a, code[None, :], USED)
            vs = tl.load(vrow + src[None, :], mask=ok, other=0.0).to(ACC)
            gated = ok & (kind == 1)[None, :]
            xs = tl.load(xrow + src[None, :], mask=gated, other=0.0).to(ACC)
            vg = tl.load(vrow + gsrc[None, :], mask=gated, other=0.0).to(ACC)
            gdy = tl.where(kind[None, :] == 0, vs * c * d, vs * c * f + xs * c * d * vg)
            tl.store(gdy_ptr + rows[:, None] * DOUT + cols[None, :], gdy.to(gdy_ptr.dtype.element_ty), mask=ok)
        for d0 in range(0, DIN, BLOCK_D):  # gx, per input column
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < DIN
            kind, dst, code, gsrc, c = _cols(bcols_ptr, bcst_ptr, cols, col_ok, DIN, ACC)
            c = c[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            a = tl.load(xrow + gsrc[None, :], mask=ok, other=0.0).to(ACC)  # x itself unless gated
            f, d = _act(a, code[None, :], USED)
            dd = _act_d2(a, code[None, :], USED)
            vg = tl.load(vrow + gsrc[None, :], mask=ok, other=0.0).to(ACC)  # v itself unless gated
            is_gate = kind == 2
            dyv = tl.load(dyrow + dst[None, :], mask=ok & (~is_gate)[None, :], other=0.0).to(ACC)
            mx, my, valid = _members(mem_ptr, cols, col_ok, is_gate, row_ok, DIN, W)
            mxx = tl.load(xrow[:, :, None] + mx[None, :, :], mask=valid, other=0.0).to(ACC)
            mvv = tl.load(vrow[:, :, None] + mx[None, :, :], mask=valid, other=0.0).to(ACC)
            mdy = tl.load(dyrow[:, :, None] + my[None, :, :], mask=valid, other=0.0).to(ACC)
            s1 = tl.sum(mdy * mxx, axis=2)
            s2 = tl.sum(mvv * mdy, axis=2)
            k = kind[None, :]
            gx = tl.where(k == 0, vg * dyv * c * dd, tl.where(k == 1, c * d * vg * dyv, c * dd * vg * s1 + c * d * s2))
            tl.store(gx_ptr + rows[:, None] * DIN + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=ok)


def _blocks(n: int, d: int, w: int, interpret: bool, wide: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps): the interpreter pays per program, the GPU per register.
    ``wide``: fp64 forward, half the elements per tile (at 16 x 128 its live values took 255
    registers and spilled 64-268 B on sm_90 with triton 3.6; 8 x 128 does not spill). The gathered
    tiles (``w`` > 1, the backward's) take 8 warps: at 4, the fp64 double backward held 238-240
    registers, and the fp32 backward with every activation spilled 4 B under triton 3.9 (80
    registers); at 8 both are at 40-128 registers without spills on triton 3.7.1 and 3.9.0."""
    if interpret:
        return min(pow2(n), 64), min(pow2(d), 1024), 1
    block_d = min(pow2(d), 128 if w <= 2 else 64)
    block_n = min(pow2(n), max(1, (1024 if wide else 2048) // (block_d * w)), 32)
    return block_n, block_d, 8 if w > 1 else 4


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(x: torch.Tensor, t: GateTables) -> torch.Tensor:
    N, DIN = x.shape
    DOUT = t.spec.d_out
    y = torch.empty((N, DOUT), dtype=x.dtype, device=x.device)
    if N == 0 or DOUT == 0:
        return y
    bn, bd, nw = _blocks(N, DOUT, 1, x.device.type != "cuda" or _INTERPRETED_AT_IMPORT, x.dtype == torch.float64)
    with device_guard(x.device):
        _fwd_kernel[(triton.cdiv(N, bn),)](x, y, t.fwd_cols, t.fwd_cst, N, DIN, DOUT, USED=t.used,
                                           ACC=_acc(x.dtype), BLOCK_N=bn, BLOCK_D=bd, num_warps=nw)
    return y


def backward(x: torch.Tensor, dy: torch.Tensor, t: GateTables) -> torch.Tensor:
    N, DIN = x.shape
    DOUT = t.spec.d_out
    dx = torch.empty_like(x)
    if N == 0 or DIN == 0:
        return dx
    bn, bd, nw = _blocks(N, DIN, t.width, x.device.type != "cuda" or _INTERPRETED_AT_IMPORT)
    with device_guard(x.device):
        _bwd_kernel[(triton.cdiv(N, bn),)](x, dy, dx, t.bwd_cols, t.bwd_cst, t.members, N, DIN, DOUT,
                                           USED=t.used, ACC=_acc(x.dtype), W=t.width, BLOCK_N=bn, BLOCK_D=bd,
                                           num_warps=nw)
    return dx


def double_backward(x: torch.Tensor, dy: torch.Tensor, v: torch.Tensor, t: GateTables):
    """``(gx, gdy)``: the gradients of ``<backward(x, dy), v>`` (not differentiable again)."""
    N, DIN = x.shape
    DOUT = t.spec.d_out
    gx, gdy = torch.empty_like(x), torch.empty((N, DOUT), dtype=x.dtype, device=x.device)
    if N == 0 or (DIN == 0 and DOUT == 0):
        return gx, gdy
    bn, bd, nw = _blocks(N, max(DIN, DOUT), t.width, x.device.type != "cuda" or _INTERPRETED_AT_IMPORT)
    with device_guard(x.device):
        _dbwd_kernel[(triton.cdiv(N, bn),)](x, dy, v, gx, gdy, t.fwd_cols, t.fwd_cst, t.bwd_cols, t.bwd_cst,
                                            t.members, N, DIN, DOUT, USED=t.used, ACC=_acc(x.dtype), W=t.width,
                                            BLOCK_N=bn, BLOCK_D=bd, num_warps=nw)
    return gx, gdy
