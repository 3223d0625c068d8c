"""Multi-head mace-torch models (mace's multi-head fine-tuning, the ``mace-mp:mh-*`` foundation
models): one set of interaction layers, several readouts, per-element reference energies and
scale/shift, one per head (a dataset / level of theory). A batch says which head each structure
takes (``batch["head"]``), and mace's data tools put 0 there unless told otherwise.

This package runs a multi-head model with one chosen head everywhere, whatever a batch says:
:func:`use_head` picks it (``--head``; by default the only head, or the one named ``default`` in any
case, as mace-torch's ``MACECalculator`` picks it; otherwise an error that lists them) and installs
a forward pre-hook (:class:`HeadHook`) that sets ``batch["head"]`` to it; fine-tuning, E0 fitting,
evaluation, prediction, MD, the cuEquivariance conversions and the exported files then all use the
same head. A one-head model gets no hook and runs as before.

TorchScript compiles no Python hooks: ``torch.jit.script`` / e3nn's ``jit.compile`` of a model with
one fail (``'HeadHook' object has no attribute '__name__'``). Script it with
:func:`~mmea_kernels.integrations.export.script_model` / ``lammps_model`` (they take the hook off the
copy they compile and keep the head: ``LAMMPS_MACE`` holds it), or take it off first with
:func:`without_head_hook` (the scripted model then runs the head its input names)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

__all__ = ["model_heads", "choose_head", "use_head", "head_index", "head_chosen", "head_e0s", "without_head_hook",
           "restore_head_hook", "copy_head", "head_summary", "one_head_adapter_state", "HeadHook"]


def model_heads(model: nn.Module) -> List[str]:
    """The names of a mace-torch model's heads (``model.heads``); ``["Default"]`` for a model without
    (older mace models, SevenNet)."""
    heads = getattr(model, "heads", None)
    if not heads or list(heads) == [None]:  # mace's LAMMPS_MACE sets [None] on a model without
        return ["Default"]
    return [str(h) for h in heads]


def choose_head(heads: List[str], head: Optional[str] = None, where: str = "the model") -> str:
    """``head`` when ``heads`` has it; without one the only head, or the one named ``default`` (any
    case); otherwise a ``ValueError`` that lists the heads."""
    if head is not None:
        if head not in heads:
            raise ValueError(f"{where} has no head {head!r}; its heads are {', '.join(heads)}")
        return head
    if len(heads) == 1:
        return heads[0]
    default = [h for h in heads if h.lower() == "default"]
    if default:
        return default[0]
    raise ValueError(f"{where} has {len(heads)} heads ({', '.join(heads)}) and none is named Default: choose the one "
                     "to use with --head NAME (API: head=...), e.g. the one whose level of theory is closest to "
                     "your labels")


class HeadHook:
    """Forward pre-hook of a multi-head mace model: every batch runs head ``index``."""

    def __init__(self, index: int, name: str):
        self.index, self.name = int(index), str(name)

    def __call__(self, module, args, kwargs):
        data = args[0] if args else kwargs.get("data")
        if isinstance(data, dict) and "ptr" in data:
            ptr = data["ptr"]
            data["head"] = torch.full((ptr.numel() - 1,), self.index, dtype=torch.long, device=ptr.device)
        return None


def _hooks(model: nn.Module) -> list:
    return [k for k, h in model._forward_pre_hooks.items() if isinstance(h, HeadHook)]


def use_head(model: nn.Module, head: Optional[str] = None, where: str = "the model") -> str:
    """Run ``model`` with one head (:func:`choose_head`) from now on: a multi-head model gets a
    :class:`HeadHook` (replacing an earlier one); returns the head's name, also kept as
    ``model.mmea_head``."""
    heads = model_heads(model)
    name = choose_head(heads, head, where)
    without_head_hook(model)
    if len(heads) > 1:
        model.register_forward_pre_hook(HeadHook(heads.index(name), name), with_kwargs=True)
    model.mmea_head = name
    return name


def head_index(model: nn.Module) -> int:
    """The index of the head ``model`` runs: the one :func:`use_head` chose, else 0 (what mace's data
    tools put in a batch)."""
    keys = _hooks(model)
    return model._forward_pre_hooks[keys[-1]].index if keys else 0


def head_chosen(model: nn.Module, where: str = "the model") -> None:
    """``ValueError`` for a multi-head model that has no head chosen (:func:`use_head`): it would run
    whatever head each batch names, mace's data tools' 0 unless told otherwise."""
    heads = model_heads(model)
    if len(heads) > 1 and not _hooks(model):
        raise ValueError(f"{where}: a multi-head model (heads {', '.join(heads)}) with no head chosen; choose one "
                         "first: mmea_kernels.integrations.heads.use_head(model, NAME)")


def head_e0s(model: nn.Module) -> torch.Tensor:
    """The per-element reference energies (E0s) of the head ``model`` runs: a view of
    ``atomic_energies_fn.atomic_energies`` (one row of it for a multi-head model)."""
    buf = model.atomic_energies_fn.atomic_energies
    return buf[head_index(model)] if buf.dim() == 2 else buf


def copy_head(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` (a converted copy of ``source``: cuEquivariance, e3nn) set to run the head ``source``
    runs, when ``source`` has one chosen (conversions build new models, without the hook)."""
    keys = _hooks(source)
    if keys:
        use_head(target, source._forward_pre_hooks[keys[-1]].name)
    elif getattr(source, "mmea_head", None) is not None and len(model_heads(target)) == 1:
        target.mmea_head = source.mmea_head
    return target


def restore_head_hook(model: nn.Module, hook: Optional[HeadHook]) -> None:
    """Put back a hook :func:`without_head_hook` took (after scripting a model in place)."""
    if hook is not None:
        model.register_forward_pre_hook(HeadHook(hook.index, hook.name), with_kwargs=True)


def without_head_hook(model: nn.Module) -> Optional[HeadHook]:
    """Remove ``model``'s :class:`HeadHook` (TorchScript compiles no Python hooks) and return it."""
    keys = _hooks(model)
    hook = model._forward_pre_hooks[keys[-1]] if keys else None
    for key in keys:
        model._forward_pre_hooks.pop(key)
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    return hook


def head_summary(net: nn.Module, fmt: str) -> dict:
    """For an export summary of a multi-head model: the head the file runs (a TorchScript file: the
    head its input names); {} for a one-head model."""
    heads = model_heads(net)
    if len(heads) == 1:
        return {}
    name = heads[head_index(net)]
    return {"head": name, **({"head_note": f"the file runs the head its input names (batch['head']); this model was "
                                           f"fine-tuned for {name!r} (index {head_index(net)}): mace's MACECalculator "
                                           f"needs head={name!r}"} if fmt == "torchscript" else {})}


def one_head_adapter_state(state: dict, target: nn.Module, head: int, num_heads: int) -> dict:
    """``state`` (:func:`~mmea_kernels.peft.adapter_state_dict` of a multi-head MACE) for ``target``,
    the single-head model mace's ``remove_pt_head`` builds from it keeping head ``head``.

    mace's readouts hold every head's scalar channels in blocks, head ``h`` at ``[h·k, (h+1)·k)``
    (``mask_head``), and ``remove_pt_head`` keeps the block of the kept head on each side that changes
    size, dividing a weight whose inputs shrink by √(fan-in ratio) (e3nn's path normalisation). The
    adapters follow exactly: MMEA's additive rows and ELoRA's B columns of the kept outputs; MMEA's
    down-projection columns and ELoRA's A rows of the kept inputs (ELoRA's scaled as the weight is; the
    other heads' inputs are zero for a structure on the kept head, so MMEA's gates lose nothing).
    A changed layer that is not a one-path map of scalars to scalars raises ``ValueError``."""
    from e3nn import o3

    def blocks(name, side, old, new):
        if old == new:
            return slice(None), 1.0
        o, n = o3.Irreps(old), o3.Irreps(new)
        if len(o) != 1 or len(n) != 1 or o[0].ir != o3.Irrep("0e") or n[0].ir != o3.Irrep("0e"):
            raise ValueError(f"{name}: its {side} irreps change from {old} to {new}; only one block of scalar "
                             "channels can be split by head")
        if o.dim != num_heads * n.dim:
            raise ValueError(f"{name}: its {side} irreps change from {old} to {new}, not one head's block of {num_heads}")
        return slice(head * n.dim, (head + 1) * n.dim), (n.dim / o.dim) ** 0.5

    from ..nn.base import AdapterLinear
    from ..peft.state import _irreps_of

    layers = {n: m.base if isinstance(m, AdapterLinear) else m for n, m in target.named_modules()}
    out = {**state, "targets": {k: dict(v) for k, v in state["targets"].items()}, "state": dict(state["state"])}
    for name, info in out["targets"].items():
        new_in, new_out = _irreps_of(layers[name]) if name in layers else (info["irreps_in"], info["irreps_out"])
        if (new_in, new_out) == (info["irreps_in"], info["irreps_out"]):
            continue
        rows_in, scale = blocks(name, "input", info["irreps_in"], new_in)
        rows_out, _ = blocks(name, "output", info["irreps_out"], new_out)
        info.update(irreps_in=new_in, irreps_out=new_out)
        for key in [k for k in out["state"] if k.startswith(name + ".")]:
            t, part = out["state"][key], key[len(name) + 1:]
            if part == "mmea_down.weight":
                t = t[:, rows_in]
            elif part in ("mmea_up.weight", "mmea_up.bias", "mmea_static"):
                t = t[rows_out]
            elif part.startswith("elora_A."):
                t = t[rows_in] * scale
            elif part.startswith("elora_B."):
                t = t[:, rows_out]
            elif part != "mmea_down.bias":
                raise ValueError(f"{name}: no rule to split its adapter weight {part} by head")
            out["state"][key] = t.clone()
    return out
