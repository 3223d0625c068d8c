"""NequIP (``nequip`` >= 0.7, its Lightning/Hydra framework): model builders that adapt a NequIP
model, for ``nequip-train`` configs, and what NequIP's packaging needs.

NequIP's models use e3nn's ``o3.Linear`` (each convolution's ``linear_1`` / ``linear_2``) and
``e3nn.nn.Gate`` (``equivariant_nonlin``), so :func:`~mmea_kernels.inject_adapters` and
:func:`~mmea_kernels.replace_gates` work on them as on any e3nn model. The builders below do both,
for a config's ``model`` entry::

    model:
      _target_: mmea_kernels.integrations.nequip.AdaptFromCheckpoint   # or AdaptFromPackage (package_path)
      checkpoint_path: base/last.ckpt
      adapter_method: mmea        # or elora; null: FusedGate only
      adapter_rank: 16

``AdaptedNequIPGNNModel`` takes ``NequIPGNNModel``'s arguments (a new model, adapted from the start).
Everything but the adapters is frozen (the per-type energy shifts too: list full parameter names in
``trainable`` to train them as well, e.g. ``[model.func.per_type_energy_scale_shift.shifts]``, which
exists when the model was built with ``per_type_energy_shifts_trainable: true``). With
``adapter_method: null`` and no ``trainable`` nothing is frozen (FusedGate only); with ``trainable``
only those weights train.

Importing this module registers mmea_kernels as an external library for ``nequip-package`` (its
modules are imported from the environment, not copied into the package file; without it the build
fails with "Module did not match against any action pattern"). An AOTInductor file from
``nequip-compile`` names mmea_kernels among the libraries to import before loading (the modules'
``_nequip_custom_ops_libs``); mmea_kernels must be installed wherever such a file runs, and the
file needs Python (its custom ops are Python ops). For a file that runs without either (LAMMPS'
``pair_nequip``), compile with ``--modifiers mmea_kernels_aten_only``
(:func:`mmea_kernels.aten_forms`: the adapters and FusedGates as aten ops, same numbers), or with
``--modifiers mmea_kernels_cpp_ops`` (MMEA adapters as this package's C++-registered op, the rest aten:
runs without Python where the LAMMPS plugins' ``mmea_ops.so`` is loaded first, e.g. ``LD_PRELOAD``).
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

__all__ = ["adapt", "AdaptedNequIPGNNModel", "AdaptFromCheckpoint", "AdaptFromPackage"]


def adapt(model, adapter_method: Optional[str] = "mmea", adapter_rank: int = 16, fused_gate: bool = True,
          trainable: Iterable[str] = (), **adapter_options):
    """``model`` (a NequIP ``GraphModel``, or the dict / ``ModuleDict`` of models NequIP's loaders
    return) with FusedGate in place of e3nn's Gate (``fused_gate``) and adapters of ``adapter_method``
    (``None``: none); ``trainable``: full names (or dotted prefixes) of other parameters to train
    (without adapters, only those: the rest is frozen). In place; returns ``model``."""
    import mmea_kernels as mk

    models = list(model.values()) if isinstance(model, (dict, nn.ModuleDict)) else [model]
    for m in models:
        if fused_gate:
            mk.replace_gates(m)
        wanted = list(trainable)
        if adapter_method:
            mk.inject_adapters(m, method=adapter_method, rank=adapter_rank, **adapter_options)
        names = [n for n, _ in m.named_parameters()]
        hits = {w: [p for n, p in m.named_parameters() if n == w or n.startswith(w + ".")] for w in wanted}
        unknown = [w for w, ps in hits.items() if not ps]
        if unknown:
            near = [n for n in names if any(n.endswith(u) or n.endswith(u.split(".")[-1]) for u in unknown)]
            hint = f"names that end alike: {near[:8]}" if near else f"its parameters include {names[:8]}"
            raise ValueError(f"trainable names {unknown} match no parameter of the model (give full names or dotted "
                             f"prefixes); {hint}")
        if wanted and not adapter_method:  # no adapters: only the listed weights train
            m.requires_grad_(False)
        for ps in hits.values():
            for p in ps:
                p.requires_grad_(True)
    return model


def AdaptedNequIPGNNModel(adapter_method: Optional[str] = "mmea", adapter_rank: int = 16, fused_gate: bool = True,
                          trainable: Iterable[str] = (), **kwargs):
    """``nequip.model.NequIPGNNModel(**kwargs)``, then :func:`adapt`."""
    from nequip.model import NequIPGNNModel

    return adapt(NequIPGNNModel(**kwargs), adapter_method, adapter_rank, fused_gate, trainable)


def AdaptFromCheckpoint(checkpoint_path: str, adapter_method: Optional[str] = "mmea", adapter_rank: int = 16,
                        fused_gate: bool = True, trainable: Iterable[str] = ()):
    """The model of a NequIP training checkpoint (``nequip.model.ModelFromCheckpoint``), then :func:`adapt`."""
    from nequip.model import ModelFromCheckpoint

    return adapt(ModelFromCheckpoint(checkpoint_path), adapter_method, adapter_rank, fused_gate, trainable)


def AdaptFromPackage(package_path: str, adapter_method: Optional[str] = "mmea", adapter_rank: int = 16,
                     fused_gate: bool = True, trainable: Iterable[str] = ()):
    """The model of a ``nequip-package`` file (a foundation model, ``nequip.model.ModelFromPackage``),
    then :func:`adapt`."""
    from nequip.model import ModelFromPackage

    return adapt(ModelFromPackage(package_path), adapter_method, adapter_rank, fused_gate, trainable)


def _register_for_packaging() -> bool:
    try:
        from nequip.scripts._package_utils import register_libraries_as_external_for_packaging
    except ImportError:  # nequip not installed, or a version without packaging
        return False
    register_libraries_as_external_for_packaging(extern_modules=["mmea_kernels"])
    return True


PACKAGING_REGISTERED = _register_for_packaging()
