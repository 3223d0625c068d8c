"""Fused equivariant linear + MMEA gate: ``y = G ⊙ (Linear_W(x) + bias) + additive``.

``Linear_W`` is an ``e3nn.o3.Linear`` (described by a :class:`~mmea_kernels.ops.linear_spec.LinearSpec`),
``G`` gates every (non-0e block, multiplicity) of the output (per row ``[N, G]`` or shared
``[G]``), and ``bias``/``additive`` are added on the 0e output columns (where there is no gate,
so ``G ⊙ (L + b) = G ⊙ L + b`` there).

Triton backend
--------------
The forward is one launch of ``_gl_fwd_kernel``, a grouped GEMM over *tasks* (output block,
component ``m``, tile of output channels) x row blocks. A task loops over the instructions that
feed its output block and over tiles of their input channels, accumulating
``path_weight · x[:, in(u, m)] @ W_i[u, w]`` with ``tl.dot`` (fp32 accumulation for fp16/bf16,
fp64 for fp64, ``input_precision="ieee"``), then applies the epilogue (gate, bias, additive) and
stores its ``[BLOCK_N, BLOCK_W]`` tile. Both layouts are handled through the per-block channel and
component strides of the task tables (``mul_ir``: ``(2l+1, 1)``; ``ir_mul``: ``(1, mul)``); the
feature tensors are never transposed.

The kernel computes the generalised map ``y = G_post ⊙ L_W(G_pre ⊙ x) (+ bias + additive)``, with
optional prologue gates on the input columns. That makes the autograd closed:

* ``dx = G_pre ⊙ L_W^T(G_post ⊙ dy)``: the same op on ``spec.transposed`` (which reads ``W_i^T``
  from the same flat weight through swapped strides), with the two gate roles swapped;
* ``dG_post = seg_dot_out(dy, L_W(G_pre ⊙ x))`` and ``dG_pre = seg_dot_in(x, L_W^T(G_post ⊙ dy))``;
* ``dW_i = path_weight · Σ_{n,m} (G_pre ⊙ x)[n, u, m] (G_post ⊙ dy)[n, w, m]``: ``_gl_wgrad_kernel``
  (tasks = instruction x channel tiles, rows split over programs on GPU), whose own backward is
  again the op: ``<C, dW(x, dy)> = <G_post ⊙ L_C(G_pre ⊙ x), dy>``;
* bias / additive gradients: column sums / column selections of ``dy``.

Every piece is autograd-capable, so any order of derivative runs the same kernels.

The pre-gate output ``L_W(G_pre ⊙ x)`` needed by ``dG_post`` is *recomputed* in the backward (one
extra launch, only when the gates need a gradient) rather than saved: a tensor saved from the
forward would be a constant for the double backward (its dependence on ``x``, ``W`` and
``G_pre`` would be lost, so force training would get wrong second derivatives unless it was
recomputed anyway), and not saving it keeps one ``[N, D_out]`` activation per layer out of memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backends import resolve_backend
from .gate import gate_mul, seg_dot
from .linear_spec import LinearSpec, LinearTables, linear_tables

__all__ = ["gated_linear", "gated_linear_reference", "LinearSpec"]

# triton (optional) and whether kernels are decorated in interpreter mode: shared with the gate kernels
from .triton_backend import _INTERPRETED_AT_IMPORT, tl, triton  # noqa: E402
from .triton_backend import available as triton_available  # noqa: E402



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
    _validate(x, weight, bias, gates, additive, spec)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, spec.dim_in)
    N = x2.shape[0]
    gates2 = None if gates is None else (gates if gates.dim() == 1 else gates.reshape(N, -1))
    add2 = None if additive is None else (additive if additive.dim() == 1 else additive.reshape(N, -1))
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
    cols = [o.reshape(N, -1) if spec.layout == "mul_ir" else o.transpose(1, 2).reshape(N, -1) for o in outs]
    y = torch.cat(cols, dim=1) if cols else x2.new_zeros((N, 0))
    return y.reshape(lead + (spec.dim_out,))


# ============================================================================ validation
def _validate(x, weight, bias, gates, additive, spec) -> None:
    if not isinstance(spec, LinearSpec):
        raise TypeError(f"spec must be a LinearSpec (see LinearSpec.from_e3nn), got {type(spec).__name__}")
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


# ============================================================================ triton kernels
def triton_status(device) -> Tuple[bool, str]:
    """(available, reason) of the triton backend for tensors on ``device`` (the same kernels'
    conditions as the triton gate backend: both modules share its import and interpreter flag)."""
    return triton_available(device)


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _interpreting(device: torch.device) -> bool:
    return device.type != "cuda" or _INTERPRETED_AT_IMPORT


def _tile_sizes(spec: LinearSpec, interpret: bool) -> Tuple[int, int]:
    """(block_w, block_u): tiles of output and input channels (>= 16, the tl.dot minimum). The
    interpreter pays per program instance, so it gets whole blocks when it can."""
    cap_w, cap_u = (128, 128) if interpret else (64, 32)
    mo = max((b.mul for b in spec.out_layout.blocks), default=1)
    mi = max((b.mul for b in spec.in_layout.blocks), default=1)
    return min(max(_pow2(mo), 16), cap_w), min(max(_pow2(mi), 16), cap_u)


def _block_n(n: int, dtype: torch.dtype, interpret: bool) -> int:
    if interpret:
        return min(max(_pow2(n), 16), 128)
    return 32 if dtype == torch.float64 else 64


if triton is not None:

    @triton.jit
    def _gl_fwd_kernel(
        x_ptr, w_ptr, pw_ptr, b_ptr, gpre_ptr, gpost_ptr, add_ptr, out_ptr,
        task_ptr, ins_ptr,
        N, T,
        stride_xn, stride_xd,
        stride_on, stride_od,
        stride_pn, stride_pg,  # prologue gates; stride_pn == 0 when shared
        stride_qn, stride_qg,  # epilogue gates; stride_qn == 0 when shared
        stride_an, stride_as,  # additive; stride_an == 0 when shared
        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr,  # accumulator dtype; dtype of the tl.dot operands
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid_t = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        ok = pid_t < T
        # task row (see linear_spec.TASK_FIELDS)
        tp = task_ptr + pid_t * 10
        col0 = tl.load(tp + 0, mask=ok, other=0)  # output column of (w = 0, m)
        col_su = tl.load(tp + 1, mask=ok, other=0)  # output column stride of the channel w
        w0 = tl.load(tp + 2, mask=ok, other=0)
        mul_out = tl.load(tp + 3, mask=ok, other=0)
        m = tl.load(tp + 4, mask=ok, other=0)
        gate_out = tl.load(tp + 5, mask=ok, other=-1)  # gate of channel 0, -1 for 0e blocks
        scal = tl.load(tp + 6, mask=ok, other=-1)  # additive index of channel 0, -1 unless 0e
        bias0 = tl.load(tp + 7, mask=ok, other=-1)  # bias index of channel 0, -1 without bias
        ins_lo = tl.load(tp + 8, mask=ok, other=0)
        ins_hi = tl.load(tp + 9, mask=ok, other=0)

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        ws = w0 + tl.arange(0, BLOCK_W).to(tl.int64)
        w_ok = ws < mul_out
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=ACC)

        for i in range(ins_lo, ins_hi):
            ip = ins_ptr + i * 8  # instruction row (see linear_spec.INS_FIELDS)
            in_off = tl.load(ip + 0, mask=ok, other=0)
            in_su = tl.load(ip + 1, mask=ok, other=0)
            in_sm = tl.load(ip + 2, mask=ok, other=0)
            mul_in = tl.load(ip + 3, mask=ok, other=0)
            gate_in = tl.load(ip + 4, mask=ok, other=-1)
            w_off = tl.load(ip + 5, mask=ok, other=0)
            w_su = tl.load(ip + 6, mask=ok, other=0)
            w_sw = tl.load(ip + 7, mask=ok, other=0)
            pw = tl.load(pw_ptr + i, mask=ok, other=0.0).to(ACC)
            in_col = in_off + m * in_sm
            for k0 in range(0, mul_in, BLOCK_K):
                us = k0 + ks
                u_ok = us < mul_in
                xm = row_ok[:, None] & u_ok[None, :]
                xt = tl.load(x_ptr + rows[:, None] * stride_xn + (in_col + us * in_su)[None, :] * stride_xd,
                             mask=xm, other=0.0)
                if HAS_PRE:
                    gm = xm & (gate_in >= 0)
                    g = tl.load(gpre_ptr + rows[:, None] * stride_pn + (gate_in + us)[None, :] * stride_pg,
                                mask=gm, other=1.0)
                    xt = (xt.to(ACC) * g.to(ACC)).to(dt)
                wt = tl.load(w_ptr + w_off + us[:, None] * w_su + ws[None, :] * w_sw,
                             mask=u_ok[:, None] & w_ok[None, :], other=0.0)
                acc += tl.dot(xt.to(DOT), wt.to(DOT), input_precision="ieee", out_dtype=ACC) * pw

        tile_ok = row_ok[:, None] & w_ok[None, :]
        if HAS_POST:
            g = tl.load(gpost_ptr + rows[:, None] * stride_qn + (gate_out + ws)[None, :] * stride_qg,
                        mask=tile_ok & (gate_out >= 0), other=1.0)
            acc = acc * g.to(ACC)
        if HAS_BIAS:
            b = tl.load(b_ptr + bias0 + ws, mask=w_ok & (bias0 >= 0), other=0.0)
            acc = acc + b.to(ACC)[None, :]
        if HAS_ADD:
            a = tl.load(add_ptr + rows[:, None] * stride_an + (scal + ws)[None, :] * stride_as,
                        mask=tile_ok & (scal >= 0), other=0.0)
            acc = acc + a.to(ACC)
        tl.store(out_ptr + rows[:, None] * stride_on + (col0 + ws * col_su)[None, :] * stride_od,
                 acc.to(out_ptr.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _gl_wgrad_kernel(
        a_ptr, b_ptr, gpre_ptr, gpost_ptr, pw_ptr, out_ptr, wtask_ptr,
        N, T, rows_per_split,
        stride_an, stride_ad,
        stride_bn, stride_bd,
        stride_pn, stride_pg,
        stride_qn, stride_qg,
        stride_os,  # partial-buffer stride of the row split (0 when there is one split)
        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid_t = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        ok = pid_t < T
        tp = wtask_ptr + pid_t * 17  # see linear_spec.WTASK_FIELDS
        in_off = tl.load(tp + 0, mask=ok, other=0)
        in_su = tl.load(tp + 1, mask=ok, other=0)
        in_sm = tl.load(tp + 2, mask=ok, other=0)
        mul_in = tl.load(tp + 3, mask=ok, other=0)
        gate_in = tl.load(tp + 4, mask=ok, other=-1)
        out_off = tl.load(tp + 5, mask=ok, other=0)
        out_su = tl.load(tp + 6, mask=ok, other=0)
        out_sm = tl.load(tp + 7, mask=ok, other=0)
        mul_out = tl.load(tp + 8, mask=ok, other=0)
        gate_out = tl.load(tp + 9, mask=ok, other=-1)
        ir_dim = tl.load(tp + 10, mask=ok, other=0)
        w_off = tl.load(tp + 11, mask=ok, other=0)
        w_su = tl.load(tp + 12, mask=ok, other=0)
        w_sw = tl.load(tp + 13, mask=ok, other=0)
        u0 = tl.load(tp + 14, mask=ok, other=0)
        w0 = tl.load(tp + 15, mask=ok, other=0)
        ins = tl.load(tp + 16, mask=ok, other=0)
        pw = tl.load(pw_ptr + ins, mask=ok, other=0.0).to(ACC)

        us = u0 + tl.arange(0, BLOCK_U).to(tl.int64)
        u_ok = us < mul_in
        ws = w0 + tl.arange(0, BLOCK_W).to(tl.int64)
        w_ok = ws < mul_out
        dt = a_ptr.dtype.element_ty
        n_lo = pid_s * rows_per_split
        n_hi = tl.minimum(n_lo + rows_per_split, N)
        acc = tl.zeros((BLOCK_U, BLOCK_W), dtype=ACC)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            r_ok = rows < n_hi
            am = r_ok[:, None] & u_ok[None, :]
            bm = r_ok[:, None] & w_ok[None, :]
            if HAS_PRE:
                gp = tl.load(gpre_ptr + rows[:, None] * stride_pn + (gate_in + us)[None, :] * stride_pg,
                             mask=am & (gate_in >= 0), other=1.0).to(ACC)
            if HAS_POST:
                gq = tl.load(gpost_ptr + rows[:, None] * stride_qn + (gate_out + ws)[None, :] * stride_qg,
                             mask=bm & (gate_out >= 0), other=1.0).to(ACC)
            for m in range(0, ir_dim):
                at = tl.load(a_ptr + rows[:, None] * stride_an + (in_off + us * in_su + m * in_sm)[None, :] * stride_ad,
                             mask=am, other=0.0)
                bt = tl.load(b_ptr + rows[:, None] * stride_bn + (out_off + ws * out_su + m * out_sm)[None, :] * stride_bd,
                             mask=bm, other=0.0)
                if HAS_PRE:
                    at = (at.to(ACC) * gp).to(dt)
                if HAS_POST:
                    bt = (bt.to(ACC) * gq).to(dt)
                acc += tl.dot(tl.trans(at.to(DOT)), bt.to(DOT), input_precision="ieee", out_dtype=ACC)
        acc = acc * pw
        tl.store(out_ptr + pid_s * stride_os + w_off + us[:, None] * w_su + ws[None, :] * w_sw,
                 acc.to(out_ptr.dtype.element_ty), mask=u_ok[:, None] & w_ok[None, :])


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_TL_DTYPES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
              torch.bfloat16: "bfloat16"}


def _dot_dtype(dtype: torch.dtype, interpret: bool):
    """tl.dot operand dtype: the storage dtype, except bf16 under the interpreter (its numpy
    matmul multiplies the raw bf16 bit patterns), which goes through fp32: exact for bf16 inputs,
    with the same fp32 accumulation."""
    if dtype == torch.bfloat16 and interpret:
        return tl.float32
    if dtype not in _TL_DTYPES:
        raise TypeError(f"the triton backend supports float64/32/16 and bfloat16, not {dtype}")
    return getattr(tl, _TL_DTYPES[dtype])


def _gate_strides(g: Optional[torch.Tensor]) -> Tuple[int, int]:
    if g is None:
        return 0, 0
    return (0, g.stride(0)) if g.dim() == 1 else (g.stride(0), g.stride(1))


def _tables(spec: LinearSpec, device: torch.device) -> LinearTables:
    bw, bu = _tile_sizes(spec, _interpreting(device))
    return linear_tables(spec, device, bw, bu)


def _triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
                    additive: Optional[torch.Tensor], spec: LinearSpec,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kernel-level ``G_post ⊙ L_W(G_pre ⊙ x) + bias + additive`` on 2-D ``x`` (no autograd)."""
    N = x.shape[0]
    if out is None:
        out = x.new_empty((N, spec.dim_out))
    if N == 0 or spec.dim_out == 0:
        return out
    t = _tables(spec, x.device)
    interpret = _interpreting(x.device)
    block_n = _block_n(N, x.dtype, interpret)
    has_pre = g_pre is not None and g_pre.shape[-1] > 0
    has_post = g_post is not None and g_post.shape[-1] > 0
    has_bias = bias is not None and bias.numel() > 0
    has_add = additive is not None and additive.shape[-1] > 0
    dummy = x
    grid = (t.num_tasks, triton.cdiv(N, block_n))
    _gl_fwd_kernel[grid](
        x, weight if weight.numel() > 0 else dummy, t.path_weights if t.path_weights.numel() > 0 else t.tasks,
        bias if has_bias else dummy, g_pre if has_pre else dummy, g_post if has_post else dummy,
        additive if has_add else dummy, out,
        t.tasks, t.instructions if t.instructions.numel() > 0 else t.tasks,
        N, t.num_tasks,
        x.stride(0), x.stride(1),
        out.stride(0), out.stride(1),
        *_gate_strides(g_pre if has_pre else None),
        *_gate_strides(g_post if has_post else None),
        *_gate_strides(additive if has_add else None),
        HAS_PRE=has_pre, HAS_POST=has_post, HAS_BIAS=has_bias, HAS_ADD=has_add,
        ACC=_acc(x.dtype), DOT=_dot_dtype(x.dtype, interpret),
        BLOCK_N=block_n, BLOCK_K=t.block_u, BLOCK_W=t.block_w,
        num_warps=1 if interpret else 4,
    )
    return out


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _triton_wgrad(a: torch.Tensor, b: torch.Tensor, g_pre: Optional[torch.Tensor],
                  g_post: Optional[torch.Tensor], spec: LinearSpec) -> torch.Tensor:
    """Kernel-level flat weight gradient ``dW_i[u, w] = pw_i Σ_{n,m} (G_pre⊙a)[n,in(u,m)] (G_post⊙b)[n,out(w,m)]``."""
    N = a.shape[0]
    numel = spec.weight_numel
    if numel == 0:
        return a.new_zeros((0,))
    t = _tables(spec, a.device)
    if N == 0 or t.num_wtasks == 0:
        return a.new_zeros((numel,))
    interpret = _interpreting(a.device)
    block_n = _block_n(N, a.dtype, interpret)
    n_splits = 1
    if not interpret:  # enough programs to fill the GPU; each split keeps >= 4 row blocks
        n_splits = max(1, min(triton.cdiv(2 * _num_sms(a.device), t.num_wtasks), triton.cdiv(N, 4 * block_n)))
    rows_per_split = triton.cdiv(triton.cdiv(N, n_splits), block_n) * block_n
    n_splits = triton.cdiv(N, rows_per_split)
    if n_splits == 1:
        dst = a.new_zeros((1, numel))
    else:
        dst = torch.zeros((n_splits, numel), dtype=torch.float64 if a.dtype == torch.float64 else torch.float32,
                          device=a.device)
    has_pre = g_pre is not None and g_pre.shape[-1] > 0
    has_post = g_post is not None and g_post.shape[-1] > 0
    _gl_wgrad_kernel[(t.num_wtasks, n_splits)](
        a, b, g_pre if has_pre else a, g_post if has_post else a, t.path_weights, dst, t.wtasks,
        N, t.num_wtasks, rows_per_split,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        *_gate_strides(g_pre if has_pre else None),
        *_gate_strides(g_post if has_post else None),
        dst.stride(0),
        HAS_PRE=has_pre, HAS_POST=has_post,
        ACC=_acc(a.dtype), DOT=_dot_dtype(a.dtype, interpret),
        BLOCK_N=block_n, BLOCK_U=t.block_u, BLOCK_W=t.block_w,
        num_warps=1 if interpret else 4,
    )
    if n_splits == 1:
        return dst[0]
    return dst.sum(0).to(a.dtype)


# ============================================================================ autograd
def _shared(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.dim() == 1


class _GatedLinearFn(torch.autograd.Function):
    """``y = G_post ⊙ L_W(G_pre ⊙ x) + bias + additive`` (x, gates, additive 2-D or shared 1-D)."""

    @staticmethod
    def forward(ctx, x, weight, bias, g_pre, g_post, additive, spec):
        ctx.spec = spec
        ctx.add_shared = _shared(additive)
        ctx.save_for_backward(x, weight, g_pre, g_post)
        return _triton_forward(x, weight, bias, g_pre, g_post, additive, spec)

    @staticmethod
    def backward(ctx, dy):
        x, weight, g_pre, g_post = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        nx, nw, nb, npre, npost, nadd = ctx.needs_input_grad[:6]
        dx = dw = db = dpre = dpost = dadd = None
        T = spec.transposed
        if npre:
            v = _core(dy, weight, None, g_post, None, None, T)  # L^T(G_post ⊙ dy)
            dpre = _seg_dot(x, v, spec.in_layout, _shared(g_pre))
            if nx:
                dx = gate_mul(v, g_pre, spec.in_layout, backend="triton")
        elif nx:
            dx = _core(dy, weight, None, g_post, g_pre, None, T)
        if npost:
            u = _core(x, weight, None, g_pre, None, None, spec)  # pre-gate output, recomputed
            dpost = _seg_dot(dy, u, spec.out_layout, _shared(g_post))
        if nw:
            dw = _LinearWGradFn.apply(x, dy, g_pre, g_post, spec)
        if nb:
            db = dy.index_select(1, _tables(spec, dy.device).bias_columns).sum(0)
        if nadd:
            dadd = dy.index_select(1, _tables(spec, dy.device).scalar_columns)
            if ctx.add_shared:
                dadd = dadd.sum(0)
        return dx, dw, db, dpre, dpost, dadd, None


class _LinearWGradFn(torch.autograd.Function):
    """Flat weight gradient of ``<G_post ⊙ L_W(G_pre ⊙ a), b>``; bilinear in ``(a, b)``."""

    @staticmethod
    def forward(ctx, a, b, g_pre, g_post, spec):
        ctx.spec = spec
        ctx.save_for_backward(a, b, g_pre, g_post)
        return _triton_wgrad(a, b, g_pre, g_post, spec)

    @staticmethod
    def backward(ctx, c):
        # <c, dW(a, b)> = <G_post ⊙ L_c(G_pre ⊙ a), b>: every gradient is the op with weight c
        a, b, g_pre, g_post = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        na, nb, npre, npost = ctx.needs_input_grad[:4]
        da = db = dpre = dpost = None
        T = spec.transposed
        if npre:
            v = _core(b, c, None, g_post, None, None, T)
            dpre = _seg_dot(a, v, spec.in_layout, _shared(g_pre))
            if na:
                da = gate_mul(v, g_pre, spec.in_layout, backend="triton")
        elif na:
            da = _core(b, c, None, g_post, g_pre, None, T)
        if npost:
            u = _core(a, c, None, g_pre, None, None, spec)
            dpost = _seg_dot(b, u, spec.out_layout, _shared(g_post))
            if nb:
                db = gate_mul(u, g_post, spec.out_layout, backend="triton")
        elif nb:
            db = _core(a, c, None, g_pre, g_post, None, spec)
        return da, db, dpre, dpost, None


def _core(x, weight, bias, g_pre, g_post, additive, spec):
    return _GatedLinearFn.apply(x, weight, bias, g_pre, g_post, additive, spec)


def _seg_dot(a, b, layout, shared):
    if layout.num_gates == 0:  # nothing to reduce; keep the shape (and the graph) simple
        return a.new_zeros((layout.num_gates,) if shared else (a.shape[0], 0))
    return seg_dot(a, b, layout, shared=shared, backend="triton")


# ============================================================================ public API
def _resolve(backend: Optional[str], device: torch.device) -> str:
    """"triton" when the shared backend selection (``backend=`` / ``MMEA_BACKEND`` / auto) picks
    triton, else "torch" (the reference composition, whose gate ops follow the same selection)."""
    return "triton" if resolve_backend(backend, device).name == "triton" else "torch"


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 gates: Optional[torch.Tensor], additive: Optional[torch.Tensor], spec: LinearSpec,
                 backend: Optional[str] = None, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = G ⊙ (Linear_W(x) + bias) + additive`` (additive on the 0e output columns).

    Args:
        x: ``[..., D_in]`` features (``spec.layout``).
        weight: flat ``[spec.weight_numel]`` weight (``o3.Linear.weight``).
        bias: ``[spec.bias_numel]`` or ``None``.
        gates: ``[..., G_out]`` per row, ``[G_out]`` shared, or ``None`` (no gating); one gate per
            (non-0e output block, multiplicity).
        additive: ``[..., S_out]`` per row, ``[S_out]`` shared, or ``None``; one per 0e output column.
        spec: the :class:`LinearSpec` (e.g. ``LinearSpec.from_e3nn(linear, layout)``).
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (the
            reference composition) or ``"auto"``/``None`` (``MMEA_BACKEND``, else triton on CUDA,
            torch otherwise).
        out: optional ``[..., D_out]`` output buffer (every element is written); like torch's
            ``out=`` functions it does not support autograd.

    All tensors share one dtype and device. Differentiable to any order in every tensor argument.
    """
    _validate(x, weight, bias, gates, additive, spec)
    lead = tuple(x.shape[:-1])
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != lead + (spec.dim_out,):
            raise ValueError(f"out must be a tensor of shape {lead + (spec.dim_out,)}")
        if out.dtype != x.dtype or out.device != x.device:
            raise TypeError("out must have the dtype and device of x")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, gates, additive)):
            raise RuntimeError("gated_linear(..., out=...) does not support automatic differentiation; "
                               "call it without out= (or under torch.no_grad())")
    name = _resolve(backend, x.device)
    if name == "torch":
        y = gated_linear_reference(x, weight, bias, gates, additive, spec)
        if out is not None:
            out.copy_(y)
            return out
        return y
    x2 = x.reshape(-1, spec.dim_in)
    N = x2.shape[0]
    g2 = None if gates is None else (gates if gates.dim() == 1 else gates.reshape(N, -1))
    a2 = None if additive is None else (additive if additive.dim() == 1 else additive.reshape(N, -1))
    if out is not None:
        out2 = out.view(N, spec.dim_out)  # raises if out cannot be viewed as rows
        _triton_forward(x2, weight, bias, None, g2, a2, spec, out=out2)
        return out
    y = _core(x2, weight, bias, None, g2, a2, spec)
    return y.reshape(lead + (spec.dim_out,))
