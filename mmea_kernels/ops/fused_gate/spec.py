"""What a fused gate computes, as plain data: :class:`FusedGateSpec`, its string key (what the
custom ops carry), the activations the kernels know, and the index tables cached per device.

A gate maps a row ``x`` of ``d_in`` columns to a row ``y`` of ``d_out`` columns:

* scalar segments ``(src, dst, n, act, cst)``: ``y[dst + i] = cst * act(x[src + i])``, ``i < n``;
* gate segments ``(src, gdst, n, act, cst)``: ``g[gdst + i] = cst * act(x[src + i])`` (``G`` gates);
* gated blocks ``(src, dst, mul, dim, gate0, ir_mul)``: copy ``u < mul`` of an irrep of dimension
  ``dim`` is multiplied by ``g[gate0 + u]``; its component ``m`` is column ``u*dim + m`` of the block
  (mul_ir) or ``m*mul + u`` (ir_mul), at ``src`` in ``x`` and at ``dst`` in ``y``.

Scalar, gate and gated columns partition ``[0, d_in)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, List, Optional, Tuple

import torch

from .._utils import pow2

__all__ = ["ACT_CODES", "ACT_NAMES", "FusedGateSpec", "activation_code", "ssp", "spec_tables", "GateTables",
           "gate_irreps"]

# activation name -> kernel code (csrc/fused_gate.cpp, triton.py and reference.py use the same codes)
ACT_CODES: Dict[str, int] = {"identity": 0, "silu": 1, "sigmoid": 2, "tanh": 3, "abs": 4, "softplus": 5, "ssp": 6}
ACT_NAMES: Dict[int, str] = {v: k for k, v in ACT_CODES.items()}
LOG2 = math.log(2.0)


def ssp(x: torch.Tensor) -> torch.Tensor:
    """Shifted softplus, ``softplus(x) - log 2`` (SchNet's; SevenNet's ``ShiftedSoftPlus``)."""
    return torch.nn.functional.softplus(x) - LOG2


def _known_functions() -> Dict[object, str]:
    F = torch.nn.functional
    table = {F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
             torch.tanh: "tanh", F.tanh: "tanh", torch.Tensor.tanh: "tanh", torch.abs: "abs",
             torch.Tensor.abs: "abs", F.softplus: "softplus", ssp: "ssp"}
    try:  # SevenNet's scripted shifted softplus
        from sevenn.nn.activation import ShiftedSoftPlus
        table[ShiftedSoftPlus] = "ssp"
    except Exception:  # noqa: BLE001 - optional dependency
        pass
    return table


_KNOWN: Optional[Dict[object, str]] = None


def activation_code(act) -> Optional[int]:
    """The kernel code of ``act`` (a function or module; ``None`` is the identity), or ``None`` when
    the kernels do not know it (the gate then runs the reference path with ``act`` itself)."""
    global _KNOWN
    if act is None:
        return ACT_CODES["identity"]
    if _KNOWN is None:
        _KNOWN = _known_functions()
    try:
        name = _KNOWN.get(act)
    except TypeError:  # unhashable callable
        name = None
    if name is not None:
        return ACT_CODES[name]
    nn = torch.nn
    if type(act) is nn.SiLU:
        return ACT_CODES["silu"]
    if type(act) is nn.Sigmoid:
        return ACT_CODES["sigmoid"]
    if type(act) is nn.Tanh:
        return ACT_CODES["tanh"]
    if type(act) is nn.Identity:
        return ACT_CODES["identity"]
    if type(act) is nn.Softplus and act.beta == 1 and act.threshold == 20:
        return ACT_CODES["softplus"]
    return _by_name(act)


# activations of other packages, found by where they are defined (without importing the package) and
# used only when their values agree with the kernel's function: NequIP's shifted softplus
_NAMED = {("nequip.nn.nonlinearities", "shifted_softplus"): "ssp", ("nequip.nn.nonlinearities", "ShiftedSoftplus"): "ssp"}
_REFERENCE = {"ssp": ssp}


def _by_name(act) -> Optional[int]:
    owner = act if callable(act) and hasattr(act, "__name__") else type(act)
    name = _NAMED.get((getattr(owner, "__module__", None), getattr(owner, "__name__", None)))
    if name is None:
        return None
    x = torch.linspace(-40.0, 40.0, 1601, dtype=torch.float64)
    try:
        with torch.no_grad():
            same = torch.allclose(act(x), _REFERENCE[name](x), rtol=1e-13, atol=1e-13)
    except Exception:  # noqa: BLE001 - not a float64 elementwise function: not fused
        return None
    return ACT_CODES[name] if same else None


Seg = Tuple[int, int, int, int, float]  # (src, dst, n, act code, cst)
Block = Tuple[int, int, int, int, int, bool]  # (src, dst, mul, dim, gate0, ir_mul)


@dataclasses.dataclass(frozen=True)
class FusedGateSpec:
    d_in: int
    d_out: int
    num_gates: int
    scalars: Tuple[Seg, ...]
    gates: Tuple[Seg, ...]
    gated: Tuple[Block, ...]

    def __post_init__(self):
        _check_spec(self)

    @property
    def num_scalars(self) -> int:
        return sum(s[2] for s in self.scalars)

    def key(self) -> str:
        def seg(s):
            return f"{s[0]},{s[1]},{s[2]},{s[3]},{float(s[4]).hex()}"

        def blk(b):
            return f"{b[0]},{b[1]},{b[2]},{b[3]},{b[4]},{int(b[5])}"

        return (f"fg1|{self.d_in},{self.d_out},{self.num_gates}|" + ";".join(map(seg, self.scalars)) + "|"
                + ";".join(map(seg, self.gates)) + "|" + ";".join(map(blk, self.gated)))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key: str) -> "FusedGateSpec":
        head, dims, s, g, b = key.split("|")
        if head != "fg1":
            raise ValueError(f"not a fused gate key: {key[:40]!r}")
        d_in, d_out, G = (int(v) for v in dims.split(","))

        def segs(txt):
            out = []
            for part in filter(None, txt.split(";")):
                a, d, n, c, cst = part.split(",")
                out.append((int(a), int(d), int(n), int(c), float.fromhex(cst)))
            return tuple(out)

        blocks = []
        for part in filter(None, b.split(";")):
            v = [int(t) for t in part.split(",")]
            blocks.append((v[0], v[1], v[2], v[3], v[4], bool(v[5])))
        return FusedGateSpec(d_in, d_out, G, segs(s), segs(g), tuple(blocks))


def _cover(what: str, spans, size: int) -> None:
    """``ValueError`` unless the ``(start, length)`` spans cover ``[0, size)`` exactly once."""
    count = [0] * size
    for start, n in spans:
        if n < 0 or start < 0 or start + n > size:
            raise ValueError(f"FusedGateSpec: {what} span [{start}, {start + n}) is outside [0, {size})")
        for c in range(start, start + n):
            count[c] += 1
    bad = next((c for c, k in enumerate(count) if k != 1), None)
    if bad is not None:
        raise ValueError(f"FusedGateSpec: {what} must cover [0, {size}) exactly once; column {bad} is covered "
                         f"{count[bad]} times")


def _check_spec(sp: "FusedGateSpec") -> None:
    """What the kernels assume of a spec (they index with it unchecked): every table in range, the
    input columns partitioned, the output columns written once (scalars first, in order), every gate
    computed once, known activation codes."""
    for v in (sp.d_in, sp.d_out, sp.num_gates):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"FusedGateSpec: d_in, d_out and num_gates must be integers >= 0, got {v!r}")
    for seg in sp.scalars + sp.gates:
        if seg[3] not in ACT_NAMES:
            raise ValueError(f"FusedGateSpec: unknown activation code {seg[3]!r} in segment {seg}; known: {ACT_NAMES}")
    for blk in sp.gated:
        if blk[2] < 0 or blk[3] < 1 or blk[4] < 0 or blk[4] + blk[2] > sp.num_gates:
            raise ValueError(f"FusedGateSpec: gated block {blk} (src, dst, mul, dim, gate0, ir_mul) needs mul >= 0, "
                             f"dim >= 1 and gates gate0..gate0+mul-1 among the {sp.num_gates} gates")
    _cover("the input columns of the scalar, gate and gated segments",
           [(s[0], s[2]) for s in sp.scalars + sp.gates] + [(b[0], b[2] * b[3]) for b in sp.gated], sp.d_in)
    _cover("the output columns of the scalar and gated segments",
           [(s[1], s[2]) for s in sp.scalars] + [(b[1], b[2] * b[3]) for b in sp.gated], sp.d_out)
    _cover("the gate segments' gates", [(g[1], g[2]) for g in sp.gates], sp.num_gates)
    pos = 0
    for src, dst, n, _, _ in sp.scalars:
        if dst != pos:
            raise ValueError(f"FusedGateSpec: scalar outputs come first and in order; segment at {src} writes "
                             f"column {dst}, expected {pos}")
        pos += n


@dataclasses.dataclass
class GateTables:
    """Index tables of a spec on one device (reference path, Triton kernels, C++ kernels)."""

    spec: FusedGateSpec
    s_src: torch.Tensor  # int64 [S]  input column of each scalar output column
    g_src: torch.Tensor  # int64 [G]  input column of each gate
    d_src: torch.Tensor  # int64 [Dg] input column of each gated output column (output order)
    d_gate: torch.Tensor  # int64 [Dg] gate of each gated output column
    s_groups: List[Tuple[int, Optional[torch.Tensor], float]]  # (act, positions in [0,S) or None = all, cst)
    g_groups: List[Tuple[int, Optional[torch.Tensor], float]]
    cpp_segs: torch.Tensor  # int64 [R, 8] (kind, src, dst, n|mul, dim, act, gate0, ir_mul); kind 0/1/2
    cpp_csts: torch.Tensor  # float64 [R]
    # per-column tables of the Triton kernels
    fwd_cols: torch.Tensor  # int64 [4, d_out]: kind (0 scalar, 1 gated), src, act, gate input column
    fwd_cst: torch.Tensor  # float64 [d_out]: cst of the act applied (scalar's, or its gate's)
    bwd_cols: torch.Tensor  # int64 [4, d_in]: kind (0 scalar, 1 gated, 2 gate), dst, act, gate input column
    bwd_cst: torch.Tensor  # float64 [d_in]
    members: torch.Tensor  # int64 [2, d_in, W]: gate columns: (input col, output col) of its members, -1 pad
    width: int  # W (power of 2)
    used: int  # bitmask of the activation codes used


def _groups(segs, device):
    """Columns of the concatenated segments grouped by (act, cst)."""
    by: Dict[Tuple[int, float], List[int]] = {}
    pos = 0
    for _, _, n, act, cst in segs:
        by.setdefault((act, cst), []).extend(range(pos, pos + n))
        pos += n
    if len(by) == 1:
        (act, cst), = by
        return [(act, None, cst)]
    return [(act, torch.tensor(cols, dtype=torch.int64, device=device), cst) for (act, cst), cols in by.items()]




_TABLES: Dict[Tuple[str, str], GateTables] = {}


def spec_tables(key: str, device, cache: bool = True) -> GateTables:
    """The tables of spec ``key`` on ``device``, cached (``cache=False``: built afresh, e.g. while
    tracing, where they become the trace's constants)."""
    device = torch.device(device)
    ck = (key, str(device))
    t = _TABLES.get(ck) if cache else None
    if t is not None:
        return t
    with torch._C._DisableFuncTorch():  # plain tensors inside a torch.func transform too (ops/tables.py)
        t = _build(FusedGateSpec.from_key(key), device)
    if cache:
        _TABLES[ck] = t
    return t


def _build(sp: FusedGateSpec, device) -> GateTables:
    s_src = [src + i for src, _, n, _, _ in sp.scalars for i in range(n)]
    s_dst = [dst + i for _, dst, n, _, _ in sp.scalars for i in range(n)]
    assert s_dst == list(range(sp.num_scalars)), "scalar outputs come first, in order"
    g_src, g_act, g_cst = [0] * sp.num_gates, [0] * sp.num_gates, [1.0] * sp.num_gates
    for src, gd, n, act, cst in sp.gates:
        for i in range(n):
            g_src[gd + i], g_act[gd + i], g_cst[gd + i] = src + i, act, cst
    fwd = [[0] * sp.d_out for _ in range(4)]
    fwd_cst = [1.0] * sp.d_out
    bwd = [[0] * sp.d_in for _ in range(4)]
    bwd_cst = [1.0] * sp.d_in
    for src, dst, n, act, cst in sp.scalars:
        for i in range(n):
            fwd[0][dst + i], fwd[1][dst + i], fwd[2][dst + i], fwd[3][dst + i] = 0, src + i, act, src + i
            fwd_cst[dst + i] = cst
            bwd[0][src + i], bwd[1][src + i], bwd[2][src + i], bwd[3][src + i] = 0, dst + i, act, src + i
            bwd_cst[src + i] = cst
    members: Dict[int, List[Tuple[int, int]]] = {}
    d_src = [0] * (sp.d_out - sp.num_scalars)
    d_gate = [0] * len(d_src)
    S = sp.num_scalars
    for src, dst, mul, dim, g0, ir_mul in sp.gated:
        for u in range(mul):
            g = g0 + u
            for m in range(dim):
                off = m * mul + u if ir_mul else u * dim + m
                xi, yi = src + off, dst + off
                d_src[yi - S], d_gate[yi - S] = xi, g
                fwd[0][yi], fwd[1][yi], fwd[2][yi], fwd[3][yi] = 1, xi, g_act[g], g_src[g]
                fwd_cst[yi] = g_cst[g]
                bwd[0][xi], bwd[1][xi], bwd[2][xi], bwd[3][xi] = 1, yi, g_act[g], g_src[g]
                bwd_cst[xi] = g_cst[g]
                members.setdefault(g, []).append((xi, yi))
    W = pow2(max([len(v) for v in members.values()] + [1]))
    mem = [[[-1] * W for _ in range(sp.d_in)] for _ in range(2)]
    for g in range(sp.num_gates):
        c = g_src[g]
        bwd[0][c], bwd[1][c], bwd[2][c], bwd[3][c] = 2, 0, g_act[g], c
        bwd_cst[c] = g_cst[g]
        for w, (xi, yi) in enumerate(members.get(g, [])):
            mem[0][c][w], mem[1][c][w] = xi, yi
    rows, csts = [], []
    for src, dst, n, act, cst in sp.scalars:
        rows.append([0, src, dst, n, 1, act, 0, 0])
        csts.append(cst)
    for src, gd, n, act, cst in sp.gates:
        rows.append([1, src, gd, n, 1, act, 0, 0])
        csts.append(cst)
    for src, dst, mul, dim, g0, ir_mul in sp.gated:
        rows.append([2, src, dst, mul, dim, 0, g0, int(ir_mul)])
        csts.append(1.0)
    used = 0
    for seg in sp.scalars + sp.gates:
        used |= 1 << seg[3]

    def li(v):
        return torch.tensor(v, dtype=torch.int64, device=device)

    def lf(v):
        return torch.tensor(v, dtype=torch.float64, device=device)

    t = GateTables(
        spec=sp, s_src=li(s_src), g_src=li(g_src), d_src=li(d_src), d_gate=li(d_gate),
        s_groups=_groups(sp.scalars, device), g_groups=_groups(sp.gates, device),
        cpp_segs=torch.tensor(rows, dtype=torch.int64).reshape(-1, 8).to(device), cpp_csts=lf(csts),
        fwd_cols=li(fwd).reshape(4, sp.d_out), fwd_cst=lf(fwd_cst), bwd_cols=li(bwd).reshape(4, sp.d_in),
        bwd_cst=lf(bwd_cst), members=li(mem).reshape(2, sp.d_in, W), width=W, used=used)
    return t


# ------------------------------------------------------------------------ irreps of an e3nn-style gate
def gate_irreps(layout: str, S, Gi, Dd, sorted_in, out_s, out_g):
    """``(irreps_scalars, irreps_gates, irreps_gated, irreps_in, irreps_out)`` of a gate (e3nn
    ``Irreps``) that describe its columns. ``S, Gi, Dd``: the scalars, gates and gated entries as
    given; ``sorted_in``: their sorted (unmerged) concatenation, the input's entries; ``out_s, out_g``:
    the activated scalars and gates (with their parities). mul_ir: e3nn's Gate's attributes
    (merged; merging keeps every mul_ir column in place). ir_mul: every entry is its own block, so
    the irreps are per entry (as mace-torch's ``GatedEquivariantBlock`` reports ``irreps_out``):
    ``1x1o+1x1o`` is not ``2x1o`` there; only entries of multiplicity 0 are dropped and adjacent
    equal scalars (dimension 1: both layouts agree) merged in ``irreps_in``."""
    from e3nn import o3

    if layout == "mul_ir":
        return (S.simplify(), Gi.simplify(), Dd.simplify(), sorted_in.simplify(),
                out_s + _elementwise_irreps_out(Dd, out_g))
    merged = []
    for mul, ir in sorted_in:
        if mul and merged and merged[-1][1] == ir and ir.dim == 1:
            merged[-1] = (merged[-1][0] + mul, ir)
        elif mul:
            merged.append((mul, ir))
    parities = [ir.p for mul, ir in out_g for _ in range(mul)]
    gated, k = [], 0
    for mul, ir in Dd:
        ps = set(parities[k:k + mul])
        if len(ps) > 1:  # the copies of one block with different parities: not an irreps block
            raise ValueError(f"layout='ir_mul': the gated entry {mul}x{ir} gets gates of both parities, so its "
                             f"output is not one ir_mul block; give it as entries whose gates share a parity "
                             f"(e.g. {'+'.join(['1x' + str(ir)] * mul)})")
        gated.append((mul, (ir.l, ir.p * (ps.pop() if ps else 1))))
        k += mul
    return S, Gi, Dd, o3.Irreps(merged), out_s + o3.Irreps(gated)


def _elementwise_irreps_out(irreps_gated, irreps_gates_out):
    """``ElementwiseTensorProduct(irreps_gated, irreps_gates_out).irreps_out`` without building it."""
    from e3nn import o3

    g1 = list(o3.Irreps(irreps_gated).simplify())
    g2 = list(o3.Irreps(irreps_gates_out).simplify())
    i = 0
    while i < len(g1):
        (m1, ir1), (m2, ir2) = g1[i], g2[i]
        if m1 < m2:
            g2[i] = (m1, ir2)
            g2.insert(i + 1, (m2 - m1, ir2))
        if m2 < m1:
            g1[i] = (m2, ir1)
            g1.insert(i + 1, (m1 - m2, ir1))
        i += 1
    return o3.Irreps([(m, ir) for (m, ir1), (_, ir2) in zip(g1, g2) for ir in ir1 * ir2])
