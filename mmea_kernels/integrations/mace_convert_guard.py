"""mace-torch's own model conversions, made safe for adapted models.

mace-torch converts a MACE between e3nn and cuEquivariance (``mace.cli.convert_e3nn_cueq.run``,
``convert_cueq_e3nn.run``) and to OpenEquivariance (``convert_e3nn_oeq``, ``convert_e3nn_hybrid``,
``convert_oeq_e3nn``) by building a plain model and copying the state-dict entries whose names it
knows. An adapted layer keeps its frozen weight under ``<layer>.base.weight``, so on an adapted model
those conversions silently dropped every adapter and left the adapted layers' weights at their
random initialisation (no error, energies off by eV). They run inside ``MACECalculator(...,
enable_cueq=True)``, ``mace_create_lammps_model --format mliap``, ``mace_eval_configs
--enable_cueq`` and ``mace_run_train --enable_cueq``.

:func:`install` (called when ``mmea_kernels`` is imported, which unpickling an adapted model always
does) changes those modules, now if mace-torch has imported them, else when it does:

* e3nn <-> cuEquivariance: ``transfer_weights`` converts the base model (the adapters' original
  layers put back for the call) and puts the same adapters, with the same weights, on the result,
  as :func:`mmea_kernels.convert_adapted_to_cueq` does; what that function refuses
  (:func:`..integrations.cueq.refuse_unconvertible`) is refused here too;
* OpenEquivariance: the conversion refuses an adapted model with a message (it has no step to
  hook the adapters into).

Either way a multi-head model keeps the head this package chose for it (its forward pre-hook,
:class:`~mmea_kernels.integrations.heads.HeadHook`, which a new model would not have).

A model without adapters, parametrizations or mmea-tp gates converts exactly as before.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

CUEQ_MODULES = ("mace.cli.convert_e3nn_cueq", "mace.cli.convert_cueq_e3nn")
OEQ_MODULES = ("mace.cli.convert_e3nn_oeq", "mace.cli.convert_e3nn_hybrid", "mace.cli.convert_oeq_e3nn")
_MARK = "_mmea_kernels_guard"


def _changed_parts(model) -> list:
    """Names of what a by-name state-dict copy would lose: adapters, mmea-tp gates, parametrizations."""
    from torch.nn.utils import parametrize

    from ..peft.inject import adapted_modules, tensor_product_gates

    parts = list(adapted_modules(model)) + list(tensor_product_gates(model))
    return parts + [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]


def _cueq_transfer(original):
    @functools.wraps(original)
    def transfer_weights(source_model, target_model, *args, **kwargs):
        from .heads import copy_head

        if not _changed_parts(source_model):
            original(source_model, target_model, *args, **kwargs)
        else:
            from .cueq import base_layers_in_place, carry_adapters, refuse_unconvertible

            refuse_unconvertible(source_model)
            with base_layers_in_place(source_model) as base:
                original(base, target_model, *args, **kwargs)
            carry_adapters(source_model, target_model)
        copy_head(source_model, target_model)  # the head this package chose for a multi-head model
        return None

    setattr(transfer_weights, _MARK, True)
    return transfer_weights


def _oeq_config(original, module_name: str):
    @functools.wraps(original)
    def extract_config_mace_model(model, *args, **kwargs):
        parts = _changed_parts(model)
        if parts:
            raise ValueError(
                f"{module_name} copies a MACE's weights by name and would drop this model's adapters "
                f"({parts[0]}, {len(parts)} adapted parts in all) without an error: convert an adapted model "
                "with mmea_kernels.convert_adapted_to_cueq (or mace-torch's cuEquivariance conversion, "
                "enable_cueq=True, which carries the adapters over while mmea_kernels is imported), or merge "
                "ELoRA adapters first (mmea_kernels.merge_and_unload)")
        return original(model, *args, **kwargs)

    setattr(extract_config_mace_model, _MARK, True)
    return extract_config_mace_model


def _patch(module) -> None:
    name = module.__name__
    attr, wrap = (("transfer_weights", _cueq_transfer) if name in CUEQ_MODULES else
                  ("extract_config_mace_model", lambda f: _oeq_config(f, name)))
    original = getattr(module, attr, None)
    if callable(original) and not getattr(original, _MARK, False):
        setattr(module, attr, wrap(original))


class _Loader(importlib.abc.Loader):
    """The module's own loader, then :func:`_patch` on the executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and tracebacks
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in CUEQ_MODULES + OEQ_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Patch the mace-torch conversion modules already imported; patch the others on import."""
    for name in CUEQ_MODULES + OEQ_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            _patch(module)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
