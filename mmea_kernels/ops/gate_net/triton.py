"""Triton kernels of the MMEA gate network (CUDA, or CPU under ``TRITON_INTERPRET=1``): the GPU
counterpart of csrc/gate_net.cpp, for the fused Triton path of :class:`~mmea_kernels.nn.MMEALinear`.

Forward (one launch): per block of rows, ``h = x0 W_downᵀ + b_down`` (``tl.dot`` over tiles of the
0e input columns), ``z = SiLU(h)``, then per tile of output columns ``γ = z W_upᵀ + b_up``, stored
as the additive terms (the first A columns) or as ``φ(γ)`` (the gates). The torch composition is
four kernels (two GEMMs, SiLU, exp) and, with autograd, six recorded ops.

Backward (one launch; no graph): recomputes ``h`` and ``z``, forms ``dγ`` from ``dadd`` and
``dgates`` (times the saved gates for ``φ = exp``), ``dz = dγ W_up``, ``dh = dz · SiLU'(h)`` and
``dx0 = dh W_down``. When the weights need gradients it also writes ``dγ``, ``z`` and ``dh``, and
the weight and bias gradients are four torch GEMMs/sums over rows (deterministic). A forces pass
(weights not asked for) is the one kernel; the composition's backward is about eight.

fp32 dot products use the fused linear's precision (``MMEA_FP32_DOT``, default ``tf32x3``), fp64
plain FMA. The rank is padded to a power of two >= 16 (``tl.dot``'s minimum); ranks above 32 run
the torch composition (at rank 32 the fp64 backward spills ~200 bytes on sm_90; rank 16, the
default, spills none).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._utils import check_grid, device_guard, interpreting, pow2, tl, triton
from ..gated_linear.triton_kernels import _acc, _precision

__all__ = ["triton_gate_net_fwd", "triton_gate_net_bwd", "MAX_RANK", "DTYPES"]

MAX_RANK = 32  # rank padded to 64 spilled 160 (fp32) to 868 (fp64) bytes on sm_90; 32: none in fp32
DTYPES = (torch.float32, torch.float64)


def _blocks(n: int, s: int, n_out: int, interpret: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_S, BLOCK_O, num_warps); every block >= 16 (``tl.dot``). GPU tiles: the
    largest without register spills on sm_90 in fp32 (tf32x3) and fp64 with one pipeline stage
    (bench/gpu/kernel_report.py: 64-column output tiles spilled 240-712 bytes in the backward)."""
    if interpret:  # the interpreter pays per program instance: whole blocks where it can
        return max(16, min(pow2(n), 128)), max(16, min(pow2(s), 128)), max(16, min(pow2(n_out), 256)), 1
    return 32, 32, 32, 4


NUM_STAGES = 1


def _consts(dtype: torch.dtype) -> dict:
    """Accumulator type and dot precision, as the fused linear's kernels (fp32: ``MMEA_FP32_DOT``)."""
    return dict(ACC=_acc(dtype), PREC=_precision(dtype))


if triton is not None:

    @triton.jit
    def _hidden(x_ptr, wd_ptr, bd_ptr, rows64, row_ok, rs, r_ok, S, stride_xn,
                ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                R_P: tl.constexpr):
        """h = x0 W_downᵀ + b_down for the block's rows: [BLOCK_N, R_P] (padded rank columns 0)."""
        h = tl.zeros([BLOCK_N, R_P], dtype=ACC)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_ok = ss < S
            xt = tl.load(x_ptr + rows64[:, None] * stride_xn + ss[None, :], mask=row_ok[:, None] & s_ok[None, :],
                         other=0.0).to(ACC)
            wt = tl.load(wd_ptr + rs[None, :] * S + ss[:, None], mask=s_ok[:, None] & r_ok[None, :],
                         other=0.0).to(ACC)  # [BLOCK_S, R_P] = W_downᵀ
            h += tl.dot(xt, wt, input_precision=PREC, out_dtype=ACC)
        return h + tl.load(bd_ptr + rs, mask=r_ok, other=0.0).to(ACC)[None, :]

    @triton.jit
    def _gn_fwd_kernel(x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, add_ptr, g_ptr,
                       N, S, R, A, G,
                       stride_xn, stride_an, stride_gn,
                       PHI_EXP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, R_P: tl.constexpr, BLOCK_O: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)  # only the row offsets need 64 bits
        rs = tl.arange(0, R_P)
        r_ok = rs < R
        h = _hidden(x_ptr, wd_ptr, bd_ptr, rows64, row_ok, rs, r_ok, S, stride_xn, ACC, PREC, BLOCK_N, BLOCK_S, R_P)
        z = tl.where(r_ok[None, :], h / (1.0 + tl.exp(-h)), 0.0)
        for o0 in range(0, A + G, BLOCK_O):
            cols = o0 + tl.arange(0, BLOCK_O)
            c_ok = cols < A + G
            wt = tl.load(wu_ptr + cols[None, :] * R + rs[:, None], mask=r_ok[:, None] & c_ok[None, :],
                         other=0.0).to(ACC)  # [R_P, BLOCK_O] = W_upᵀ
            gam = tl.dot(z, wt, input_precision=PREC, out_dtype=ACC)
            gam += tl.load(bu_ptr + cols, mask=c_ok, other=0.0).to(ACC)[None, :]
            is_add = cols < A
            tl.store(add_ptr + rows64[:, None] * stride_an + cols[None, :], gam.to(add_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (c_ok & is_add)[None, :])
            if PHI_EXP:
                gv = tl.exp(gam)
            else:
                gv = 1.0 + gam
            tl.store(g_ptr + rows64[:, None] * stride_gn + (cols - A)[None, :], gv.to(g_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (c_ok & (cols >= A))[None, :])

    @triton.jit
    def _gn_bwd_kernel(x_ptr, wd_ptr, bd_ptr, wu_ptr, g_ptr, da_ptr, dg_ptr, dx_ptr, dgam_ptr, z_ptr, dh_ptr,
                       N, S, R, A, G,
                       stride_xn, stride_gn, stride_dan, stride_dgn, stride_dxn,
                       HAS_DA: tl.constexpr, HAS_DG: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                       PHI_EXP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, R_P: tl.constexpr, BLOCK_O: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        rs = tl.arange(0, R_P)
        r_ok = rs < R
        h = _hidden(x_ptr, wd_ptr, bd_ptr, rows64, row_ok, rs, r_ok, S, stride_xn, ACC, PREC, BLOCK_N, BLOCK_S, R_P)
        sg = 1.0 / (1.0 + tl.exp(-h))
        dz = tl.zeros([BLOCK_N, R_P], dtype=ACC)
        for o0 in range(0, A + G, BLOCK_O):
            cols = o0 + tl.arange(0, BLOCK_O)
            c_ok = cols < A + G
            is_add = cols < A
            m_add = row_ok[:, None] & (c_ok & is_add)[None, :]
            m_gate = row_ok[:, None] & (c_ok & (cols >= A))[None, :]
            dgam = tl.zeros([BLOCK_N, BLOCK_O], dtype=ACC)
            if HAS_DA:
                dgam += tl.load(da_ptr + rows64[:, None] * stride_dan + cols[None, :], mask=m_add, other=0.0).to(ACC)
            if HAS_DG:
                dgl = tl.load(dg_ptr + rows64[:, None] * stride_dgn + (cols - A)[None, :], mask=m_gate,
                              other=0.0).to(ACC)
                if PHI_EXP:
                    dgl = dgl * tl.load(g_ptr + rows64[:, None] * stride_gn + (cols - A)[None, :], mask=m_gate,
                                        other=0.0).to(ACC)
                dgam += dgl
            wc = tl.load(wu_ptr + cols[:, None] * R + rs[None, :], mask=c_ok[:, None] & r_ok[None, :],
                         other=0.0).to(ACC)  # [BLOCK_O, R_P] = W_up
            dz += tl.dot(dgam, wc, input_precision=PREC, out_dtype=ACC)
            if NEED_W:
                tl.store(dgam_ptr + rows64[:, None] * (A + G) + cols[None, :], dgam.to(dgam_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & c_ok[None, :])
        dh = tl.where(r_ok[None, :], dz * sg * (1.0 + h * (1.0 - sg)), 0.0)
        if NEED_W:
            m_r = row_ok[:, None] & r_ok[None, :]
            tl.store(z_ptr + rows64[:, None] * R + rs[None, :], (h * sg).to(z_ptr.dtype.element_ty), mask=m_r)
            tl.store(dh_ptr + rows64[:, None] * R + rs[None, :], dh.to(dh_ptr.dtype.element_ty), mask=m_r)
        if NEED_X:
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                s_ok = ss < S
                wc2 = tl.load(wd_ptr + rs[:, None] * S + ss[None, :], mask=r_ok[:, None] & s_ok[None, :],
                              other=0.0).to(ACC)  # [R_P, BLOCK_S] = W_down
                dx = tl.dot(dh, wc2, input_precision=PREC, out_dtype=ACC)
                tl.store(dx_ptr + rows64[:, None] * stride_dxn + ss[None, :], dx.to(dx_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & s_ok[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (row stride free), as the kernels read it."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def triton_gate_net_fwd(x0, w_down, b_down, w_up, b_up, num_additive: int, phi: str):
    """``(add [N, A], gates [N, G])``; no autograd."""
    N, S = x0.shape
    R, n_out = w_down.shape[0], w_up.shape[0]
    A, G = int(num_additive), n_out - int(num_additive)
    add = x0.new_empty((N, A))
    gates = x0.new_empty((N, G))
    if N == 0 or n_out == 0:
        return add, gates
    x0 = _rows(x0)
    interpret = interpreting(x0.device)
    bn, bs, bo, warps = _blocks(N, S, n_out, interpret)
    grid = check_grid((-(-N // bn),), "gate_net forward")
    with device_guard(x0.device):
        _gn_fwd_kernel[grid](
            x0, w_down.contiguous(), b_down.contiguous(), w_up.contiguous(), b_up.contiguous(),
            add if A > 0 else gates, gates if G > 0 else add,
            N, S, R, A, G,
            x0.stride(0), add.stride(0) if A > 0 else 0, gates.stride(0) if G > 0 else 0,
            PHI_EXP=phi == "exp", BLOCK_N=bn, BLOCK_S=bs, R_P=max(16, pow2(R)), BLOCK_O=bo, num_warps=warps,
            num_stages=NUM_STAGES, **_consts(x0.dtype),
        )
    return add, gates


def triton_gate_net_bwd(x0, w_down, b_down, w_up, gates, dadd: Optional[torch.Tensor],
                        dgates: Optional[torch.Tensor], num_additive: int, phi: str, need_x: bool, need_w: bool):
    """``(dx0, dW_down, db_down, dW_up, db_up)`` (None where not asked for); no autograd."""
    N, S = x0.shape
    R, n_out = w_down.shape[0], w_up.shape[0]
    A, G = int(num_additive), n_out - int(num_additive)
    has_da = dadd is not None and A > 0
    has_dg = dgates is not None and G > 0
    launch = N > 0 and (has_da or has_dg) and (need_x or need_w)
    new = x0.new_empty if launch else x0.new_zeros  # the kernel writes every element it is given
    dx0 = new((N, S)) if need_x else None
    if need_w:
        dgam, z, dh = new((N, n_out)), new((N, R)), new((N, R))
    if launch:
        x0 = _rows(x0)
        dadd = _rows(dadd) if has_da else None
        dgates = _rows(dgates) if has_dg else None
        interpret = interpreting(x0.device)
        bn, bs, bo, warps = _blocks(N, S, n_out, interpret)
        grid = check_grid((-(-N // bn),), "gate_net backward")
        dummy = x0
        with device_guard(x0.device):
            _gn_bwd_kernel[grid](
                x0, w_down.contiguous(), b_down.contiguous(), w_up.contiguous(), gates if G > 0 else dummy,
                dadd if has_da else dummy, dgates if has_dg else dummy, dx0 if need_x else dummy,
                dgam if need_w else dummy, z if need_w else dummy, dh if need_w else dummy,
                N, S, R, A, G,
                x0.stride(0), gates.stride(0) if G > 0 else 0, dadd.stride(0) if has_da else 0,
                dgates.stride(0) if has_dg else 0, dx0.stride(0) if need_x else 0,
                HAS_DA=has_da, HAS_DG=has_dg, NEED_X=need_x, NEED_W=need_w, PHI_EXP=phi == "exp",
                BLOCK_N=bn, BLOCK_S=bs, R_P=max(16, pow2(R)), BLOCK_O=bo, num_warps=warps,
                num_stages=NUM_STAGES, **_consts(x0.dtype),
            )
    if not need_w:
        return dx0, None, None, None, None
    return dx0, dh.t() @ x0, dh.sum(0), dgam.t() @ z, dgam.sum(0)
