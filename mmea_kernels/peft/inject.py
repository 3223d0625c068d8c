"""peft-style injection: put adapters on a model's equivariant linear layers, merge or remove
them again (saving and loading only the adapter weights: :mod:`.state`)."""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
from typing import Dict, List, Union

import torch
from torch import nn

from ..nn import AdapterLinear, is_equivariant_linear
from ..nn.scriptable import restore_eager_forms
from .config import AdapterConfig, Patterns

__all__ = ["inject_adapters", "InjectionReport", "merge_and_unload", "unload", "disable_adapters", "adapted_modules",
           "report"]

_SAVED_GRAD_FLAGS = "_mmea_saved_requires_grad"


@dataclasses.dataclass
class AdaptedModule:
    name: str
    irreps_in: str
    irreps_out: str
    parameters: int


@dataclasses.dataclass
class InjectionReport:
    method: str
    options: dict
    modules: List[AdaptedModule]
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        rows = [(m.name, m.irreps_in, m.irreps_out, f"{m.parameters:,}") for m in self.modules]
        head = ("module", "irreps in", "irreps out", "params")
        width = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join("{:<%d}" % w for w in width[:-1]) + "  {:>%d}" % width[-1]
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [f"{self.method.upper()} adapters ({opts}) on {len(self.modules)} modules",
                 fmt.format(*head), fmt.format(*("-" * w for w in width))]
        lines += [fmt.format(*r) for r in rows]
        pct = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        lines.append(f"trainable parameters: {self.trainable_parameters:,} of {self.total_parameters:,} ({pct:.2f} %)")
        return "\n".join(lines)


def adapted_modules(model: nn.Module) -> Dict[str, AdapterLinear]:
    """Qualified name -> adapter wrapper, for every adapter in ``model`` (the eager adapters first put
    back where ``torch.jit.script(model)`` left their TorchScript forms: :func:`restore_eager_forms`)."""
    restore_eager_forms(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def tensor_product_gates(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name -> ``MMEATensorProduct``, the gates of the ``mmea-tp`` method in ``model``."""
    from ..nn.mmea import MMEATensorProduct

    return {n: m for n, m in model.named_modules() if isinstance(m, MMEATensorProduct)}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _select(candidates: List[str], patterns: Patterns, what: str, aliases=None) -> List[str]:
    """The candidates that ``patterns`` pick; ``aliases`` (other names of a candidate) named when a
    pattern matches only such a name."""
    if patterns is None:
        return list(candidates)
    if isinstance(patterns, str):  # a single string is a regular expression (full match), as in peft
        rx = re.compile(patterns)
        picked = [n for n in candidates if rx.fullmatch(n)]
        if not picked:
            raise ValueError(f"{what} regex {patterns!r} matches none of the linear layers: {candidates}")
        return picked
    picked = []
    for p in patterns:
        hit = [n for n in candidates if _matches(n, p)]
        alias = next((a for a in (aliases or {}) if _matches(a, p)), None)
        if not hit and alias is not None:
            raise ValueError(f"{what} pattern {p!r} names {alias!r}, which is the layer {aliases[alias]!r} used in a "
                             f"second place (one module under two names): name it {aliases[alias]!r}")
        if not hit:
            raise ValueError(f"{what} pattern {p!r} matches none of the linear layers: {candidates}")
        picked += hit
    return [n for n in candidates if n in set(picked)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


def _count(model: nn.Module):
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def inject_adapters(model: nn.Module, method: Union[str, AdapterConfig] = "mmea", rank: int = 16,
                    target_modules: Patterns = None, exclude_modules: Patterns = None, **options) -> InjectionReport:
    """Wrap the matching equivariant linear layers (e3nn ``o3.Linear``, ``cuequivariance_torch.Linear``)
    of ``model`` in place and freeze everything else.

    Either an :class:`~mmea_kernels.peft.config.AdapterConfig` (``inject_adapters(model, config)``) or
    its fields as arguments: ``target_modules`` / ``exclude_modules``: ``None`` (all), a list of names,
    suffixes (``"linear_up"``) or globs (``"interactions.*.linear"``), or one regular expression string.
    ``options`` go to the adapter (MMEA: ``phi``, ``init``, ``init_std``, ``backend``; ELoRA: ``alpha``).
    Returns an :class:`InjectionReport` (prints as a table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_adapters needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(method, AdapterConfig):
        if options or rank != 16 or target_modules is not None or exclude_modules is not None:
            raise TypeError("inject_adapters: give either an AdapterConfig or its fields as arguments, not both")
        config = method
    else:
        config = AdapterConfig(method, rank, target_modules, exclude_modules, options)
    if adapted_modules(model):
        raise RuntimeError("model already has adapters; call unload(model) or merge_and_unload(model) first")
    candidates = [n for n, m in model.named_modules() if is_equivariant_linear(m) and n]
    if not candidates and is_equivariant_linear(model):
        raise ValueError("inject_adapters needs a model that contains o3.Linear layers, not a bare o3.Linear "
                         "(or cuequivariance_torch Linear); wrap it directly with MMEALinear/ELoRALinear")
    if not candidates:
        raise ValueError("model contains no o3.Linear (or cuequivariance_torch Linear) layer to adapt")
    aliases = _aliases(model)
    targets = _select(candidates, config.target_modules, "target_modules", aliases)
    if config.exclude_modules is not None:
        excluded = set(_select(candidates, config.exclude_modules, "exclude_modules", aliases))
        targets = [n for n in targets if n not in excluded]
    if not targets:
        raise ValueError("target_modules/exclude_modules leave no layer to adapt")
    _refuse_shared(model, targets)

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    cls = config.adapter_class
    built = {name: _build(cls, model.get_submodule(name), name, config) for name in targets}
    model.requires_grad_(False)
    for name, wrapper in built.items():
        _set_submodule(model, name, wrapper)
        for p in wrapper.adapter_parameters():
            p.requires_grad_(True)
    object.__setattr__(model, _SAVED_GRAD_FLAGS, saved)
    return report(model)


def _build(cls, base: nn.Module, name: str, config: AdapterConfig) -> nn.Module:
    """``cls`` around ``base``; an error about this layer names it and how to leave it out (an error
    about the settings, which any layer would raise, as it is)."""
    try:
        return cls(base, rank=config.rank, **config.options)
    except (TypeError, ValueError, NotImplementedError) as exc:
        from e3nn import o3

        try:  # the same settings on a plain layer: an error there is the settings', not this layer's
            cls(o3.Linear("2x0e+1x1o", "2x0e+1x1o"), rank=config.rank, **config.options)
        except (TypeError, ValueError, NotImplementedError):
            raise exc from None
        raise type(exc)(f"cannot put {config.method} adapters on layer {name!r} ({type(base).__name__}): {exc}; "
                        f"leave it out with exclude_modules=[{name!r}]") from None


def _linear_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name of each equivariant linear layer (several when one module is used in several places)."""
    names: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if n and is_equivariant_linear(m):
            names.setdefault(id(m), []).append(n)
    return names


def _aliases(model: nn.Module) -> Dict[str, str]:
    """Second and later names of a linear layer used in more than one place -> its first name."""
    return {n: names[0] for names in _linear_names(model).values() for n in names[1:]}


def _refuse_shared(model: nn.Module, targets: List[str]) -> None:
    """``ValueError`` for a target layer that the model uses in more than one place (one module
    object under two names): a wrapper put in at one name would adapt only that place, and an ELoRA
    merge would change both."""
    names = _linear_names(model)
    for t in targets:
        where = names[id(model.get_submodule(t))]
        if len(where) > 1:
            raise ValueError(f"layer {t!r} is one module used in {len(where)} places ({', '.join(where)}); adapters on "
                             "it would act in one place only: give each place its own layer, or leave it out "
                             f"(exclude_modules=[{t!r}])")


def report(model: nn.Module) -> InjectionReport:
    """The :class:`InjectionReport` of a model that has adapters."""
    mods = adapted_modules(model)
    if not mods:
        raise ValueError("model has no adapters")
    first = next(iter(mods.values()))
    rows = [AdaptedModule(n, m.in_layout.irreps_str, m.out_layout.irreps_str,
                          sum(p.numel() for p in m.adapter_parameters())) for n, m in mods.items()]
    trainable, total = _count(model)
    return InjectionReport(first.method, first.adapter_options(), rows, trainable, total)


def _restore_grad_flags(model: nn.Module) -> None:
    saved = getattr(model, _SAVED_GRAD_FLAGS, None)
    if saved is None:
        return
    for n, p in model.named_parameters():
        if n in saved:
            p.requires_grad_(saved[n])
    object.__delattr__(model, _SAVED_GRAD_FLAGS)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter (and the ``mmea-tp`` tensor-product gates), putting the original layers
    back (a merged ELoRA adapter is unmerged first); restores requires_grad."""
    mods = {**adapted_modules(model), **tensor_product_gates(model)}
    for name, m in mods.items():
        _set_submodule(model, name, m.unmerge() if getattr(m, "merged", False) else m.base)
    _restore_grad_flags(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (ELoRA: exact) and remove them.

    MMEA adapters raise: their input-dependent gates have no weight-space equivalent.
    """
    mods = adapted_modules(model)
    if not mods:
        raise ValueError("model has no adapters to merge")
    for m in mods.values():
        if not m.mergeable:
            m.merge()  # raises with the explanation
    for name, m in mods.items():
        _set_submodule(model, name, m.merge())
    _restore_grad_flags(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: run the base model (adapters and ``mmea-tp`` gates bypassed) inside the block."""
    mods = list(adapted_modules(model).values()) + list(tensor_product_gates(model).values())
    before = [m.adapter_enabled for m in mods]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_enabled = b
