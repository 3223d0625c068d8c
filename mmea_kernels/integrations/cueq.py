"""Adapted mace-torch models between e3nn and cuEquivariance.

mace-torch converts a MACE between its e3nn form (``o3.Linear`` layers, ``mul_ir`` features) and its
cuEquivariance form (``cuequivariance_torch.Linear`` layers, ``ir_mul`` features by default) with
``mace.cli.convert_e3nn_cueq.run`` / ``mace.cli.convert_cueq_e3nn.run``; it does not know adapters.
:func:`convert_adapted_to_cueq` and :func:`convert_adapted_to_e3nn` convert the base model with
mace-torch's own conversion and put the same adapters, with the same weights, on the same layers
of the result.

Why the adapter weights carry over unchanged: the two forms of a layer have the same irreps in the
same order, and

* MMEA reads the 0e input channels in irreps order (a 0e block has the same columns in both
  layouts) and has one gate per (irrep block, multiplicity), numbered block by block in both
  layouts; only the columns a gate multiplies differ (``offset + k*(2l+1) + m`` in ``mul_ir``,
  ``offset + m*mul + k`` in ``ir_mul``), and the adapter takes them from the layer's layout;
* ELoRA has one ``A_i, B_i`` per weight block ``irreps_in[i_in] -> irreps_out[i_out]``; e3nn's
  instructions and cuEquivariance's ``descriptors.linear`` paths list the same blocks in the same
  order with the same row-major ``[mul_in, mul_out]`` shape, and mace-torch copies the flat weight
  unchanged (``[n] -> [1, n]``). The saved state records the blocks and loading checks them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from ..linear_spec import is_cuet_linear
from ..peft.inject import _SAVED_GRAD_FLAGS, InjectionReport, _set_submodule, adapted_modules, tensor_product_gates
from ..peft.state import adapter_state_dict, load_adapter_state_dict
from .heads import copy_head

__all__ = ["convert_adapted_to_cueq", "convert_adapted_to_e3nn", "convert_to_cueq", "transfer_adapters",
           "refuse_unconvertible", "carry_adapters"]


def _device_of(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return "cpu" if p is None else str(p.device)


def _has_cuet(model: nn.Module) -> bool:
    return any(is_cuet_linear(m) for m in model.modules())


_MACE_CLASSES = ("ScaleShiftMACE", "MACELES", "PolarMACE")  # what mace-torch's conversions handle


def _check_mace(model: nn.Module) -> None:
    if type(model).__name__ not in _MACE_CLASSES:
        raise TypeError(f"expected a mace-torch MACE model ({', '.join(_MACE_CLASSES)}: the classes mace-torch's "
                        f"e3nn <-> cuEquivariance conversion handles), got {type(model).__name__}")


@contextlib.contextmanager
def base_layers_in_place(model: nn.Module):
    """Inside the block, ``model`` holds its original layers where the adapters were (the adapters
    are put back on exit, also after an error). Cheaper than a deep copy, which for a
    cuEquivariance MACE can take longer than the conversion itself."""
    mods = adapted_modules(model)
    for name, m in mods.items():
        _set_submodule(model, name, m.base)
    try:
        yield model
    finally:
        for name, m in mods.items():
            _set_submodule(model, name, m)


def transfer_adapters(source: nn.Module, target: nn.Module,
                      edit: Optional[Callable[[dict], dict]] = None) -> InjectionReport:
    """Put ``source``'s adapters (method, options, weights, backend, on/off state and requires_grad
    of each adapter weight) on the same-named layers of ``target`` (which has no adapters yet), for
    example the e3nn and cuEquivariance forms of one MACE. ``edit`` maps the adapter state first
    (where ``target``'s layers differ in size: a removed head). Returns the injection report."""
    mods = adapted_modules(source)
    if not mods:
        raise ValueError("source model has no adapters to transfer")
    first = next(iter(mods.values()))
    opts = {k: getattr(first, k) for k in first.runtime_options if getattr(first, k) is not None}
    state = adapter_state_dict(source, trainable="ignore")  # other weights go with the base model's conversion
    rep = load_adapter_state_dict(target, edit(state) if edit else state, **opts)
    mine = dict(target.named_parameters())
    for n, p in source.named_parameters():  # trainable again outside the adapters: trainable in target too
        if p.requires_grad and n not in state["state"] and n in mine:
            mine[n].requires_grad_(True)
    dst = adapted_modules(target)
    for name, m in mods.items():
        d = dst[name]
        d.adapter_enabled = m.adapter_enabled
        src_params = dict(m.named_parameters())
        for pn, p in d.named_parameters():
            if not pn.startswith("base."):
                p.requires_grad_(src_params[pn].requires_grad)
    return rep


def _keeping_default_dtype(runner: Callable[[nn.Module], nn.Module], model: nn.Module) -> nn.Module:
    """``runner(model)`` with torch's default dtype put back afterwards: mace-torch's conversions read
    the model (state_dict, config) and set the default dtype to its dtype, for the whole process."""
    from .default_dtype import default_dtype

    with default_dtype():  # a multi-head model's chosen head goes with it (the conversions build a new model)
        return copy_head(model, runner(model))


def convert_to_cueq(model: nn.Module, layout: str = "ir_mul", device: Optional[str] = None) -> nn.Module:
    """The cuEquivariance form of an e3nn MACE, adapted or not: :func:`convert_adapted_to_cueq`, or
    for a model without adapters (full fine-tuning, a readout refit) mace-torch's own conversion;
    either way the default dtype is left as it was."""
    if adapted_modules(model):
        return convert_adapted_to_cueq(model, layout=layout, device=device)
    _check_mace(model)
    import cuequivariance_torch  # noqa: F401  (an ImportError names what is missing)
    from mace.cli.convert_e3nn_cueq import run

    dev = device or _device_of(model)
    return _keeping_default_dtype(lambda m: run(m, device=dev, return_model=True, layout=layout), model)


def refuse_unconvertible(model: nn.Module) -> None:
    """Raise for what mace-torch's conversions cannot carry over and these functions do not either:
    parametrized weights (mmea-paper's low-rank updates), merged ELoRA adapters, mmea-tp gates."""
    from torch.nn.utils import parametrize

    tied = sorted(n for n, m in model.named_modules() if parametrize.is_parametrized(m))
    if tied:  # mace-torch's conversion reads the state dict by name and does not know these
        raise ValueError(f"the model has parametrized weights (the low-rank updates of mmea-paper) on {len(tied)} modules "
                         f"({tied[0]}, ...), which mace-torch's conversion cannot read: fold them into their weights "
                         "first (torch.nn.utils.parametrize.remove_parametrizations(module, name, "
                         "leave_parametrized=True), as `mmea-kernels export` does)")
    merged = [n for n, m in adapted_modules(model).items() if getattr(m, "merged", False)]
    gated = list(tensor_product_gates(model))
    if merged or gated:  # found before mace-torch's conversion runs, named as what they are
        raise ValueError(f"cannot convert: ELoRA adapters on {merged[0]} ({len(merged)} in all) are merged into their "
                         "base weights; unmerge() them first" if merged else
                         f"cannot convert: mmea-tp gates on tensor products ({gated[0]}, {len(gated)} in all) have "
                         "no cuEquivariance form here; convert a model without them (methods mmea, elora)")


def carry_adapters(model: nn.Module, target: nn.Module, edit: Optional[Callable[[dict], dict]] = None) -> None:
    """Put ``model``'s adapters on ``target``, the converted form of its base model, with the
    requires_grad flags that unload() restores (where the names agree); ``edit`` as in
    :func:`transfer_adapters`."""
    transfer_adapters(model, target, edit)
    saved = getattr(model, _SAVED_GRAD_FLAGS, None)
    if saved is not None:
        mine = getattr(target, _SAVED_GRAD_FLAGS)
        mine.update({n: v for n, v in saved.items() if n in mine})


def _convert(model: nn.Module, runner: Callable[[nn.Module], nn.Module]) -> nn.Module:
    _check_mace(model)
    refuse_unconvertible(model)
    if not adapted_modules(model):
        raise ValueError("model has no adapters; convert it with mace-torch's own conversion "
                         "(mace.cli.convert_e3nn_cueq.run / convert_cueq_e3nn.run)")
    with base_layers_in_place(model) as base:
        target = _keeping_default_dtype(runner, base)
    carry_adapters(model, target)
    return target


def convert_adapted_to_cueq(model: nn.Module, layout: str = "ir_mul", device: Optional[str] = None) -> nn.Module:
    """A new cuEquivariance MACE (``cuequivariance_torch.Linear`` layers, features in ``layout``)
    equal to the adapted e3nn MACE ``model``, with the same adapters and adapter weights.

    The base model is converted by ``mace.cli.convert_e3nn_cueq.run`` (reading ``model`` with its
    original layers put back for the call); ``model`` is not changed and shares no tensor with the
    result. ``device`` defaults to the model's device (mace-torch
    enables its fused convolution only for ``device="cuda"``, which needs cuequivariance's CUDA ops).
    Runs on CPU with cuequivariance-torch's PyTorch fallback.
    """
    if layout not in ("ir_mul", "mul_ir"):
        raise ValueError(f"unknown layout {layout!r}; expected 'ir_mul' or 'mul_ir'")
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError as e:
        raise ImportError("convert_adapted_to_cueq needs cuequivariance and cuequivariance_torch "
                          "(pip install cuequivariance-torch)") from e
    if _has_cuet(model):
        raise ValueError("model already has cuequivariance_torch Linear layers (it is a cuEquivariance MACE)")
    from mace.cli.convert_e3nn_cueq import run

    dev = device or _device_of(model)
    return _convert(model, lambda base: run(base, device=dev, return_model=True, layout=layout))


def convert_adapted_to_e3nn(model: nn.Module, device: Optional[str] = None) -> nn.Module:
    """A new e3nn MACE equal to the adapted cuEquivariance MACE ``model`` (converted by
    ``mace.cli.convert_cueq_e3nn.run``), with the same adapters and adapter weights."""
    if not _has_cuet(model):
        raise ValueError("model has no cuequivariance_torch Linear layer (it is not a cuEquivariance MACE)")
    from mace.cli.convert_cueq_e3nn import run

    dev = device or _device_of(model)
    return _convert(model, lambda base: run(base, device=dev, return_model=True))
