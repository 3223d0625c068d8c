"""Descriptor of an equivariant linear layer (the semantics of ``e3nn.o3.Linear``) for the fused
gated-linear kernels.

:class:`LinearSpec` is pure Python (no torch): irreps in/out, the memory layout, one
:class:`LinearInstruction` per weight block (``i_in -> i_out`` with its path weight and where its
``[mul_in, mul_out]`` block lives in the flat weight vector), and which 0e output blocks carry a
bias. It is built once per key (:meth:`LinearSpec.of`, :meth:`LinearSpec.from_e3nn`) and cached.

The torch index tables the kernels read (:class:`LinearTables`, via :func:`linear_tables`) are
built from a spec once per (device, tile size) and cached; torch is imported only there.

Semantics (``x`` one row, ``W_i`` the block of instruction ``i``)::

    out[i_out][w, m] = Σ_{i: ins.i_out = i_out} ins.path_weight · Σ_u x[i_in][u, m] · W_i[u, w]
                       (+ bias[w] on 0e outputs with a bias)

with ``x[b][u, m]`` at column ``offset + u*(2l+1) + m`` (``mul_ir``) or ``offset + m*mul + u``
(``ir_mul``). ``W_i[u, w]`` is read at ``weight_offset + u*weight_stride_in + w*weight_stride_out``
of the flat weight: ``(mul_out, 1)`` (e3nn's row-major ``path_shape == (mul_in, mul_out)``) for a
spec built from instructions, ``(1, mul_in_of_the_original)`` for :attr:`LinearSpec.transposed`,
which reads the same flat weight as ``W_i^T`` (the input-gradient map), without copying it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import List, Sequence, Tuple, Union

from .layout import LAYOUTS, IrrepsLayout, parse_irreps

__all__ = ["LinearInstruction", "LinearSpec", "LinearTables", "linear_tables"]


@dataclasses.dataclass(frozen=True)
class LinearInstruction:
    """One weight block: ``irreps_in[i_in] -> irreps_out[i_out]`` (same irrep)."""

    i_in: int
    i_out: int
    mul_in: int
    mul_out: int
    path_weight: float
    weight_offset: int  # first element of the block in the flat weight
    weight_stride_in: int  # flat-weight stride of the input channel u
    weight_stride_out: int  # flat-weight stride of the output channel w

    @property
    def numel(self) -> int:
        return self.mul_in * self.mul_out


def _irreps_text(parsed) -> str:
    return "+".join(f"{m}x{l}{'e' if p == 1 else 'o'}" for m, l, p in parsed)


class LinearSpec:
    """Equivariant linear map ``irreps_in -> irreps_out`` with the given instructions and layout.

    Args:
        irreps_in, irreps_out: irreps (string, e3nn ``Irreps`` or ``(mul, ir)`` pairs; kept
            unsimplified, in order).
        instructions: ``(i_in, i_out, mul_in, mul_out, path_weight)`` tuples (or
            :class:`LinearInstruction`), in weight order: block ``i`` occupies
            ``mul_in*mul_out`` elements of the flat weight right after block ``i-1``, row-major
            ``[mul_in, mul_out]`` (e3nn's convention).
        layout: ``"mul_ir"`` (e3nn) or ``"ir_mul"`` (cuEquivariance), for input and output.
        biases: ``True`` (every 0e output block), ``False``/``None`` (none) or one bool per output
            block (only 0e blocks may have one). Bias elements are numbered block by block.

    Prefer the cached constructors :meth:`of` and :meth:`from_e3nn`.
    """

    def __init__(self, irreps_in, irreps_out, instructions: Sequence, layout: str = "mul_ir",
                 biases: Union[bool, Sequence[bool], None] = False):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        self.layout = layout
        pin, pout = parse_irreps(irreps_in), parse_irreps(irreps_out)
        self.in_layout = IrrepsLayout.of(_irreps_text(pin), layout)
        self.out_layout = IrrepsLayout.of(_irreps_text(pout), layout)
        bin_, bout = self.in_layout.blocks, self.out_layout.blocks

        ins_list: List[LinearInstruction] = []
        offset = 0
        for k, ins in enumerate(instructions):
            if isinstance(ins, LinearInstruction):
                li = ins
            else:
                try:
                    i_in, i_out, mul_in, mul_out, pw = ins
                except (TypeError, ValueError):
                    raise TypeError(
                        f"instruction {k} ({ins!r}) must be (i_in, i_out, mul_in, mul_out, path_weight)") from None
                li = LinearInstruction(int(i_in), int(i_out), int(mul_in), int(mul_out), float(pw),
                                       offset, int(mul_out), 1)
            if not (0 <= li.i_in < len(bin_)):
                raise IndexError(f"instruction {k}: i_in={li.i_in} is not a block of {self.in_layout.irreps_str!r}")
            if not (0 <= li.i_out < len(bout)):
                raise IndexError(f"instruction {k}: i_out={li.i_out} is not a block of {self.out_layout.irreps_str!r}")
            a, b = bin_[li.i_in], bout[li.i_out]
            if (a.l, a.p) != (b.l, b.p):
                raise ValueError(f"instruction {k}: input block {a.name} and output block {b.name} differ in irrep")
            if (li.mul_in, li.mul_out) != (a.mul, b.mul):
                raise ValueError(
                    f"instruction {k}: path shape ({li.mul_in}, {li.mul_out}) does not match the blocks "
                    f"{a.name} -> {b.name}")
            if not math.isfinite(li.path_weight):
                raise ValueError(f"instruction {k}: path weight {li.path_weight} is not finite")
            ins_list.append(li)
            offset = max(offset, li.weight_offset + li.numel)
        self.instructions: Tuple[LinearInstruction, ...] = tuple(ins_list)
        self.weight_numel = max((i.weight_offset + i.numel for i in ins_list), default=0)

        if biases is None or biases is False:
            flags = (False,) * len(bout)
        elif biases is True:
            flags = tuple(b.is_scalar for b in bout)
        else:
            flags = tuple(bool(f) for f in biases)
            if len(flags) != len(bout):
                raise ValueError(f"biases has {len(flags)} entries, expected one per output block ({len(bout)})")
            for f, b in zip(flags, bout):
                if f and not b.is_scalar:
                    raise ValueError(f"only 0e output blocks can have a bias, not {b.name}")
        self.biases: Tuple[bool, ...] = flags
        bias_offsets, n = [], 0
        for f, b in zip(flags, bout):
            bias_offsets.append(n if f else -1)
            n += b.dim if f else 0
        self.bias_offsets: Tuple[int, ...] = tuple(bias_offsets)  # per output block, -1 without bias
        self.bias_numel = n

    # ------------------------------------------------------------------ constructors
    @property
    def key(self):
        """Hashable identity (irreps, instructions, layout, biases); built once per spec, since the
        kernels' launch path asks for it on every call."""
        key = self.__dict__.get("_key")
        if key is None:
            key = (self.in_layout.irreps_str, self.out_layout.irreps_str,
                   tuple(dataclasses.astuple(i) for i in self.instructions), self.layout, self.biases)
            self.__dict__["_key"] = key
            self.__dict__["_hash"] = hash(key)
        return key

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _cached(irreps_in: str, irreps_out: str, instructions: Tuple, layout: str,
                biases: Tuple[bool, ...]) -> "LinearSpec":
        return LinearSpec(irreps_in, irreps_out, [LinearInstruction(*i) for i in instructions], layout, biases)

    @classmethod
    def of(cls, irreps_in, irreps_out, instructions: Sequence, layout: str = "mul_ir",
           biases: Union[bool, Sequence[bool], None] = False) -> "LinearSpec":
        """Cached constructor (same arguments as the class)."""
        spec = cls(irreps_in, irreps_out, instructions, layout, biases)  # validates, normalises
        return cls._cached(*spec.key)

    @classmethod
    def e3nn_default(cls, irreps_in, irreps_out, layout: str = "mul_ir",
                     biases: Union[bool, Sequence[bool], None] = False) -> "LinearSpec":
        """The spec of ``o3.Linear(irreps_in, irreps_out, biases=biases)`` with default instructions
        (every pair of equal irreps) and ``path_normalization="element"``, without building one."""
        pin, pout = parse_irreps(irreps_in), parse_irreps(irreps_out)
        pairs = [(i, o) for i, (_, li, pi) in enumerate(pin) for o, (_, lo, po) in enumerate(pout)
                 if (li, pi) == (lo, po)]
        fan = {o: sum(pin[i][0] for i, oo in pairs if oo == o) for o in range(len(pout))}
        ins = [(i, o, pin[i][0], pout[o][0], (fan[o] if fan[o] else 1) ** -0.5) for i, o in pairs]
        return cls.of(_irreps_text(pin), _irreps_text(pout), ins, layout, biases)

    @classmethod
    def from_e3nn(cls, linear, layout: str = "mul_ir") -> "LinearSpec":
        """The spec of an ``e3nn.o3.Linear`` (its instructions, path weights and biases).

        Only plain linears are supported: no ``f_in``/``f_out``; the weight vector is
        ``linear.weight`` (or the ``weight=`` argument it is called with) and the bias vector is
        ``linear.bias``.
        """
        if not (hasattr(linear, "irreps_in") and hasattr(linear, "irreps_out") and hasattr(linear, "instructions")):
            raise TypeError(f"expected an e3nn.o3.Linear, got {type(linear).__name__}")
        w = getattr(linear, "weight", None)
        if w is not None and getattr(w, "dim", lambda: 1)() > 1:
            raise ValueError("o3.Linear with f_in/f_out (weight of more than one dimension) is not supported")
        pout = parse_irreps(linear.irreps_out)
        ins, bias_blocks = [], set()
        for k in linear.instructions:
            if k.i_in == -1:
                bias_blocks.add(int(k.i_out))
                continue
            mul_in, mul_out = k.path_shape
            ins.append((int(k.i_in), int(k.i_out), int(mul_in), int(mul_out), float(k.path_weight)))
        biases = tuple(o in bias_blocks for o in range(len(pout)))
        for o in bias_blocks:  # e3nn biases carry path_weight 1.0
            pw = [float(k.path_weight) for k in linear.instructions if k.i_in == -1 and k.i_out == o]
            if any(p != 1.0 for p in pw):
                raise ValueError(f"bias of output block {o} has path weight {pw}, expected 1.0")
        return cls.of(linear.irreps_in, linear.irreps_out, ins, layout, biases)

    # ------------------------------------------------------------------ derived specs
    @functools.cached_property
    def transposed(self) -> "LinearSpec":
        """``L^T``: irreps swapped, each block reads ``W_i^T`` from the same flat weight; no biases."""
        ins = [LinearInstruction(i.i_out, i.i_in, i.mul_out, i.mul_in, i.path_weight, i.weight_offset,
                                 i.weight_stride_out, i.weight_stride_in) for i in self.instructions]
        return LinearSpec.of(self.out_layout.irreps_str, self.in_layout.irreps_str, ins, self.layout, False)

    def with_layout(self, layout: str) -> "LinearSpec":
        """The same linear map on features stored in ``layout``."""
        if layout == self.layout:
            return self
        return LinearSpec.of(self.in_layout.irreps_str, self.out_layout.irreps_str, self.instructions,
                             layout, self.biases)

    # ------------------------------------------------------------------ misc
    @property
    def dim_in(self) -> int:
        return self.in_layout.dim

    @property
    def dim_out(self) -> int:
        return self.out_layout.dim

    @functools.cached_property
    def bias_columns(self) -> Tuple[int, ...]:
        """Output column of every bias element, in bias order."""
        out = []
        for f, b in zip(self.biases, self.out_layout.blocks):
            if f:
                out.extend(range(b.offset, b.offset + b.dim))
        return tuple(out)

    def weight_slices(self) -> Tuple[Tuple[int, int], ...]:
        """``(offset, numel)`` of every instruction's block in the flat weight."""
        return tuple((i.weight_offset, i.numel) for i in self.instructions)

    def __repr__(self) -> str:
        return (f"LinearSpec({self.in_layout.irreps_str!r} -> {self.out_layout.irreps_str!r}, "
                f"layout={self.layout!r}, instructions={len(self.instructions)}, "
                f"weights={self.weight_numel}, biases={self.bias_numel})")

    def __eq__(self, other) -> bool:
        return other is self or (isinstance(other, LinearSpec) and other.key == self.key)

    def __hash__(self) -> int:
        self.key  # noqa: B018 - builds the key and its hash once
        return self.__dict__["_hash"]


# ============================================================================ torch tables
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
    )
