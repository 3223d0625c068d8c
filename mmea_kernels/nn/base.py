"""The one view adapters have of the frozen linear layer they wrap, and their common base class.

Two kinds of layer are supported, each by a :class:`LayerView` (chosen once, by type, in
:func:`layer_view`), which holds everything that differs between them:

* e3nn ``o3.Linear`` (``mul_ir`` features, flat weight ``[weight_numel]``, one block per instruction);
* cuEquivariance ``cuequivariance_torch.Linear`` (``cuet.Linear``): features in its input/output
  layouts, weight ``[weight_classes, weight_numel]``, one block per path of its descriptor.

What the layer computes (irreps, layouts, weight blocks, path weights) is its
:class:`~mmea_kernels.linear_spec.LinearSpec` (:meth:`LinearSpec.from_module`). Both kinds order
their blocks the same way: every pair (input block, output block) of equal irreps, input-major.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..linear_spec import LinearSpec, is_cuet_linear, is_e3nn_linear
from .export_forms import NEQUIP_ATEN_MODIFIER, NEQUIP_CPP_MODIFIER

__all__ = ["AdapterLinear", "LayerView", "layer_view", "is_equivariant_linear", "is_cuet_linear"]


def is_equivariant_linear(module: nn.Module) -> bool:
    """True for layers an adapter can wrap: e3nn ``o3.Linear`` and ``cuequivariance_torch.Linear``."""
    return is_e3nn_linear(module) or is_cuet_linear(module)


def module_tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``getattr(module, name, None)`` for a parameter or buffer, read from the module's own dicts
    where it is registered there (what ``torch.func.functional_call`` swaps in place), which skips
    ``nn.Module.__getattr__``: the adapters read their operands on every call, and at MD sizes that
    host time shows. Anything else (a parametrization's property, the plain attribute that pruning
    sets) through ``getattr``."""
    t = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    return t if t is not None else getattr(module, name, None)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")))


def modules_bypassed(base: Optional[nn.Module], down: Optional[nn.Module], up: Optional[nn.Module]) -> bool:
    """Whether a call must run through these modules' own forward rather than kernels that read their
    tensors: a hook is registered on one of them (forward, pre-forward or backward: a feature
    capture, ``torch.nn.utils.prune`` or hook-based ``weight_norm``, which recompute the weight in a
    pre-hook), or autocast is on (the layers then compute in its dtype, as the unadapted model
    would). Global module hooks do not count: the tools that set them (``ModuleTracker``,
    ``FlopCounterMode``) observe the module tree, and switching paths under them would change what
    they measure. About 0.5 µs a call."""
    if _any_autocast():
        return True
    for m in (base, down, up):
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            return True
    return False


class LayerView:
    """How adapters use one kind of base layer (stateless: every method takes the layer)."""

    kind = ""

    @staticmethod
    def check_weight_update(base: nn.Module, who: str) -> None:
        """Raise ``TypeError`` when ``base`` has no single weight tensor to add an update to."""
        raise NotImplementedError

    @staticmethod
    def call_with_weight(base: nn.Module, x, weight, args, kwargs):
        """``base``'s forward with ``weight`` in place of its weight parameter."""
        raise NotImplementedError

    @staticmethod
    def fused_spec(base: nn.Module, spec: LinearSpec) -> LinearSpec:
        """The spec the fused linear+gate kernel runs (``ValueError`` / ``TypeError`` when the kernel
        does not cover this layer)."""
        raise NotImplementedError

    @staticmethod
    def fused_tensors(base: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(flat weight, bias or None) the fused kernel reads."""
        raise NotImplementedError

    @staticmethod
    def scriptable_class(method: str):
        """The TorchScript form (:mod:`mmea_kernels.nn.scriptable`) of a ``method`` adapter on this kind."""
        raise NotImplementedError

    @staticmethod
    def check_scriptable(base: nn.Module, method: str, where: str) -> None:
        pass


class E3nnLinearView(LayerView):
    kind = "e3nn"

    @staticmethod
    def check_weight_update(base, who):
        if not getattr(base, "internal_weights", True) or getattr(base, "weight", None) is None:
            raise TypeError(f"{who} needs an o3.Linear with internal (shared) weights")

    @staticmethod
    def call_with_weight(base, x, weight, args, kwargs):
        return base(x, weight, *args, **kwargs)

    @staticmethod
    def fused_spec(base, spec):
        return LinearSpec.from_e3nn(base)  # plain: no f_in/f_out, biases included

    @staticmethod
    def fused_tensors(base):
        bias = module_tensor(base, "bias")
        return module_tensor(base, "weight"), (bias if bias is not None and bias.numel() else None)

    @staticmethod
    def scriptable_class(method):
        from . import scriptable as s
        return {"mmea": s.ScriptableMMEALinear, "elora": s.ScriptableELoRALinear}[method]


class CuetLinearView(LayerView):
    kind = "cuet"

    @staticmethod
    def check_weight_update(base, who):
        if not base.internal_weights or getattr(base, "weight", None) is None:
            raise TypeError(
                f"{who} needs a cuequivariance_torch Linear with internal weights: this one "
                f"(shared_weights={base.shared_weights}, internal_weights={base.internal_weights}) takes "
                "its weight as a forward argument, so there is no weight parameter to add a low-rank "
                "update to (MMEA adapters work on it)")
        if int(base.weight_classes) != 1:
            raise TypeError(
                f"{who} on a cuequivariance_torch Linear with weight_classes={base.weight_classes} is not "
                "supported: its weight holds one matrix per class, selected per row by weight_indices, and "
                "one low-rank update per block would be shared by all classes (MMEA adapters work on it)")

    @staticmethod
    def call_with_weight(base, x, weight, args, kwargs):
        # a cuet.Linear with internal weights refuses a weight argument: run its own forward with the
        # updated tensor in place of its parameter
        return torch.func.functional_call(base, {"weight": weight}, (x,) + tuple(args), kwargs)

    @staticmethod
    def fused_spec(base, spec):
        if spec.layout != spec.layout_out:
            raise ValueError("the fused kernel needs one layout for input and output")
        if not base.internal_weights or getattr(base, "weight", None) is None or int(base.weight_classes) != 1:
            raise ValueError("the fused kernel needs one internal weight class")
        return spec

    @staticmethod
    def fused_tensors(base):
        return module_tensor(base, "weight").reshape(-1), None

    @staticmethod
    def scriptable_class(method):
        from . import scriptable as s
        return {"mmea": s.ScriptableMMEACuetLinear, "elora": s.ScriptableELoRACuetLinear}[method]

    @staticmethod
    def check_scriptable(base, method, where):
        missing = [a for a in ("f", "transpose_in", "transpose_out") if not hasattr(base, a)]
        if method == "elora" and missing:
            raise NotImplementedError(
                f"{where}: ELoRA on a cuequivariance_torch Linear without {missing} (this cuequivariance-torch "
                "version lays out its Linear differently) cannot be scripted; fold the adapters into the base "
                "weights first (mmea_kernels.merge_and_unload(model), exact for ELoRA)")


def layer_view(base: nn.Module) -> LayerView:
    """The :class:`LayerView` of a supported layer; ``TypeError`` naming the type otherwise."""
    if is_e3nn_linear(base):
        return E3nnLinearView()
    if is_cuet_linear(base):
        return CuetLinearView()
    LinearSpec.from_module(base)  # raises the "adapters wrap" error
    raise AssertionError("unreachable")


class AdapterLinear(nn.Module):
    """Common part of the adapter wrappers: the frozen base layer, its view and spec, irreps,
    layouts, on/off switch. Subclasses declare ``method``, ``option_names``, ``mergeable``,
    ``shaping_options`` (options that change
    what the saved adapter weights compute: they must agree when loading), ``runtime_options``
    (options that may differ between saving and loading) and implement ``merge``.

    TorchScript: ``torch.jit.script`` (and e3nn's ``jit.compile``, which mace-torch's LAMMPS export
    uses: adapters are marked ``compile_mode("script")``) compiles the adapter's scriptable form,
    returned by ``__prepare_scriptable__`` (see :mod:`mmea_kernels.nn.scriptable`).
    """

    mmea_kernels_aten_only = NEQUIP_ATEN_MODIFIER  # NequIP model modifiers (export_forms)
    mmea_kernels_cpp_ops = NEQUIP_CPP_MODIFIER
    method: str = ""
    option_names: Tuple[str, ...] = ()  # keyword options of the constructor besides base and rank
    shaping_options: Tuple[str, ...] = ("rank",)
    runtime_options: Tuple[str, ...] = ()
    mergeable: bool = False  # merge() folds the adapter into the base weights exactly
    # what e3nn's @compile_mode("script") sets (without importing e3nn here)
    __e3nn_compile_mode__ = "script"

    def __init__(self, base: nn.Module):
        super().__init__()
        self.view = layer_view(base)
        self.spec = LinearSpec.from_module(base)
        self.base = base
        self.irreps_in = base.irreps_in
        self.irreps_out = base.irreps_out
        self.in_layout = self.spec.in_layout
        self.out_layout = self.spec.out_layout
        lin, lout = self.spec.layout, self.spec.layout_out
        self.layout_name = lin if lin == lout else f"{lin}->{lout}"
        self.adapter_enabled = True

    @property
    def base_kind(self) -> str:
        """``"e3nn"`` or ``"cuet"``."""
        return self.view.kind

    def _factory(self):
        """dtype and device of the adapter's weights: the base's parameters', else (an o3.Linear
        without paths has none) its floating buffers' (they follow ``.to()``), else the defaults (a
        cuet.Linear taking its weight at forward: its constant buffers are float64 whatever its dtype;
        :meth:`check_input` then names a mismatch with the input)."""
        p = next(self.base.parameters(), None)
        if p is None and self.view.kind != "cuet":
            p = next((b for b in self.base.buffers() if b.is_floating_point()), None)
        self._dtype_guessed = p is None
        if p is None:
            return {"dtype": torch.get_default_dtype(), "device": torch.device("cpu")}
        return {"dtype": p.dtype, "device": p.device}

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.in_layout.dim:
            raise ValueError(
                f"{type(self).__name__}: input has shape {tuple(x.shape)}, but irreps_in "
                f"{self.in_layout.irreps_str} needs the last dimension to be {self.in_layout.dim}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} ({self.in_layout.irreps_str}): the input has dtype {x.dtype}; "
                            "features must be floating point")
        guessed = self.__dict__.get("_dtype_guessed")  # the base has no weights: the adapter's carry the dtype
        w = next(iter(self.adapter_parameters()), None) if guessed else next(self.parameters(), None)
        if w is None or w.dtype == x.dtype or (not guessed and torch.is_autocast_enabled(x.device.type)):
            return
        if not guessed:
            raise TypeError(f"{type(self).__name__} ({self.in_layout.irreps_str}): the input is {x.dtype} but the "
                            f"layer's weights are {w.dtype}: bring the model to the input's dtype, model.to({x.dtype}), "
                            "or the input to the model's")
        raise TypeError(f"{type(self).__name__} ({self.in_layout.irreps_str}): its base layer has no weights to "
                        f"take a dtype from, so the adapter's weights are {w.dtype} (the default dtype), but the "
                        f"input is {x.dtype}: bring the model to the input's dtype, model.to({x.dtype})")

    def check_feature_channels(self, method: str) -> None:
        """``ValueError`` for an ``o3.Linear`` with ``f_in`` != ``f_out`` feature channels (rows of
        the input and the output then do not correspond one to one)."""
        w = getattr(self.base, "weight", None)
        if self.view.kind == "e3nn" and torch.is_tensor(w) and w.dim() == 3 and w.shape[0] != w.shape[1]:
            raise ValueError(f"{method}: this o3.Linear maps f_in={w.shape[0]} feature channels to f_out={w.shape[1]}; "
                             f"{method} needs f_in == f_out")

    def adapter_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def adapter_options(self) -> dict:
        raise NotImplementedError

    def target_info(self) -> dict:
        """What a saved adapter state records about this target (checked when loading)."""
        return {"irreps_in": self.in_layout.irreps_str, "irreps_out": self.out_layout.irreps_str,
                "layout": self.layout_name}

    def merge(self) -> nn.Module:
        raise NotImplementedError

    def __prepare_scriptable__(self) -> nn.Module:
        """The module ``torch.jit.script`` compiles in place of this adapter: same parameters and
        base layer, same function, aten ops only (:func:`mmea_kernels.nn.scriptable.scriptable_adapter`)."""
        from .scriptable import scriptable_adapter
        return scriptable_adapter(self)
