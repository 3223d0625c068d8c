"""Fine-tuning methods: which parameters of a MACE model train, and how.

=============  ================================================================================
method         what trains (everything else is frozen)
=============  ================================================================================
``mmea``       MMEA adapters on every ``o3.Linear`` (gate nets only)
``mmea-paper`` the published MMEA recipe: MMEA adapters on every ``o3.Linear``; low-rank
               (ELoRA-style, ``ΔW = (α/r)·A·B``, B = 0) updates on every layer of the radial MLPs
               (MACE ``conv_tp_weights.layerK``, SevenNet ``weight_nn.layerK``). On MACE also
               on the weighted tensor products (``skip_tp``, one A·B per e3nn instruction) and on
               the top-order symmetric-contraction weights (``weights_max``, viewed as
               [elements·paths, channels]); the lower-order symmetric-contraction weights
               (``weights.K``) and the Bessel frequencies (``bessel_weights``, a buffer in
               mace-torch, made a parameter) train densely. SevenNet's convolution tensor products
               have no weights of their own (their per-path weights are the radial MLP's output),
               so the low-rank update of the radial MLP's last layer is the update of the
               tensor-product weights; its Bessel frequencies (``basis_function.coeffs``) train
               densely. MACE variants: in mace's non-linear blocks
               (``RealAgnosticResidualNonLinearInteractionBlock``, MACE-MPA/OMAT) the radial MLP
               is a mace ``RadialMLP`` (A·B on each ``nn.Linear``; biases, LayerNorms frozen) and
               the skip connection is an ``o3.Linear`` (no weighted tensor product there: MMEA);
               the same for the attention block's ``skip_linear``. ``density_fn`` (and ``alpha``,
               ``beta``) stay frozen. Gaussian and Chebyshev radial bases have no Bessel
               frequencies. What a MACE lacks is reported as a zero ``none: ...`` group. A MACE in
               cuEquivariance form is refused: convert it to e3nn first
``mmea-tp``    MMEA adapters on every ``o3.Linear`` and MMEA gates on the output of every e3nn
               ``TensorProduct`` (:class:`~mmea_kernels.nn.mmea.MMEATensorProduct`: the gate net
               reads the first input's 0e channels; the convolutions' messages and MACE's skip
               tensor product are gated per (order, multiplicity))
``elora``      ELoRA low-rank updates on every ``o3.Linear`` (per instruction)
``full``       every parameter of the pretrained model
``readout``    the readout blocks only (``readouts.*``)
``scratch``    every parameter, after re-initialising the model (same architecture)
=============  ================================================================================
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..linear_spec import tensor_product_blocks
from ..peft.inject import adapted_modules, inject_adapters

__all__ = ["METHODS", "apply_method", "LowRankDelta", "trainable_state", "reinitialize"]

METHODS = ("mmea", "mmea-paper", "mmea-tp", "elora", "full", "readout", "scratch")
ADAPTER_METHODS = ("mmea", "mmea-paper", "mmea-tp", "elora")  # the methods that take adapter options


class LowRankDelta(nn.Module):
    """A parametrization ``W -> W + (α/r)·A_i·B_i`` on blocks of a (flattened) weight.

    ``blocks`` are ``(offset, rows, cols)`` views of ``W.reshape(-1)``: block ``i`` is
    ``W.flatten()[offset:offset + rows*cols].view(rows, cols)``. ``B`` starts at zero, so the
    parametrized weight equals the original at initialisation."""

    def __init__(self, blocks: Sequence[Tuple[int, int, int]], rank: int, alpha: float, dtype, device):
        super().__init__()
        self.blocks = [tuple(int(v) for v in b) for b in blocks]
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.scales: List[float] = []
        for _, rows, cols in self.blocks:
            r = max(1, min(rank, rows, cols))
            a = torch.empty(rows, r, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a.T, a=math.sqrt(5))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(r, cols, dtype=dtype, device=device)))
            self.scales.append(alpha / r)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        pieces, pos = [], 0
        flat = w.reshape(-1)
        for (off, rows, cols), a, b, s in zip(self.blocks, self.A, self.B, self.scales):
            if off > pos:
                pieces.append(flat[pos:off])
            pieces.append(flat[off:off + rows * cols] + s * (a @ b).reshape(-1))
            pos = off + rows * cols
        if pos < flat.numel():
            pieces.append(flat[pos:])
        return torch.cat(pieces).view_as(w)


def _low_rank(module: nn.Module, name: str, blocks, rank: int) -> None:
    w = getattr(module, name)
    parametrize.register_parametrization(module, name, LowRankDelta(blocks, rank, float(rank), w.dtype, w.device))


def _bessel_to_parameter(model: nn.Module) -> List[str]:
    """Make every ``bessel_weights`` a trainable parameter (mace-torch keeps it as a buffer unless
    built with ``trainable=True``); their names."""
    names = []
    for mname, mod in model.named_modules():
        if "bessel_weights" in getattr(mod, "_buffers", {}):
            w = mod._buffers.pop("bessel_weights")
            mod.bessel_weights = nn.Parameter(w.detach().clone())
        if "bessel_weights" in mod._parameters and isinstance(mod._parameters["bessel_weights"], nn.Parameter):
            mod.bessel_weights.requires_grad_(True)
            names.append(f"{mname}.bessel_weights")
    return names


def reinitialize(model: nn.Module, seed: int) -> None:
    """Fresh random weights for every parameter (the module's own ``reset_parameters`` where it
    has one, else normal(0, 1) like e3nn's initialisers), seeded."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for mod in model.modules():
                for pname, p in mod.named_parameters(recurse=False):
                    if "weights" in pname and p.dim() == 3:  # symmetric contraction: mace uses U(-1,1)/num_params
                        p.copy_(torch.randn_like(p) / p.shape[1])
                    else:
                        p.normal_()
    finally:
        torch.random.set_rng_state(gen_state)


def apply_method(model: nn.Module, method: str, rank: int = 16, seed: int = 0, **adapter_options) -> Dict[str, int]:
    """Set up ``model`` in place for ``method`` (see the module docstring) and return
    ``{parameter group: trainable count}``. Deterministic given ``seed``; the caller's random state
    is left as it was (it was reset to ``seed``: a notebook's later draws repeated)."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; expected one of {list(METHODS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _set_up(model, method, rank, seed, adapter_options)


def _set_up(model: nn.Module, method: str, rank: int, seed: int, adapter_options: dict) -> Dict[str, int]:
    """:func:`apply_method`'s work, under its seed."""
    groups: Dict[str, int] = {}
    if method in ("full", "scratch"):
        if method == "scratch":
            reinitialize(model, seed)
        model.requires_grad_(True)
        groups["all parameters"] = sum(p.numel() for p in model.parameters())
        return groups
    if method == "readout":
        model.requires_grad_(False)
        readouts = getattr(model, "readouts", None)
        if readouts is None:
            raise ValueError(f"method 'readout' needs a model with a `readouts` attribute (MACE); got {type(model).__name__}")
        readouts.requires_grad_(True)
        groups["readouts"] = sum(p.numel() for p in readouts.parameters())
        return groups
    is_mace = _paper_target(model) if method == "mmea-paper" else False  # refusals before any change
    adapter = "elora" if method == "elora" else "mmea"
    rep = inject_adapters(model, method=adapter, rank=rank, **adapter_options)
    groups[f"{adapter.upper()} adapters on {len(rep.modules)} o3.Linear"] = rep.trainable_parameters
    if method == "mmea-tp":
        groups.update(_gate_tensor_products(model, rank, adapter_options))
    if method == "mmea-paper":
        groups.update(_paper_updates(model, rank, is_mace))
    return groups


def _is_mace(model: nn.Module) -> bool:
    try:
        from mace.modules.models import MACE
    except ImportError:  # pragma: no cover - mace-torch not installed
        MACE = ()
    if MACE and isinstance(model, MACE):
        return True
    return all(isinstance(getattr(model, a, None), nn.ModuleList) for a in ("interactions", "products", "readouts"))


def _paper_target(model: nn.Module) -> bool:
    """Whether ``model`` is a MACE (else the SevenNet recipe applies); refuses a MACE in
    cuEquivariance form, whose weighted tensor products and symmetric contractions are
    ``cuequivariance_torch`` modules that the low-rank updates do not know."""
    if not _is_mace(model):
        return False
    from ..linear_spec import is_cuet_linear

    cuet = [n for n, m in model.named_modules() if type(m).__module__.startswith("cuequivariance_torch")
            and not is_cuet_linear(m) and any(True for _ in m.parameters(recurse=False))]
    if cuet:
        shown = ", ".join(cuet[:3]) + (f" and {len(cuet) - 3} more" if len(cuet) > 3 else "")
        raise ValueError(f"mmea-paper: this {type(model).__name__} is in cuEquivariance form ({shown} are "
                         "cuequivariance_torch modules, whose weights the recipe's low-rank updates do not cover); "
                         "convert it to e3nn first (mace's mace.cli.convert_cueq_e3nn, or "
                         "mmea_kernels.integrations.cueq.convert_adapted_to_e3nn for a model with adapters)")
    return True


def _paper_updates(model: nn.Module, rank: int, is_mace: bool) -> Dict[str, int]:
    """mmea-paper's low-rank and dense groups (the MMEA adapters are already on)."""
    from e3nn import o3

    counts = {"low-rank: weighted tensor products": 0, "low-rank: radial MLPs": 0,
              "low-rank: top-order symmetric contraction": 0, "dense: lower-order symmetric contraction": 0,
              "dense: Bessel weights": 0}
    for mname, mod in list(model.named_modules()):
        if isinstance(mod, o3.TensorProduct) and mod.internal_weights and mod.weight_numel > 0:
            _low_rank(mod, "weight", tensor_product_blocks(mod), rank)
            counts["low-rank: weighted tensor products"] += _n(mod.parametrizations.weight[0])
        elif _is_radial_layer(mname, mod):
            _low_rank(mod, "weight", [(0, *mod.weight.shape)], rank)
            counts["low-rank: radial MLPs"] += _n(mod.parametrizations.weight[0])
        elif hasattr(mod, "weights_max") and isinstance(getattr(mod, "weights", None), nn.ParameterList):
            e, p, c = mod.weights_max.shape
            _low_rank(mod, "weights_max", [(0, e * p, c)], rank)
            counts["low-rank: top-order symmetric contraction"] += _n(mod.parametrizations.weights_max[0])
            for w in mod.weights:
                w.requires_grad_(True)
                counts["dense: lower-order symmetric contraction"] += w.numel()
    for name in _bessel_to_parameter(model):
        counts["dense: Bessel weights"] += model.get_parameter(name).numel()
    for mname, mod in model.named_modules():  # SevenNet: BesselBasis.coeffs is already a parameter
        coeffs = getattr(mod, "coeffs", None)
        if type(mod).__name__ == "BesselBasis" and isinstance(coeffs, nn.Parameter):
            coeffs.requires_grad_(True)
            counts["dense: Bessel weights"] += coeffs.numel()
    if is_mace:
        return _mace_coverage(model, counts)
    required = ["low-rank: radial MLPs", "dense: Bessel weights"]
    for n in required:
        if counts[n] == 0:
            raise ValueError(f"mmea-paper: found nothing for '{n}' in {type(model).__name__} "
                             "(the recipe knows MACE and SevenNet models)")
    return {n: c for n, c in counts.items() if c or n in required}


def _all_parametrized(mod: Optional[nn.Module], name: str) -> bool:
    """``mod`` has at least one submodule with a 2-D ``name`` tensor, and all of them are parametrized."""
    found = [m for m in (mod.modules() if mod is not None else ())
             if parametrize.is_parametrized(m, name) or getattr(getattr(m, name, None), "ndim", 0) >= 2]
    return bool(found) and all(parametrize.is_parametrized(m, name) for m in found)


def _mace_coverage(model: nn.Module, counts: Dict[str, int]) -> Dict[str, int]:
    """Check, block by block, that the recipe reached every part of this MACE it promises; the
    groups (non-empty ones) plus a zero-count ``none: ...`` entry for each part this MACE lacks."""
    adapted, missing, linear_skip, notes = set(adapted_modules(model)), [], [], {}
    for i, block in enumerate(model.interactions):
        skip_name = "skip_linear" if hasattr(block, "skip_linear") else "skip_tp"  # the attention block's
        skip, radial = getattr(block, skip_name, None), getattr(block, "conv_tp_weights", None)
        if f"interactions.{i}.{skip_name}" in adapted:  # the non-linear and attention blocks: an o3.Linear
            linear_skip.append(str(i))
        elif skip is None or not parametrize.is_parametrized(skip, "weight"):
            missing.append(f"interactions.{i}.{skip_name} ({type(skip).__name__}: not a weighted e3nn tensor product "
                           "or an adapted o3.Linear)")
        if not _all_parametrized(radial, "weight"):
            missing.append(f"interactions.{i}.conv_tp_weights ({type(radial).__name__}: not an e3nn FullyConnectedNet "
                           "or a mace RadialMLP)")
    for i, prod in enumerate(model.products):
        sc = getattr(prod, "symmetric_contractions", None)
        if not _all_parametrized(sc, "weights_max"):
            missing.append(f"products.{i}.symmetric_contractions ({type(sc).__name__}: no top-order weights_max)")
    basis = getattr(getattr(model, "radial_embedding", None), "bessel_fn", None)
    if counts["dense: Bessel weights"] == 0:
        if isinstance(getattr(basis, "bessel_weights", None), torch.Tensor):
            missing.append("radial_embedding.bessel_fn.bessel_weights")
        else:
            notes[f"none: Bessel weights (the {type(basis).__name__} radial basis has no frequencies)"] = 0
    if missing:
        raise ValueError(f"mmea-paper: in this {type(model).__name__} the recipe found nothing to train for: "
                         + "; ".join(missing))
    if linear_skip:
        notes[f"none: weighted tensor product in interactions {', '.join(linear_skip)} (the skip connection is an "
              "o3.Linear, under MMEA)"] = 0
    return {**{n: c for n, c in counts.items() if c}, **notes}


_RADIAL_PARENTS = (".conv_tp_weights.", ".weight_nn.")  # mace-torch, SevenNet


def _is_radial_layer(mname: str, mod: nn.Module) -> bool:
    """A layer of a radial MLP that makes the per-edge tensor-product weights: ``layerK`` of an e3nn
    ``FullyConnectedNet`` (mace-torch's classic blocks, SevenNet) or an ``nn.Linear`` ``net.K`` of a
    mace ``RadialMLP`` (``RealAgnosticResidualNonLinearInteractionBlock``)."""
    parts = mname.split(".")
    if not (any(p in f".{mname}." for p in _RADIAL_PARENTS)
            and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2):
        return False
    return parts[-1].startswith("layer") or (isinstance(mod, nn.Linear) and parts[-3:-1] == ["conv_tp_weights", "net"])


def _gate_tensor_products(model: nn.Module, rank: int, options: dict) -> Dict[str, int]:
    from e3nn import o3

    from ..nn.mmea import MMEATensorProduct
    from ..peft.inject import _set_submodule

    names = [n for n, m in model.named_modules() if isinstance(m, o3.TensorProduct) and n]
    if not names:
        raise ValueError(f"mmea-tp: {type(model).__name__} has no e3nn TensorProduct to gate")
    count = 0
    for name in names:
        wrapper = MMEATensorProduct(model.get_submodule(name), rank=rank, **options)
        _set_submodule(model, name, wrapper)
        for pn, p in wrapper.named_parameters():
            if not pn.startswith("base."):
                p.requires_grad_(True)
                count += p.numel()
    return {f"MMEA gates on {len(names)} tensor-product outputs": count}


def _n(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: detached copy}`` of every parameter with ``requires_grad``."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
