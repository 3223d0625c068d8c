"""``FusedGate``: a drop-in for ``e3nn.nn.Gate`` and mace-torch's ``GatedEquivariantBlock`` that
runs the gate as one fused pass (forward) and one fused pass (backward), and
:func:`replace_gates` / :func:`restore_gates` to swap it into (and out of) a model in place.

Semantics are e3nn's: the input is the sorted direct sum of ``irreps_scalars``, ``irreps_gates``
and ``irreps_gated``; the output is ``act_scalars(scalars)`` followed by ``gated · act_gates(gates)``,
each activation normalised to unit second moment by e3nn's ``normalize2mom`` (the constant read
from the module being replaced, or computed by e3nn's own code). ``layout="ir_mul"`` is the
cuEquivariance layout of mace-torch's ``GatedEquivariantBlock``. Odd scalars need an odd or even
activation, and ``irreps_out`` carries the resulting parities, exactly as in e3nn.

Activations with known derivatives (silu, sigmoid, tanh, abs, identity/None, softplus, shifted
softplus) run the fused kernels (C++ on CPU, Triton on CUDA, see
:mod:`mmea_kernels.ops.fused_gate`); any other activation runs the plain-PyTorch path (slices,
the activation, a broadcast multiply; differentiated by autograd), with the same numbers.
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..ops.fused_gate import FusedGateSpec, activation_code
from ..ops.fused_gate.spec import gate_irreps
from ..ops._utils import rows2d
from ..ops.fused_gate.function import FUSED_GATE_BACKENDS, check_backend, fused_gate_2d
from ..linear_spec import packaged_class_is
from .export_forms import NEQUIP_ATEN_MODIFIER, NEQUIP_CPP_MODIFIER

__all__ = ["FusedGate", "ScriptableFusedGate"]


@dataclasses.dataclass(frozen=True)
class _Act:
    code: Optional[int]  # kernel code, None: unknown (reference path)
    cst: float  # normalize2mom constant actually applied (1.0 where e3nn skips it)
    fn: Optional[Callable]  # the raw activation (None: identity)

    def __call__(self, x):
        if self.fn is None:
            return x
        y = self.fn(x)
        return y if self.cst == 1.0 else y.mul(self.cst)


_NORM_CACHE: Dict[int, Tuple[float, bool]] = {}


def _normalized(act) -> _Act:
    """``act`` with e3nn's normalize2mom constant (cached per kernel code: the same function)."""
    if act is None:
        return _Act(0, 1.0, None)
    code = activation_code(act)
    hit = _NORM_CACHE.get(code) if code is not None else None
    if hit is None:
        from e3nn.math import normalize2mom

        nm = normalize2mom(act)
        hit = (float(nm.cst), bool(nm._is_id))
        if code is not None:
            _NORM_CACHE[code] = hit
    cst, is_id = hit
    return _Act(code, 1.0 if is_id else cst, act)


def _from_normalize2mom(nm) -> _Act:
    """The activation of an e3nn ``Activation`` entry (a ``normalize2mom`` module or None)."""
    if nm is None:
        return _Act(0, 1.0, None)
    return _Act(activation_code(nm.f), 1.0 if nm._is_id else float(nm.cst), nm.f)


def _out_parity(a: _Act, p_in: int, what: str) -> int:
    """e3nn's Activation: the parity of ``act(x)`` for a scalar of parity ``p_in``."""
    if a.fn is None:
        return p_in
    x = torch.linspace(0, 10, 256)
    a1, a2 = a(x), a(-x)
    if (a1 - a2).abs().max() < 1e-5:
        p_act = 1
    elif (a1 + a2).abs().max() < 1e-5:
        p_act = -1
    else:
        p_act = 0
    p_out = p_act if p_in == -1 else p_in
    if p_out == 0:
        raise ValueError(f"{what}: the parity is violated! The input scalar is odd (0o) but the activation "
                         f"{getattr(a.fn, '__name__', a.fn)!r} is neither even nor odd.")
    return p_out


def _state_holder(src: nn.Module) -> Optional[nn.Module]:
    """A bare module tree holding the same parameters and buffers (same tensors, same names,
    same persistence) as ``src``'s subtree, or None when it has none: the swapped model keeps
    its state dict."""
    holder = nn.Module()
    found = False
    for name, p in src._parameters.items():
        holder._parameters[name] = p
        found = True
    for name, b in src._buffers.items():
        holder._buffers[name] = b
        if name in src._non_persistent_buffers_set:
            holder._non_persistent_buffers_set.add(name)
        found = True
    for name, child in src._modules.items():
        if child is None:
            continue
        sub = _state_holder(child)
        if sub is not None:
            holder._modules[name] = sub
            found = True
    return holder if found else None


def _adopt_state(dst: nn.Module, src: nn.Module) -> None:
    """``dst`` holds ``src``'s direct children, parameters and buffers (the same objects)."""
    dst._modules.update((k, v) for k, v in src._modules.items())
    dst._parameters.update(src._parameters)
    dst._buffers.update(src._buffers)
    dst._non_persistent_buffers_set |= src._non_persistent_buffers_set


class FusedGate(nn.Module):
    """Gate activation ``(⊕ φ_i(x_i)) ⊕ (⊕ φ_j(g_j) y_j)`` in one fused pass.

    Arguments as ``e3nn.nn.Gate`` (``irreps_scalars, act_scalars, irreps_gates, act_gates,
    irreps_gated``), plus ``layout`` (``"mul_ir"``, or ``"ir_mul"`` as mace-torch's
    ``GatedEquivariantBlock``), ``backend`` (``None``/``"auto"``, ``"torch"``, ``"cpp"``,
    ``"triton"``) and ``compat``: ``"e3nn"`` (default) carries the (empty) state of e3nn's Gate
    (``mul.weight``, ``mul.output_mask``) so checkpoints of a model built with ``e3nn.nn.Gate``
    load unchanged; ``"mace"`` carries none, as ``GatedEquivariantBlock``.
    Attributes as e3nn's Gate: ``irreps_in``, ``irreps_out``, ``irreps_scalars``,
    ``irreps_gates``, ``irreps_gated`` (in ir_mul per entry, each its own block: not merged; see
    :func:`~mmea_kernels.ops.fused_gate.spec.gate_irreps`); plus ``layout``, ``backend``, ``fused`` (whether every
    activation is one the kernels know; otherwise the plain-PyTorch path runs).
    """

    _nequip_custom_ops_libs = ("mmea_kernels",)  # as MMEALinear's (NequIP's AOTInductor files import it first)
    mmea_kernels_aten_only = NEQUIP_ATEN_MODIFIER  # NequIP model modifiers (export_forms)
    mmea_kernels_cpp_ops = NEQUIP_CPP_MODIFIER

    __e3nn_compile_mode__ = "script"  # e3nn.util.jit.compile scripts __prepare_scriptable__'s module

    # nn.Module's flag for full backward hooks, which share the replaced gate's hook dicts
    # (replace_gates): kept on that gate, so registering on either module sets it for both
    @property
    def _is_full_backward_hook(self):
        orig = self.__dict__.get("_original")
        return orig._is_full_backward_hook if orig is not None else self.__dict__.get("_own_full_backward_hook")

    @_is_full_backward_hook.setter
    def _is_full_backward_hook(self, value):
        orig = self.__dict__.get("_original")
        if orig is not None:
            orig._is_full_backward_hook = value
        else:
            self.__dict__["_own_full_backward_hook"] = value

    def __setstate__(self, state):  # nn.Module's would reset the flag (not in __dict__) on the gate's copy
        super().__setstate__({**state, "_is_full_backward_hook": None})
        self.__dict__.pop("_is_full_backward_hook", None)

    def __init__(self, irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated, layout: str = "mul_ir",
                 *, backend: Optional[str] = None, compat: str = "e3nn"):
        super().__init__()
        from e3nn import o3

        if layout not in ("mul_ir", "ir_mul"):
            raise ValueError(f"layout must be 'mul_ir' or 'ir_mul', got {layout!r}")
        if compat not in ("e3nn", "mace"):
            raise ValueError(f"compat must be 'e3nn' or 'mace', got {compat!r}")
        S, Gi, Dd = (o3.Irreps(v) for v in (irreps_scalars, irreps_gates, irreps_gated))
        # not Irreps.lmax: it fails on entries of multiplicity 0 (e3nn's Gate fails there with
        # "max() arg is an empty sequence"; here they are empty blocks)
        if any(ir.l > 0 for _, ir in Gi):
            raise ValueError(f"Gate scalars must be scalars, instead got irreps_gates = {Gi}")
        if any(ir.l > 0 for _, ir in S):
            raise ValueError(f"Scalars must be scalars, instead got irreps_scalars = {S}")
        if Gi.num_irreps != Dd.num_irreps:
            raise ValueError(f"There are {Dd.num_irreps} irreps in irreps_gated, but a different number "
                             f"({Gi.num_irreps}) of gate scalars in irreps_gates")
        act_scalars, act_gates = list(act_scalars), list(act_gates)
        for name, irr, acts in (("act_scalars", S, act_scalars), ("act_gates", Gi, act_gates)):
            if len(irr) != len(acts):
                raise ValueError(f"{name} has {len(acts)} activation(s) but irreps_{name[4:]} = {irr} has "
                                 f"{len(irr)} entries: give one activation (or None) per entry")
        a_s = [_normalized(a) for a in act_scalars]
        a_g = [_normalized(a) for a in act_gates]
        out_s = o3.Irreps([(mul, (0, _out_parity(a, ir.p, "Activation"))) if a.fn is not None else (mul, ir)
                           for (mul, ir), a in zip(S, a_s)])
        out_g = o3.Irreps([(mul, (0, _out_parity(a, ir.p, "Activation"))) if a.fn is not None else (mul, ir)
                           for (mul, ir), a in zip(Gi, a_g)])
        sorted_irreps = self._setup_e3nn(S, a_s, Gi, a_g, Dd, layout, backend)
        (self.irreps_scalars, self.irreps_gates, self.irreps_gated, self._irreps_in,
         self._irreps_out) = gate_irreps(layout, S, Gi, Dd, sorted_irreps, out_s, out_g)
        self._in_text = str(self._irreps_in)  # for messages: formatted under torch.compile it read as a variable
        if compat == "e3nn":
            self.mul = nn.Module()
            self.mul.register_buffer("weight", torch.zeros(0))
            self.mul.register_buffer("output_mask", torch.ones(Dd.dim))

    # --------------------------------------------------------------------------------- set-up
    def _setup(self, scalars, gates, blocks, d_in, d_out, num_gates, layout, backend):
        def seg(s):
            src, dst, n, a = s
            return (src, dst, n, a.code if a.code is not None else 0, a.cst)  # not fused: the spec only checks

        if backend is not None and (not isinstance(backend, str) or
                                    backend.strip().lower() not in FUSED_GATE_BACKENDS + ("auto",)):
            raise ValueError(f"unknown backend {backend!r}; expected None or one of "
                             f"{sorted(FUSED_GATE_BACKENDS + ('auto',))}")
        self.layout = layout
        self.backend = backend
        self._acts: List[Tuple[str, int, int, int, _Act]] = (
            [("s", src, dst, n, a) for src, dst, n, a in scalars] + [("g", src, dst, n, a) for src, dst, n, a in gates])
        self._blocks = [tuple(b) for b in blocks]
        self._d_in, self._d_out, self._num_gates = d_in, d_out, num_gates
        self.fused = all(a.code is not None for *_, a in self._acts)
        spec = FusedGateSpec(d_in, d_out, num_gates, tuple(seg(s) for s in scalars), tuple(seg(g) for g in gates),
                             self._blocks)  # checks that the columns partition the input
        self._spec = spec if self.fused else None
        self._key = spec.key() if self.fused else None
        self._source_type = None

    def _setup_e3nn(self, S, a_s, Gi, a_g, Dd, layout, backend):
        """Columns as e3nn's Gate reads them: the input is the (stable) sorted concatenation of the
        scalars, gates and gated entries; outputs are the scalars then the gated blocks, in order.
        Returns the sorted input irreps."""
        from e3nn import o3

        cat = sum([S, Gi, Dd], o3.Irreps([]))
        sorted_irreps, perm, _ = cat.sort()
        offsets = [0]
        for mul_ir in sorted_irreps:
            offsets.append(offsets[-1] + mul_ir.dim)
        start = [offsets[perm[i]] for i in range(len(cat))]  # input column of every entry of cat
        nS, nG = len(S), len(Gi)
        scalars, gates, blocks, dst, gdst, gate0 = [], [], [], 0, 0, 0
        for i, ((mul, _), a) in enumerate(zip(S, a_s)):
            if mul:
                scalars.append((start[i], dst, mul, a))
            dst += mul
        for i, ((mul, _), a) in enumerate(zip(Gi, a_g)):
            if mul:
                gates.append((start[nS + i], gdst, mul, a))
            gdst += mul
        for i, (mul, ir) in enumerate(Dd):
            if mul:
                blocks.append((start[nS + nG + i], dst, mul, ir.dim, gate0, layout == "ir_mul"))
            dst += mul * ir.dim
            gate0 += mul
        self._setup(scalars, gates, blocks, cat.dim, dst, gate0, layout, backend)
        return sorted_irreps

    @classmethod
    def from_module(cls, module: nn.Module, backend: Optional[str] = None) -> "FusedGate":
        """The FusedGate computing what ``module`` (an ``e3nn.nn.Gate`` or a mace-torch
        ``GatedEquivariantBlock``) computes, with its activation constants and irreps attributes,
        holding the same parameters and buffers (so a model's state dict is unchanged)."""
        kind = _gate_kind(module)
        if kind is None:
            raise TypeError(f"{type(module).__name__} is neither an e3nn.nn.Gate nor a mace-torch GatedEquivariantBlock")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if kind == "e3nn":
            S, Gi = module.act_scalars.irreps_in, module.act_gates.irreps_in
            a_s = [_from_normalize2mom(nm) for nm in module.act_scalars.acts]
            a_g = [_from_normalize2mom(nm) for nm in module.act_gates.acts]
            Dd = module.irreps_gated
            sorted_irreps = self._setup_e3nn(S, a_s, Gi, a_g, Dd, "mul_ir", backend)
            if sorted_irreps.simplify() != module.irreps_in.simplify():
                raise ValueError(f"cannot read the layout of {module!r}: its irreps are inconsistent")
        else:  # mace-torch GatedEquivariantBlock: its own slices, one activation per group
            ir_mul = bool(module._layout_is_ir_mul)
            s_act = _Act(activation_code(module._act_scalar), float(module._scalar_cst), module._act_scalar) \
                if module._act_scalar is not None else _Act(0, 1.0, None)
            g_act = _Act(activation_code(module._act_gate), float(module._gate_cst), module._act_gate) \
                if module._act_gate is not None else _Act(0, 1.0, None)
            scalars = [(module._s_start, 0, module._s_len, s_act)] if module._s_len else []
            blocks, dst, G = [], module._s_len, 0
            for gd_start, gd_len, ir_dim, mul, g_off in module._gated_info:
                blocks.append((gd_start, dst, mul, ir_dim, g_off, ir_mul))
                dst += gd_len
                G = max(G, g_off + mul)
            gates = [(module._g_start, 0, module._g_len, g_act)] if blocks and module._g_len else []
            if blocks and module._g_len != G:
                raise ValueError(f"{module!r}: {module._g_len} gate columns for {G} gated irreps")
            self._setup(scalars, gates, blocks, module.irreps_in.dim, dst, G if blocks else 0,
                        "ir_mul" if ir_mul else "mul_ir", backend)
        self.irreps_scalars, self.irreps_gates, self.irreps_gated = (
            module.irreps_scalars, module.irreps_gates, module.irreps_gated)
        self._irreps_in, self._irreps_out = module.irreps_in, module.irreps_out
        self._in_text = str(self._irreps_in)
        holder = _state_holder(module)
        if holder is not None:
            _adopt_state(self, holder)
        self._source_type = kind
        return self

    # --------------------------------------------------------------------------------- forward
    @property
    def irreps_in(self):
        return self._irreps_in

    @property
    def irreps_out(self):
        return self._irreps_out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self._d_in:
            raise ValueError(f"FusedGate: the input has shape {tuple(features.shape)}; its last dimension must be "
                             f"{self._d_in}, the dimension of irreps_in = {self._in_text}")
        if not features.is_floating_point():
            raise TypeError(f"FusedGate: the input has dtype {features.dtype}; features must be floating point")
        if self._key is None:
            return self._torch_forward(features)
        lead = features.shape[:-1]
        y = fused_gate_2d(rows2d(features, self._d_in), self._key, check_backend(self.backend, features.device))
        return y.reshape(lead + (self._d_out,))

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-PyTorch path (any activation): slices, activations, broadcast multiply."""
        lead = x.shape[:-1]
        parts_s, parts_g = [], []
        for kind, src, _, n, a in self._acts:
            (parts_s if kind == "s" else parts_g).append(a(x.narrow(-1, src, n)))
        ys = torch.cat(parts_s, -1) if parts_s else x.new_zeros(lead + (0,))
        if not self._blocks:
            return ys
        blocks = [(src, mul, dim, g0, bool(ir_mul)) for src, _, mul, dim, g0, ir_mul in self._blocks]
        return _gated_cat(x, ys, torch.cat(parts_g, -1), blocks)

    def extra_repr(self) -> str:
        path = f"fused, backend={self.backend or 'auto'}" if self.fused else "torch path (activation not fused)"
        return f"{self.irreps_in} -> {self.irreps_out} | {self.layout} | {path}"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__} ({self.extra_repr()})"

    def __prepare_scriptable__(self) -> nn.Module:
        from .scriptable import keep_eager_form
        form = ScriptableFusedGate(self)
        keep_eager_form(form, self)  # restore_eager_forms puts this module back after torch.jit.script(model)
        return form


def _gated_cat(x: torch.Tensor, ys: torch.Tensor, g: torch.Tensor,
               blocks: List[Tuple[int, int, int, int, bool]]) -> torch.Tensor:
    """``[ys, gated blocks · g]``: each block ``(input column, mul, dim, first gate, ir_mul)`` of ``x``
    times its gates broadcast over the 2l+1 components (the plain-PyTorch path; TorchScript-able)."""
    lead: List[int] = list(x.shape[:-1])
    out: List[torch.Tensor] = [ys]
    for src, mul, dim, g0, ir_mul in blocks:
        xb = x.narrow(-1, src, mul * dim)
        gb = g.narrow(-1, g0, mul)
        if ir_mul:
            out.append((xb.reshape(lead + [dim, mul]) * gb.unsqueeze(-2)).reshape(lead + [dim * mul]))
        else:
            out.append((xb.reshape(lead + [mul, dim]) * gb.unsqueeze(-1)).reshape(lead + [mul * dim]))
    return torch.cat(out, -1)


def _scripted_act(x: torch.Tensor, code: int, cst: float) -> torch.Tensor:
    """``cst * f(x)`` for an activation code (spec.ACT_CODES), in TorchScript-able aten ops."""
    if code == 1:
        y = torch.nn.functional.silu(x)
    elif code == 2:
        y = torch.sigmoid(x)
    elif code == 3:
        y = torch.tanh(x)
    elif code == 4:
        y = torch.abs(x)
    elif code == 5:
        y = torch.nn.functional.softplus(x)
    elif code == 6:
        y = torch.nn.functional.softplus(x) - 0.6931471805599453
    else:
        y = x
    return y if cst == 1.0 else y.mul(cst)


class ScriptableFusedGate(nn.Module):
    """What :class:`FusedGate` hands ``torch.jit.script``: the plain-PyTorch path with activation
    codes (aten ops only: the scripted model needs neither mmea_kernels nor e3nn to load), the same
    parameters and buffers."""

    __jit_ignored_attributes__ = ["_eager_form"]  # scriptable.EAGER_FORM: the FusedGate it stands for
    scalar_segs: List[Tuple[int, int, int, float]]  # (input column, count, activation code, cst)
    gate_segs: List[Tuple[int, int, int, float]]
    blocks: List[Tuple[int, int, int, int, bool]]  # (input column, mul, dim, first gate, ir_mul)

    def __init__(self, gate: FusedGate):
        super().__init__()
        unknown = [a.fn for *_, a in gate._acts if a.code is None]
        if unknown:
            raise NotImplementedError(
                f"FusedGate with the activation {unknown[0]!r} cannot be scripted: only the fused activations "
                "(silu, sigmoid, tanh, abs, identity, softplus, shifted softplus) have a TorchScript form here. "
                "Run mmea_kernels.restore_gates(model) before scripting.")
        self.scalar_segs = [
            (src, n, int(a.code), float(a.cst)) for k, src, _, n, a in gate._acts if k == "s"]
        self.gate_segs = [
            (src, n, int(a.code), float(a.cst)) for k, src, _, n, a in gate._acts if k == "g"]
        self.blocks = [
            (src, mul, dim, g0, bool(ir_mul)) for src, _, mul, dim, g0, ir_mul in gate._blocks]
        _adopt_state(self, gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead: List[int] = list(x.shape[:-1])
        parts: List[torch.Tensor] = []
        for src, n, code, cst in self.scalar_segs:
            parts.append(_scripted_act(x.narrow(-1, src, n), code, cst))
        ys = torch.cat(parts, -1) if len(parts) > 0 else x.new_zeros(lead + [0])
        if len(self.blocks) == 0:
            return ys
        gparts: List[torch.Tensor] = []
        for src, n, code, cst in self.gate_segs:
            gparts.append(_scripted_act(x.narrow(-1, src, n), code, cst))
        return _gated_cat(x, ys, torch.cat(gparts, -1), self.blocks)


# ------------------------------------------------------------------------------------- swapping
def _gate_kind(module) -> Optional[str]:
    try:
        from e3nn.nn import Gate
    except ImportError:  # pragma: no cover
        Gate = None
    if (Gate is not None and isinstance(module, Gate)) or packaged_class_is(module, "e3nn.nn._gate.Gate"):
        return "e3nn"  # also e3nn's Gate from a torch.package file's own copy of e3nn (NequIP's packages)
    cls = type(module)
    if cls.__name__ == "GatedEquivariantBlock" and cls.__module__.startswith("mace."):
        return "mace"
    return None
