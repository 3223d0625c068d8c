"""Swap the gated nonlinearities of a model for :class:`~mmea_kernels.nn.fused_gate.FusedGate`
in place (``replace_gates``) and back (``restore_gates``), leaving the state dict unchanged."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from torch import nn

from .fused_gate import FusedGate, _gate_kind
from .scriptable import restore_eager_forms

__all__ = ["GateSwapReport", "replace_gates", "restore_gates"]


@dataclasses.dataclass
class GateSwapReport:
    """What :func:`replace_gates` / :func:`restore_gates` did: ``(name, description)`` per module."""

    action: str
    swapped: List[Tuple[str, str]]
    not_fused: List[str]

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        if not self.swapped:
            what = ("no e3nn Gate or mace-torch GatedEquivariantBlock found: the model is unchanged"
                    if self.action == "replace" else "no FusedGate found: the model is unchanged")
            return f"{self.action}_gates: {what}"
        lines = [f"{self.action}_gates: {len(self.swapped)} module(s)"]
        lines += [f"  {name}: {desc}" for name, desc in self.swapped]
        if self.not_fused:
            lines.append(f"  plain-PyTorch path (activation without a fused kernel): {', '.join(self.not_fused)}")
        return "\n".join(lines)


def _named_children_of(model: nn.Module):
    for parent_name, parent in model.named_modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None:
                yield parent, child_name, (f"{parent_name}.{child_name}" if parent_name else child_name), child


def replace_gates(model: nn.Module, backend: Optional[str] = None, verbose: bool = False) -> GateSwapReport:
    """Swap every ``e3nn.nn.Gate`` and mace-torch ``GatedEquivariantBlock`` in ``model`` for a
    :class:`FusedGate`, in place (same parameters and buffers: the state dict is unchanged).
    Returns a report (``str(report)`` lists what was swapped, or says the model had no gate).
    The original modules are kept on the FusedGate (``restore_gates`` puts them back); hooks
    registered on a gate run on its FusedGate (not those on the gate's own submodules, which the
    fused kernels do not call)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_gates expects a torch.nn.Module, got {type(model).__name__}")
    if _gate_kind(model) is not None:
        raise ValueError("replace_gates swaps gates inside a model in place; for a bare gate module use "
                         "FusedGate.from_module(gate)")
    restore_eager_forms(model)  # the FusedGates / adapters that torch.jit.script(model) replaced
    swapped, not_fused = [], []
    for parent, child_name, full, child in list(_named_children_of(model)):
        if _gate_kind(child) is None:
            continue
        try:
            fg = FusedGate.from_module(child, backend=backend)
        except ValueError as exc:
            raise ValueError(f"replace_gates: cannot fuse {full} ({child!r}): {exc}") from None
        fg.__dict__["_original"] = child  # not a submodule: no state_dict entries, not moved by .to()
        _share_hooks(child, fg)
        parent._modules[child_name] = fg
        swapped.append((full, repr(fg)))
        if not fg.fused:
            not_fused.append(full)
    report = GateSwapReport("replace", swapped, not_fused)
    if verbose:
        print(report)
    return report


def restore_gates(model: nn.Module, verbose: bool = False) -> GateSwapReport:
    """Undo :func:`replace_gates`: put the original gate modules back (they share the parameters
    and buffers the FusedGate held, including any ``.to()`` applied meanwhile)."""
    restore_eager_forms(model)
    swapped = []
    for parent, child_name, full, child in list(_named_children_of(model)):
        if isinstance(child, FusedGate):
            orig = child.__dict__.get("_original")
            if orig is None:
                continue  # built directly, not by replace_gates: nothing to restore
            _retarget_state(orig, child)
            parent._modules[child_name] = orig
            swapped.append((full, repr(orig)))
    report = GateSwapReport("restore", swapped, [])
    if verbose:
        print(report)
    return report


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _share_hooks(gate: nn.Module, fused: nn.Module) -> None:
    """``fused`` runs the hooks registered on ``gate`` (feature captures, a profiler's): the same hook
    dicts, so a handle's ``remove()`` and a hook added to either reach both, before and after
    :func:`restore_gates`. A hook gets the FusedGate as its module; inputs and outputs are the gate's."""
    for name in _HOOK_DICTS:
        if name in gate.__dict__:
            fused.__dict__[name] = gate.__dict__[name]
    # the full-backward-hook flag is the gate's own (FusedGate._is_full_backward_hook reads _original's)


def _retarget_state(orig: nn.Module, fused: nn.Module) -> None:
    """Give ``orig`` the (possibly moved or reloaded) tensors that ``fused`` holds under the same names."""
    for name in list(orig._parameters):
        if name in fused._parameters:
            orig._parameters[name] = fused._parameters[name]
    for name in list(orig._buffers):
        if name in fused._buffers:
            orig._buffers[name] = fused._buffers[name]
    for name, child in orig._modules.items():
        if child is not None and name in fused._modules:
            _retarget_state(child, fused._modules[name])
