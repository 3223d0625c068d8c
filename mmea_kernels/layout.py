"""Irreps layout descriptors: which feature column belongs to which magnitude gate.

Pure Python (no torch): a descriptor is built once per (irreps, layout) and cached; the torch
index tables derived from it live in :mod:`mmea_kernels.ops.tables`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import List, Optional, Sequence, Tuple

__all__ = ["IrrepBlock", "IrrepsLayout", "parse_irreps", "column_span", "LAYOUTS"]

LAYOUTS = ("mul_ir", "ir_mul")

_IRREP_RE = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+)\s*([eoy])\s*$")  # y: parity (-1)^l, as e3nn


class cached_property:  # noqa: N801 - the name of what it replaces
    """``functools.cached_property`` without its lock: computed once per instance and kept in the
    instance's ``__dict__``. Python 3.11's version enters an ``RLock``, which torch.compile cannot
    trace (fullgraph fails on the first access inside a compiled function)."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


def warm_cached(obj, skip=()) -> None:
    """Compute every :class:`cached_property` of ``obj`` now (all but ``skip``): under
    torch.compile, a first access inside a traced function writes the instance ``__dict__``,
    which dynamo guards on and then fails its own guard (fullgraph; found when a spec's layout
    was first read inside ``torch.compile(gated_linear)``)."""
    for name in dir(type(obj)):
        if name not in skip and isinstance(getattr(type(obj), name, None), cached_property):
            getattr(obj, name)


@dataclasses.dataclass(frozen=True)
class IrrepBlock:
    """One ``mul x (l, p)`` block of an irreps, placed at ``offset`` in the feature vector."""

    mul: int
    l: int
    p: int  # +1 even, -1 odd
    offset: int  # first column of the block
    first_gate: int  # gate index of multiplicity 0 (-1 for additive 0e blocks)

    @property
    def ir_dim(self) -> int:
        return 2 * self.l + 1

    @property
    def dim(self) -> int:
        return self.mul * self.ir_dim

    @property
    def is_scalar(self) -> bool:
        """True scalar (0e): gets the additive term, never a multiplicative gate."""
        return self.l == 0 and self.p == 1

    @property
    def name(self) -> str:
        return f"{self.mul}x{self.l}{'e' if self.p == 1 else 'o'}"


def parse_irreps(irreps) -> Tuple[Tuple[int, int, int], ...]:
    """Return ``((mul, l, p), ...)`` from an e3nn ``Irreps``, a cuEquivariance ``Irreps``, a string
    like ``"128x0e+128x1o"`` (parity ``e``, ``o``, or e3nn's ``y``: ``(-1)^l``) or a sequence of
    ``(mul, ir)`` pairs. Order and repeats are kept (no simplification)."""
    if isinstance(irreps, str):
        out = []
        text = irreps.strip()
        if text == "":
            return ()
        for term in text.split("+"):
            m = _IRREP_RE.match(term)
            if m is None:
                raise ValueError(f"invalid irreps string {irreps!r}: cannot parse term {term.strip()!r}")
            mul, l = int(m.group(1)) if m.group(1) is not None else 1, int(m.group(2))
            p = (-1) ** l if m.group(3) == "y" else (1 if m.group(3) == "e" else -1)
            out.append((mul, l, p))
        return tuple(out)
    try:
        items = list(irreps)
    except TypeError:
        raise TypeError(
            f"irreps must be a string, an e3nn/cuEquivariance Irreps or (mul, ir) pairs, got {type(irreps).__name__}"
        ) from None
    out = []
    for item in items:
        try:
            mul, ir = item
        except (TypeError, ValueError):
            raise TypeError(f"irreps entry {item!r} is not a (mul, ir) pair") from None
        l, p = _irrep_lp(ir)
        out.append((int(mul), l, p))
    return tuple(out)


def column_span(cols: Sequence[int]) -> Optional[Tuple[int, int]]:
    """``(first, count)`` when the columns ``cols`` are one contiguous increasing range (non-empty), else
    None: such columns are read as a slice (a view), others need a gather."""
    cols = list(cols)
    return (cols[0], len(cols)) if cols and cols == list(range(cols[0], cols[0] + len(cols))) else None


def _irrep_lp(ir) -> Tuple[int, int]:
    if isinstance(ir, str):
        (_, l, p), = parse_irreps(ir)
        return l, p
    if hasattr(ir, "l") and hasattr(ir, "p"):  # e3nn Irrep and cuEquivariance O3
        return int(ir.l), int(ir.p)
    try:
        l, p = ir
        return int(l), int(p)
    except (TypeError, ValueError):
        raise TypeError(f"cannot read (l, p) from irrep {ir!r}") from None


class IrrepsLayout:
    """Column -> gate map of a feature vector with the given irreps and memory layout.

    * ``mul_ir`` (e3nn): inside a block, column ``offset + k*(2l+1) + m``.
    * ``ir_mul`` (cuEquivariance): inside a block, column ``offset + m*mul + k``.

    Every block that is not a true scalar (l >= 1, or odd parity such as 0o) has one gate per
    multiplicity ``k``; gates are numbered block by block, then by ``k``. 0e columns carry no
    gate (they get the additive term) and are listed in :attr:`scalar_columns`.
    """

    def __init__(self, irreps, layout: str = "mul_ir"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        self.layout = layout
        parsed = parse_irreps(irreps)
        blocks: List[IrrepBlock] = []
        offset = 0
        gate = 0
        for mul, l, p in parsed:
            if mul < 0 or l < 0 or p not in (1, -1):
                raise ValueError(f"invalid irrep {mul}x{l}{p} in {irreps!r}")
            is_scalar = l == 0 and p == 1
            blocks.append(IrrepBlock(mul, l, p, offset, -1 if is_scalar else gate))
            offset += mul * (2 * l + 1)
            if not is_scalar:
                gate += mul
        self.blocks: Tuple[IrrepBlock, ...] = tuple(blocks)
        self.dim = offset
        self.num_gates = gate
        self.irreps_str = "+".join(b.name for b in blocks)
        warm_cached(self)

    # ------------------------------------------------------------------ derived tables
    @cached_property
    def gate_of_column(self) -> Tuple[int, ...]:
        """Gate index of every column, -1 for 0e columns."""
        out = [-1] * self.dim
        for b in self.blocks:
            if b.is_scalar:
                continue
            for k in range(b.mul):
                for m in range(b.ir_dim):
                    out[self._column(b, k, m)] = b.first_gate + k
        return tuple(out)

    @cached_property
    def scalar_columns(self) -> Tuple[int, ...]:
        """Columns of all 0e blocks, in irreps order (the adapter's input and additive channels)."""
        return tuple(c for b in self.blocks if b.is_scalar for c in range(b.offset, b.offset + b.mul))

    @cached_property
    def scalar_span(self) -> Optional[Tuple[int, int]]:
        """``(first, count)`` when :attr:`scalar_columns` are one contiguous range, else None."""
        return column_span(self.scalar_columns)

    @cached_property
    def gate_columns(self) -> Tuple[Tuple[int, ...], ...]:
        """For each gate, its columns in order of the component m."""
        out: List[Tuple[int, ...]] = []
        for b in self.blocks:
            if b.is_scalar:
                continue
            for k in range(b.mul):
                out.append(tuple(self._column(b, k, m) for m in range(b.ir_dim)))
        return tuple(out)

    @cached_property
    def gate_ptr(self) -> Tuple[int, ...]:
        """CSR offsets into the gate-sorted column list (``len == num_gates + 1``)."""
        ptr = [0]
        for cols in self.gate_columns:
            ptr.append(ptr[-1] + len(cols))
        return tuple(ptr)

    @property
    def num_scalars(self) -> int:
        return len(self.scalar_columns)

    @property
    def max_gate_width(self) -> int:
        """Largest 2l+1 among gated blocks (0 when there is no gate)."""
        return max((b.ir_dim for b in self.blocks if not b.is_scalar and b.mul > 0), default=0)

    @property
    def gate_orders(self) -> Tuple[Tuple[int, int], ...]:
        """(l, p) of each gate."""
        return tuple((b.l, b.p) for b in self.blocks if not b.is_scalar for _ in range(b.mul))

    def _column(self, b: IrrepBlock, k: int, m: int) -> int:
        if self.layout == "mul_ir":
            return b.offset + k * b.ir_dim + m
        return b.offset + m * b.mul + k

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return (
            f"IrrepsLayout({self.irreps_str!r}, layout={self.layout!r}, dim={self.dim}, "
            f"num_gates={self.num_gates}, num_scalars={self.num_scalars})"
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, IrrepsLayout) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> Tuple[str, str]:
        return (self.irreps_str, self.layout)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _cached(irreps_str: str, layout: str) -> "IrrepsLayout":
        return IrrepsLayout(irreps_str, layout)

    @classmethod
    def of(cls, irreps, layout: Optional[str] = None) -> "IrrepsLayout":
        """Cached constructor; ``layout`` defaults to ``"mul_ir"``. Accepts an ``IrrepsLayout`` too:
        returned unchanged, unless ``layout`` names the other layout (then the same irreps in it)."""
        if isinstance(irreps, IrrepsLayout):
            if layout is not None and irreps.layout != layout:
                if layout not in LAYOUTS:
                    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
                return cls._cached(irreps.irreps_str, layout)
            return irreps
        if layout is None:
            layout = "mul_ir"
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        parsed = parse_irreps(irreps)
        text = "+".join(f"{m}x{l}{'e' if p == 1 else 'o'}" for m, l, p in parsed)
        return cls._cached(text, layout)
