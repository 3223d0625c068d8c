"""Index tables of a :class:`~mmea_kernels.linear_spec.LinearSpec` for the fused gated-linear
kernels: built once per (spec, device, tile sizes) and cached on the spec. The kernels read the
table columns by the names below (as ``tl.constexpr``)."""
from __future__ import annotations

import dataclasses
from typing import Tuple

from ...linear_spec import LinearSpec

__all__ = ["LinearTables", "linear_tables"]

# Columns of the int32 tables; the kernels read them by these names (as tl.constexpr).
# forward task: one (output block, output-channel tile); the kernel loops over the 2l+1 components
(T_COL0, T_COL_SU, T_COL_SM, T_W0, T_MUL_OUT, T_IR_DIM, T_GATE, T_SCALAR, T_BIAS, T_INS_LO,
 T_INS_HI) = range(11)
TASK_FIELDS = 11
# instruction, sorted by output block
I_IN_OFF, I_IN_SU, I_IN_SM, I_MUL_IN, I_GATE_IN, I_W_OFF, I_W_SU, I_W_SW = range(8)
INS_FIELDS = 8
# weight-gradient task: one (instruction, input-channel tile, output-channel tile)
(G_IN_OFF, G_IN_SU, G_IN_SM, G_MUL_IN, G_GATE_IN, G_OUT_OFF, G_OUT_SU, G_OUT_SM, G_MUL_OUT, G_GATE_OUT,
 G_IR_DIM, G_W_OFF, G_W_SU, G_W_SW, G_U0, G_W0, G_INS) = range(17)
WTASK_FIELDS = 17


@dataclasses.dataclass(frozen=True)
class LinearTables:
    spec: LinearSpec
    block_w: int  # output-channel tile of the forward tasks
    tasks: "object"  # int32 [T, TASK_FIELDS]
    instructions: "object"  # int32 [I, INS_FIELDS], non-empty instructions sorted by output block
    path_weights: "object"  # float64 [I], same order
    wtasks: "object"  # int32 [Tw, WTASK_FIELDS], tiles of block_u x block_w, heaviest (largest 2l+1) first
    block_u: int  # input-channel tile of the weight-gradient tasks
    bias_columns: "object"  # int64 [n_bias]
    scalar_columns: "object"  # int64 [S_out]
    max_ir_dim: int  # largest 2l+1 among the forward tasks (1 without tasks)
    # (first, count) when bias_columns / scalar_columns are one contiguous range (their gradients
    # are then column slices of dy, not gathers), else None
    bias_span: "object" = None
    scalar_span: "object" = None

    @property
    def num_tasks(self) -> int:
        return int(self.tasks.shape[0])

    @property
    def num_wtasks(self) -> int:
        return int(self.wtasks.shape[0])


def _block_strides(b, layout: str) -> Tuple[int, int]:
    """(channel stride, component stride) inside a block."""
    return (b.ir_dim, 1) if layout == "mul_ir" else (1, b.mul)


def linear_tables(spec: LinearSpec, device, block_w: int, block_u: int) -> LinearTables:
    """Task tables of ``spec`` on ``device`` for tiles ``block_w`` (output channels) and
    ``block_u`` (input channels of the weight gradient); built once, then cached on the spec
    (the launch path pays one dict lookup per call)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = spec.__dict__.setdefault("_tables", {})
    key = (device, int(block_w), int(block_u))
    hit = cache.get(key)
    if hit is None:
        with torch._C._DisableFuncTorch():  # plain tensors inside a torch.func transform too (ops/tables.py)
            hit = cache[key] = _build_tables(spec, device, int(block_w), int(block_u))
    return hit


def _build_tables(spec: LinearSpec, device, block_w: int, block_u: int) -> LinearTables:
    import torch

    L = spec.layout
    bin_, bout = spec.in_layout.blocks, spec.out_layout.blocks
    live = [(k, i) for k, i in enumerate(spec.instructions) if i.numel > 0 and bin_[i.i_in].ir_dim > 0]
    live.sort(key=lambda t: (t[1].i_out, t[0]))  # stable: instruction order inside an output block

    ins_rows, pws, ranges = [], [], {}
    for _, i in live:
        a = bin_[i.i_in]
        su, sm = _block_strides(a, L)
        lo = len(ins_rows)
        ins_rows.append([a.offset, su, sm, a.mul, a.first_gate, i.weight_offset, i.weight_stride_in,
                         i.weight_stride_out])
        pws.append(i.path_weight)
        r = ranges.setdefault(i.i_out, [lo, lo])
        r[1] = lo + 1

    scalar_base, s = [], 0
    for b in bout:
        scalar_base.append(s if b.is_scalar else -1)
        s += b.mul if b.is_scalar else 0

    task_rows = []
    for o, b in enumerate(bout):
        if b.mul == 0 or b.ir_dim == 0:
            continue
        su, sm = _block_strides(b, L)
        lo, hi = ranges.get(o, (0, 0))
        for w0 in range(0, b.mul, block_w):
            task_rows.append([b.offset, su, sm, w0, b.mul, b.ir_dim, b.first_gate, scalar_base[o],
                              spec.bias_offsets[o], lo, hi])

    wtask_rows = []
    for row, (_, i) in enumerate(live):
        a, b = bin_[i.i_in], bout[i.i_out]
        asu, asm = _block_strides(a, L)
        bsu, bsm = _block_strides(b, L)
        for u0 in range(0, i.mul_in, block_u):
            for w0 in range(0, i.mul_out, block_w):
                wtask_rows.append([a.offset, asu, asm, a.mul, a.first_gate, b.offset, bsu, bsm, b.mul,
                                   b.first_gate, a.ir_dim, i.weight_offset, i.weight_stride_in,
                                   i.weight_stride_out, u0, w0, row])
    # the work of a weight-gradient task grows with 2l+1: heaviest first balances the SMs
    wtask_rows.sort(key=lambda r: -r[G_IR_DIM])

    def _t(rows, width):
        if any(abs(v) >= 2**31 for r in rows for v in r):
            raise ValueError(f"{spec!r}: a table entry exceeds int32 (the layer is too large for the kernels)")
        t = torch.tensor(rows, dtype=torch.int32) if rows else torch.zeros((0, width), dtype=torch.int32)
        return t.reshape(-1, width).to(device)

    return LinearTables(
        spec=spec,
        block_w=block_w,
        tasks=_t(task_rows, TASK_FIELDS),
        instructions=_t(ins_rows, INS_FIELDS),
        path_weights=torch.tensor(pws, dtype=torch.float64).to(device),
        wtasks=_t(wtask_rows, WTASK_FIELDS),
        block_u=block_u,
        bias_columns=torch.tensor(spec.bias_columns, dtype=torch.int64).to(device),
        scalar_columns=torch.tensor(spec.out_layout.scalar_columns, dtype=torch.int64).to(device),
        max_ir_dim=max((r[T_IR_DIM] for r in task_rows), default=1),
        bias_span=spec.bias_span,
        scalar_span=spec.out_layout.scalar_span,
    )
