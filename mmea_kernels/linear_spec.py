"""Descriptor of an equivariant linear layer (the semantics of ``e3nn.o3.Linear``) for the fused
gated-linear kernels.

:class:`LinearSpec` is pure Python (no torch): irreps in/out, the memory layout, one
:class:`LinearInstruction` per weight block (``i_in -> i_out`` with its path weight and where its
``[mul_in, mul_out]`` block lives in the flat weight vector), and which 0e output blocks carry a
bias. It is built once per key (:meth:`LinearSpec.of`, :meth:`LinearSpec.from_e3nn`) and cached.

It is the one description of an equivariant linear layer in the package: the adapters read
their irreps, layouts and weight blocks from it (:meth:`LinearSpec.from_module`: e3nn ``o3.Linear``
or cuEquivariance ``cuet.Linear``), ELoRA and the ``mmea-paper`` low-rank deltas read the weight
blocks (:meth:`LinearSpec.weight_blocks`, :func:`tensor_product_blocks` for an e3nn tensor product),
and the fused kernels build their index tables from it (``ops/gated_linear/tables.py``).

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

import ast
import dataclasses
import functools
import math
import re
import sys
from typing import List, Optional, Sequence, Tuple, Union

from .layout import LAYOUTS, IrrepsLayout, cached_property, column_span, parse_irreps, warm_cached

__all__ = ["LinearInstruction", "LinearSpec", "tensor_product_blocks", "is_e3nn_linear", "is_cuet_linear"]


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
        layout: ``"mul_ir"`` (e3nn) or ``"ir_mul"`` (cuEquivariance), of the input (and of the
            output unless ``layout_out`` is given; the fused kernels need one layout for both).
        biases: ``True`` (every 0e output block), ``False``/``None`` (none) or one bool per output
            block (only 0e blocks may have one). Bias elements are numbered block by block.
        layout_out: the output's layout when it differs from the input's (a ``cuet.Linear`` can
            read ``mul_ir`` and write ``ir_mul``).

    Prefer the cached constructors :meth:`of` and :meth:`from_e3nn`.
    """

    def __init__(self, irreps_in, irreps_out, instructions: Sequence, layout: str = "mul_ir",
                 biases: Union[bool, Sequence[bool], None] = False, layout_out: Optional[str] = None):
        layout_out = layout if layout_out is None else layout_out
        for name in (layout, layout_out):
            if name not in LAYOUTS:
                raise ValueError(f"unknown layout {name!r}; expected one of {LAYOUTS}")
        self.layout, self.layout_out = layout, layout_out
        pin, pout = parse_irreps(irreps_in), parse_irreps(irreps_out)
        self.in_layout = IrrepsLayout.of(_irreps_text(pin), layout)
        self.out_layout = IrrepsLayout.of(_irreps_text(pout), layout_out)
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
        warm_cached(self, skip=("transposed",))  # the transposed spec is built where it is needed

    # ------------------------------------------------------------------ constructors
    @property
    def key(self):
        """Hashable identity (irreps, instructions, layout, biases); built once per spec, since the
        kernels' launch path asks for it on every call."""
        key = self.__dict__.get("_key")
        if key is None:
            key = (self.in_layout.irreps_str, self.out_layout.irreps_str,
                   tuple(dataclasses.astuple(i) for i in self.instructions), self.layout, self.biases,
                   self.layout_out)
            self.__dict__["_key"] = key
            self.__dict__["_hash"] = hash(key)
        return key

    @property
    def key_text(self) -> str:
        """The key written out (the fused linear's custom ops take it as their argument): the same
        in every process; :meth:`from_key_text` reads it back."""
        text = self.__dict__.get("_key_text")
        if text is None:
            text = self.__dict__["_key_text"] = repr(self.key)
        return text

    @classmethod
    def from_key_text(cls, text: str) -> "LinearSpec":
        return cls._cached(*ast.literal_eval(text))

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _cached(irreps_in: str, irreps_out: str, instructions: Tuple, layout: str,
                biases: Tuple[bool, ...], layout_out: str) -> "LinearSpec":
        return LinearSpec(irreps_in, irreps_out, [LinearInstruction(*i) for i in instructions], layout, biases,
                          layout_out)

    @classmethod
    def of(cls, irreps_in, irreps_out, instructions: Sequence, layout: str = "mul_ir",
           biases: Union[bool, Sequence[bool], None] = False, layout_out: Optional[str] = None) -> "LinearSpec":
        """Cached constructor (same arguments as the class)."""
        spec = cls(irreps_in, irreps_out, instructions, layout, biases, layout_out)  # validates, normalises
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
    def from_e3nn(cls, linear, layout: str = "mul_ir", plain: bool = True) -> "LinearSpec":
        """The spec of an ``e3nn.o3.Linear`` (its instructions, path weights and biases).

        ``plain`` (what the fused kernels need): no ``f_in``/``f_out``, so that the weight vector is
        ``linear.weight`` (or the ``weight=`` argument it is called with) and the bias vector is
        ``linear.bias``. Adapters, which only read irreps and blocks, pass ``plain=False``.
        """
        if not (hasattr(linear, "irreps_in") and hasattr(linear, "irreps_out") and hasattr(linear, "instructions")):
            raise TypeError(f"expected an e3nn.o3.Linear, got {type(linear).__name__}")
        w = getattr(linear, "weight", None)
        if plain and w is not None and getattr(w, "dim", lambda: 1)() > 1:
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

    @classmethod
    def from_cuet(cls, linear) -> "LinearSpec":
        """The spec of a ``cuequivariance_torch.Linear`` (one weight class), from its descriptor
        ``cue.descriptors.linear(irreps_in, irreps_out)`` (``weights[uv], input[iu], output[iv]``:
        every pair of equal irreps, input-major, a row-major ``[mul_in, mul_out]`` block each) and its
        layouts (kept only in ``transpose_in.source`` / ``transpose_out.target``). No biases."""
        import cuequivariance as cue

        for irreps, where in ((linear.irreps_in, "irreps_in"), (linear.irreps_out, "irreps_out")):
            for _, ir in irreps:
                if not isinstance(ir, cue.O3):
                    raise TypeError(
                        "adapters on a cuequivariance_torch Linear need O(3) irreps (cue.O3 or a subclass such as "
                        f"mace's O3_e3nn), whose 0e channels are the invariant scalars; {where} has irrep {ir!r} "
                        f"of group {type(ir).__name__}")
        desc = cue.descriptors.linear(linear.irreps_in, linear.irreps_out)
        if len(desc.polynomial.operations) != 1:
            raise ValueError("unexpected cue.descriptors.linear: more than one operation")
        (_, stp), = desc.polynomial.operations
        if stp.subscripts != "uv,iu,iv":
            raise ValueError(f"unexpected cue.descriptors.linear subscripts {stp.subscripts!r}, expected 'uv,iu,iv'")
        seg_w = stp.operands[0].segments
        offsets, off = [], 0
        for shape in seg_w:
            offsets.append(off)
            off += int(shape[0]) * int(shape[1])
        if off != int(linear.weight_numel):
            raise ValueError(f"descriptor weight has {off} elements, the layer {linear.weight_numel}")
        ins, used = [], set()
        for path in stp.paths:
            s, i_in, i_out = (int(i) for i in path.indices)
            if s in used:
                raise ValueError(f"weight segment {s} feeds more than one path")
            used.add(s)
            mul_in, mul_out = (int(d) for d in seg_w[s])
            c = path.coefficients
            pw = float(c.item() if hasattr(c, "item") else c)
            ins.append(LinearInstruction(i_in, i_out, mul_in, mul_out, pw, offsets[s], mul_out, 1))
        if used != set(range(len(seg_w))):
            raise ValueError("some weight segments of the descriptor feed no path")
        ins.sort(key=lambda i: i.weight_offset)
        return cls.of(linear.irreps_in, linear.irreps_out, ins, _layout_name(linear.transpose_in.source), False,
                      _layout_name(linear.transpose_out.target))

    @classmethod
    def from_module(cls, linear) -> "LinearSpec":
        """The spec of a layer adapters can wrap: e3nn ``o3.Linear`` (any, ``plain=False``) or
        ``cuequivariance_torch.Linear``; a clear ``TypeError`` for anything else."""
        if is_e3nn_linear(linear):
            return cls.from_e3nn(linear, plain=False)
        if is_cuet_linear(linear):
            return cls.from_cuet(linear)
        raise TypeError(f"adapters wrap e3nn o3.Linear layers; got {type(linear).__module__}.{type(linear).__name__} "
                        "(cuequivariance_torch.Linear layers are supported too)")

    def weight_blocks(self) -> Tuple[Tuple[int, int, int], ...]:
        """``(offset, mul_in, mul_out)`` of every block of the flat weight, in weight order (what a
        low-rank update per block needs)."""
        return tuple((i.weight_offset, i.mul_in, i.mul_out) for i in self.instructions)

    # ------------------------------------------------------------------ derived specs
    @cached_property
    def transposed(self) -> "LinearSpec":
        """``L^T``: irreps swapped, each block reads ``W_i^T`` from the same flat weight; no biases."""
        ins = [LinearInstruction(i.i_out, i.i_in, i.mul_out, i.mul_in, i.path_weight, i.weight_offset,
                                 i.weight_stride_out, i.weight_stride_in) for i in self.instructions]
        return LinearSpec.of(self.out_layout.irreps_str, self.in_layout.irreps_str, ins, self.layout_out, False,
                             self.layout)

    def with_layout(self, layout: str) -> "LinearSpec":
        """The same linear map on features stored in ``layout`` (input and output)."""
        if layout == self.layout == self.layout_out:
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

    @cached_property
    def bias_columns(self) -> Tuple[int, ...]:
        """Output column of every bias element, in bias order."""
        out = []
        for f, b in zip(self.biases, self.out_layout.blocks):
            if f:
                out.extend(range(b.offset, b.offset + b.dim))
        return tuple(out)

    @cached_property
    def bias_span(self) -> Optional[Tuple[int, int]]:
        """``(first, count)`` when :attr:`bias_columns` are one contiguous range, else None."""
        return column_span(self.bias_columns)

    def weight_slices(self) -> Tuple[Tuple[int, int], ...]:
        """``(offset, numel)`` of every instruction's block in the flat weight."""
        return tuple((i.weight_offset, i.numel) for i in self.instructions)

    def __repr__(self) -> str:
        return (f"LinearSpec({self.in_layout.irreps_str!r} -> {self.out_layout.irreps_str!r}, "
                f"layout={self.layout if self.layout == self.layout_out else self.layout + '->' + self.layout_out!r}, "
                f"instructions={len(self.instructions)}, "
                f"weights={self.weight_numel}, biases={self.bias_numel})")

    def __eq__(self, other) -> bool:
        return other is self or (isinstance(other, LinearSpec) and other.key == self.key)

    def __hash__(self) -> int:
        self.key  # noqa: B018 - builds the key and its hash once
        return self.__dict__["_hash"]


def is_e3nn_linear(module) -> bool:
    """True for an ``e3nn.o3.Linear`` (never imports e3nn: an instance can exist only once it is),
    also one whose e3nn was loaded from a ``torch.package`` file (:func:`packaged_class_is`)."""
    o3 = sys.modules.get("e3nn.o3")
    return (o3 is not None and isinstance(module, o3.Linear)) or packaged_class_is(module, "e3nn.o3._linear.Linear")


_PACKAGED_MODULE = re.compile(r"<torch_package_\d+>\.(.+)")


def packaged_class_is(obj, path: str) -> bool:
    """Whether ``obj``'s class is the class ``path`` (``"e3nn.o3._linear.Linear"``) of a library a
    ``torch.package`` file holds its own copy of (NequIP's packages intern e3nn: their modules'
    classes are ``<torch_package_0>.e3nn.o3._linear.Linear``, not ``e3nn.o3.Linear``)."""
    cls = type(obj)
    m = _PACKAGED_MODULE.fullmatch(cls.__module__)
    return m is not None and f"{m.group(1)}.{cls.__qualname__}" == path


def is_cuet_linear(module) -> bool:
    """True for a ``cuequivariance_torch.Linear`` (never imports cuequivariance_torch)."""
    mod = sys.modules.get("cuequivariance_torch")
    cls = getattr(mod, "Linear", None) if mod is not None else None
    return cls is not None and isinstance(module, cls)


def _layout_name(layout) -> str:
    """``"mul_ir"`` / ``"ir_mul"`` from a ``cue.IrrepsLayout`` (or its name)."""
    name = getattr(layout, "name", layout)
    if name not in LAYOUTS:
        raise ValueError(f"unsupported irreps layout {layout!r}; expected cue.mul_ir or cue.ir_mul")
    return name


def tensor_product_blocks(tp) -> Tuple[Tuple[int, int, int], ...]:
    """``(offset, mul_in1·mul_in2, mul_out)`` of every weighted instruction of an e3nn
    ``TensorProduct`` in weight order (the blocks a low-rank update per path factorises; only
    ``uvw`` paths, whose weight is ``[mul_in1, mul_in2, mul_out]``)."""
    blocks, off = [], 0
    for ins in tp.instructions:
        if not ins.has_weight:
            continue
        if len(ins.path_shape) != 3:
            raise ValueError(f"unsupported tensor-product path shape {ins.path_shape} (connection {ins.connection_mode})")
        blocks.append((off, ins.path_shape[0] * ins.path_shape[1], ins.path_shape[2]))
        off += math.prod(ins.path_shape)
    return tuple(blocks)
