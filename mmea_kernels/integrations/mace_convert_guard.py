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
  hook the adapters into);
* ``extract_model`` (``MACECalculator(compile_mode=...)``) and ``remove_pt_head``
  (``mace_select_head``, a multi-head foundation model in ``mace_run_train``) rebuild a plain MACE
  and load the state dict with ``strict=False``: they rebuild the base model and the adapters are
  carried over the same way; ``remove_pt_head`` keeps one head's readout channels, and the readout
  adapters keep the same channels (:func:`~mmea_kernels.integrations.heads.one_head_adapter_state`;
  a layer whose shape changes in another way raises).

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
# functions that rebuild a plain MACE from a model's config and load its state dict with strict=False:
# extract_model (MACECalculator(compile_mode=...), extract_load) and remove_pt_head (mace_select_head,
# mace_run_train's multi-head foundation model); patched where they are defined and where they are imported
REBUILDS = {"mace.tools.scripts_utils": ("extract_model", "remove_pt_head"), "mace.calculators.mace": ("extract_model",),
            "mace.cli.select_head": ("remove_pt_head",), "mace.cli.run_train": ("remove_pt_head",)}
TARGETS = {**{m: ("transfer_weights",) for m in CUEQ_MODULES}, **{m: ("extract_config_mace_model",) for m in OEQ_MODULES},
           **REBUILDS}
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


def _rebuild(original, attr: str):
    @functools.wraps(original)
    def rebuild(model, *args, **kwargs):
        if not _changed_parts(model):
            return original(model, *args, **kwargs)
        from .cueq import base_layers_in_place, carry_adapters, refuse_unconvertible
        from .heads import copy_head

        refuse_unconvertible(model)
        with base_layers_in_place(model) as base:
            new = original(base, *args, **kwargs)
        edit = None
        if attr == "remove_pt_head":  # the readouts keep one head's channels: so do their adapters
            from .heads import model_heads, one_head_adapter_state

            heads = model_heads(model)
            kept, n = heads.index(model_heads(new)[0]), len(heads)
            edit = lambda state: one_head_adapter_state(state, new, kept, n)  # noqa: E731
        try:
            carry_adapters(model, new, edit)
        except ValueError as exc:  # a layer whose shape the rebuild changed in a way the adapters cannot follow
            raise ValueError(f"mace-torch's {attr} changes layers that carry adapters, which cannot follow "
                             f"({exc}); adapt the model after it (a multi-head model: adapt the single-head "
                             "model remove_pt_head makes, or keep all heads and choose one with --head)") from exc
        if attr == "extract_model":
            copy_head(model, new)
        return new

    setattr(rebuild, _MARK, True)
    return rebuild


def _wrap(name: str, attr: str, original):
    if attr == "transfer_weights":
        return _cueq_transfer(original)
    if attr == "extract_config_mace_model":
        return _oeq_config(original, name)
    return _rebuild(original, attr)


def _patch(module, name: str = "") -> None:
    """Wrap ``module``'s targets (``name``: its import name, for a module run as ``__main__``)."""
    name = name or module.__name__
    found = 0
    for attr in TARGETS.get(name, ()):
        original = module.__dict__.get(attr)
        if callable(original):
            found += 1
            if not getattr(original, _MARK, False):
                setattr(module, attr, _wrap(name, attr, original))
    if TARGETS.get(name) and not found:
        import warnings

        warnings.warn(f"mmea_kernels: {name} has none of {', '.join(TARGETS[name])} (another mace-torch version?): "
                      "its weight copies are not guarded, and may drop adapters without an error", RuntimeWarning)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the target modules as the path finder does, with the loader's ``exec_module`` followed by
    :func:`_patch` (the loader stays the path finder's, of its own type)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        execute = getattr(getattr(spec, "loader", None), "exec_module", None)
        if execute is not None:
            def exec_module(module, _execute=execute):
                _execute(module)
                _patch(module)

            try:
                spec.loader.exec_module = exec_module
            except AttributeError:  # a loader that takes no attributes: left as it is
                pass
        return spec


def install() -> None:
    """Patch the target modules already imported (a module run with ``python -m`` too: it is
    ``__main__``, and loading an adapted model there imports this package); patch the others on import."""
    for name in TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            _patch(module)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) in TARGETS:
        _patch(main, spec.name)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
