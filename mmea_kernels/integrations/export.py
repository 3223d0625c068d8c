"""TorchScript export of adapted models, on mace-torch's own deployment path.

mace-torch deploys a model to LAMMPS (``pair_style mace``, libtorch) with
``mace/cli/create_lammps_model.py``: ``model.double().to("cpu")``, wrap it in
``mace.calculators.LAMMPS_MACE(model, head=...)``, compile that with e3nn's ``jit.compile`` (recursive
TorchScript scripting that follows the ``@compile_mode`` of each submodule) and ``.save()`` it.

An adapted model goes through exactly that path, unchanged: ``e3nn.util.jit.compile(model)``,
``torch.jit.script(model)`` and ``jit.compile(LAMMPS_MACE(model))`` all work on a model with MMEA or
ELoRA adapters, because the adapters are marked ``compile_mode("script")`` and hand TorchScript a
scriptable form of themselves (``__prepare_scriptable__``, :mod:`mmea_kernels.nn.scriptable`): same
parameters, same function, aten ops only. The saved file thus needs neither ``mmea_kernels`` nor
mace-torch nor e3nn to load (``torch.jit.load`` / libtorch), and gives the eager adapted model's
energies and forces (float64: equal to round-off, checked ≤ 1e-10 relative in tests/integrations/test_export.py).
A multi-head MACE with its head chosen (:mod:`.heads`) carries a Python forward pre-hook, which
TorchScript cannot compile: the three calls above then fail; :func:`script_model` and
:func:`lammps_model` take it off what they compile (``LAMMPS_MACE`` holds the head).
With ``kernels="cpp"`` (opt-in) MMEA adapters on e3nn linears are one op of this package's C++
extension instead, and the file needs those kernels to load (``mmea_kernels.load_kernels()``; in
LAMMPS the ``mmea_ops.so`` of ``mmea-kernels lammps-build``).

Like e3nn's in-place ``jit.compile``, scripting rewrites the module tree it compiles (each adapter is
replaced by its scriptable form, sharing parameters). The helpers here work on a copy instead, so
the eager model keeps its adapters (and ``adapter_state_dict``, ``disable_adapters``, ... keep working):

* :func:`script_model` -- ``jit.compile`` of a copy of any adapted e3nn / MACE model;
* :func:`lammps_model` -- ``jit.compile(LAMMPS_MACE(copy))``, as ``create_lammps_model`` builds it;
* :func:`export_lammps` -- the same, saved to a path (the file ``pair_style mace`` loads).

TorchScript runs the MMEA gate in aten ops (the torch backend's gather-multiply and ``index_add``):
adapters pinned to another gate backend (``backend="cpp"`` or ``"triton"``) are refused with an error
that says how to unpin them, before anything is copied or compiled; the fused Triton linear+gate
kernel is an eager/GPU path only. ``torch.compile`` (mace-torch's other path, ``mace.tools.compile``)
needs none of this: it traces the eager adapters (tests/nn/test_compile.py).
"""
from __future__ import annotations

import copy
import os
from typing import Optional, Union

import torch
from torch import nn

from ..peft.inject import adapted_modules
from .heads import model_heads, restore_head_hook, without_head_hook
from ..nn.scriptable import check_scriptable, script_kernels

__all__ = ["check_scriptable_model", "script_model", "lammps_model", "export_lammps"]


def check_scriptable_model(model: nn.Module) -> None:
    """Raise (naming the module) if an adapter of ``model`` cannot be scripted."""
    for name, m in adapted_modules(model).items():
        check_scriptable(m, name)


def _copy(model: nn.Module, in_place: bool) -> nn.Module:
    check_scriptable_model(model)
    if in_place:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # e.g. e3nn modules holding ScriptFunctions after dynamo tracing
        raise RuntimeError(f"could not copy the model to script it ({type(exc).__name__}: {exc}); pass "
                           "in_place=True to compile the model itself (its submodules are then replaced by "
                           "compiled ones, as e3nn's jit.compile does)") from exc


def script_model(model: nn.Module, in_place: bool = False, kernels: str = "aten") -> torch.jit.ScriptModule:
    """TorchScript of an adapted model with e3nn's ``jit.compile`` (mace-torch's compile step).

    Works on a deep copy unless ``in_place`` (then ``model``'s submodules are replaced by compiled
    ones, as ``jit.compile`` does). The result's forward has the model's signature. ``kernels``:
    ``"aten"`` (portable: loads in any libtorch) or ``"cpp"`` (MMEA adapters on e3nn linears as one
    op of this package's C++ extension, first derivatives only; see
    :func:`~mmea_kernels.nn.scriptable.script_kernels`).
    """
    from e3nn.util import jit

    model = _copy(model, in_place)
    hook = without_head_hook(model)  # a multi-head model's file runs the head its input names (batch["head"])
    try:
        with script_kernels(kernels, model):
            return jit.compile(model)
    finally:  # in place: the eager model keeps its head
        restore_head_hook(model, hook if in_place else None)


def lammps_model(model: nn.Module, head: Optional[str] = None, dtype: Optional[torch.dtype] = torch.float64,
                 device: Union[str, torch.device, None] = "cpu", in_place: bool = False,
                 kernels: str = "aten") -> torch.jit.ScriptModule:
    """``jit.compile(LAMMPS_MACE(model))`` as mace-torch's ``create_lammps_model`` builds it (float64 on
    CPU by default, as its ``--dtype float64``; ``dtype=None`` / ``device=None`` keep the model's).
    ``kernels`` as in :func:`script_model` (``"cpp"``: the file loads only where this package's
    kernels are loaded, e.g. the ``pair_style mace`` of ``mmea-kernels lammps-build``). ``head``: the
    head of a multi-head model the file runs (default: the one ``model`` runs, :mod:`.heads`).

    ``LAMMPS_MACE`` freezes the parameters (``requires_grad=False``) of the copy it wraps.
    """
    from e3nn.util import jit
    from mace.calculators import LAMMPS_MACE

    model = _copy(model, in_place)
    hook = without_head_hook(model)  # TorchScript compiles no Python hooks; LAMMPS_MACE holds the head
    if head is None and len(model_heads(model)) > 1:  # the head the eager model runs (LAMMPS_MACE's default: the last)
        head = hook.name if hook is not None else model_heads(model)[0]
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    wrapped = LAMMPS_MACE(model, head=head) if head is not None else LAMMPS_MACE(model)
    try:
        with script_kernels(kernels, wrapped):
            return jit.compile(wrapped)
    finally:  # in place: the eager model keeps its head
        restore_head_hook(model, hook if in_place else None)


def export_lammps(model: nn.Module, path: Union[str, os.PathLike], head: Optional[str] = None,
                  dtype: Optional[torch.dtype] = torch.float64,
                  device: Union[str, torch.device, None] = "cpu", kernels: str = "aten") -> torch.jit.ScriptModule:
    """Save :func:`lammps_model` of ``model`` to ``path`` (what ``pair_style mace`` loads; mace-torch
    names it ``<model>-lammps.pt``) and return the compiled module."""
    compiled = lammps_model(model, head=head, dtype=dtype, device=device, kernels=kernels)
    compiled.save(os.fspath(path))
    return compiled
