"""peft-style injection: put adapters on a model's equivariant linear layers, save and load only
the adapter weights, merge or remove the adapters again."""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..nn import ADAPTERS, AdapterLinear, is_equivariant_linear
from ..nn.base import linear_paths

__all__ = [
    "inject_adapters", "InjectionReport", "adapter_state_dict", "load_adapter_state_dict",
    "merge_and_unload", "unload", "disable_adapters", "adapted_modules", "FORMAT",
]

FORMAT = "mmea_kernels.adapter/1"
_SAVED_GRAD_FLAGS = "_mmea_saved_requires_grad"
# options that change what the saved weights compute (they must agree when loading into adapters)
_SHAPING = {"mmea": ("rank", "phi"), "elora": ("rank", "alpha")}

Patterns = Union[None, str, Sequence[str]]


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
    """Qualified name -> adapter wrapper, for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _select(candidates: List[str], patterns: Patterns, what: str) -> List[str]:
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


def inject_adapters(model: nn.Module, method: str = "mmea", rank: int = 16, target_modules: Patterns = None,
                    exclude_modules: Patterns = None, **options) -> InjectionReport:
    """Wrap the matching equivariant linear layers (e3nn ``o3.Linear``, ``cuequivariance_torch.Linear``)
    of ``model`` in place and freeze everything else.

    ``target_modules`` / ``exclude_modules``: ``None`` (all), a list of names, suffixes
    (``"linear_up"``) or globs (``"interactions.*.linear"``), or one regular expression string.
    ``options`` go to the adapter (MMEA: ``phi``, ``init``, ``init_std``, ``backend``; ELoRA: ``alpha``).
    Returns an :class:`InjectionReport` (prints as a table).
    """
    if method not in ADAPTERS:
        raise ValueError(f"unknown adapter method {method!r}; expected one of {sorted(ADAPTERS)}")
    if adapted_modules(model):
        raise RuntimeError("model already has adapters; call unload(model) or merge_and_unload(model) first")
    candidates = [n for n, m in model.named_modules() if is_equivariant_linear(m) and n]
    if not candidates and is_equivariant_linear(model):
        raise ValueError("inject_adapters needs a model that contains o3.Linear layers, not a bare o3.Linear "
                         "(or cuequivariance_torch Linear); wrap it directly with MMEALinear/ELoRALinear")
    if not candidates:
        raise ValueError("model contains no o3.Linear (or cuequivariance_torch Linear) layer to adapt")
    targets = _select(candidates, target_modules, "target_modules")
    if exclude_modules is not None:
        excluded = set(_select(candidates, exclude_modules, "exclude_modules"))
        targets = [n for n in targets if n not in excluded]
    if not targets:
        raise ValueError("target_modules/exclude_modules leave no layer to adapt")

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    cls = ADAPTERS[method]
    built = {name: cls(model.get_submodule(name), rank=rank, **options) for name in targets}
    model.requires_grad_(False)
    for name, wrapper in built.items():
        _set_submodule(model, name, wrapper)
        for p in wrapper.adapter_parameters():
            p.requires_grad_(True)
    object.__setattr__(model, _SAVED_GRAD_FLAGS, saved)
    return report(model)


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


def adapter_state_dict(model: nn.Module) -> dict:
    """Adapter weights only, with what is needed to rebuild them: method, options, each target's irreps."""
    mods = adapted_modules(model)
    if not mods:
        raise ValueError("model has no adapters to save")
    first = next(iter(mods.values()))
    state = {}
    for name, m in mods.items():
        for pname, p in m.named_parameters():
            if not pname.startswith("base."):
                state[f"{name}.{pname}"] = p.detach().clone()
    return {
        "format": FORMAT,
        "method": first.method,
        "options": first.adapter_options(),
        "targets": {n: _target_info(m) for n, m in mods.items()},
        "state": state,
    }


def _target_info(m: AdapterLinear) -> dict:
    info = {"irreps_in": m.in_layout.irreps_str, "irreps_out": m.out_layout.irreps_str, "layout": m.layout_name}
    if m.method == "elora":  # which weight block each A_i, B_i belongs to
        info["paths"] = [[p.i_in, p.i_out] for p in m.paths]
    return info


def load_adapter_state_dict(model: nn.Module, adapter_state: dict, **options) -> InjectionReport:
    """Load adapters saved by :func:`adapter_state_dict`, injecting them first if the model has none.

    Raises an error naming the module (and both irreps) when the model does not fit the saved adapters.
    The adapter weights do not depend on the feature layout (MMEA gates act per (irrep, multiplicity),
    ELoRA blocks per (input block, output block)), so adapters saved from an e3nn model load into its
    cuEquivariance conversion (``mul_ir`` or ``ir_mul``) and back, as long as the irreps agree.
    """
    if not isinstance(adapter_state, dict) or adapter_state.get("format") != FORMAT:
        fmt = adapter_state.get("format") if isinstance(adapter_state, dict) else type(adapter_state).__name__
        raise ValueError(f"not an mmea_kernels adapter state (format {fmt!r}, expected {FORMAT!r})")
    for key in ("method", "options", "targets", "state"):
        if key not in adapter_state:
            raise KeyError(f"adapter state is missing the key {key!r}")
    method, saved_opts, targets = adapter_state["method"], dict(adapter_state["options"]), adapter_state["targets"]
    linears = {n: m for n, m in model.named_modules() if is_equivariant_linear(m) or isinstance(m, AdapterLinear)}
    for name, info in targets.items():
        if name not in linears:
            raise ValueError(f"saved adapter targets module {name!r}, which the model does not have "
                             f"(or which is not an o3.Linear or cuequivariance_torch Linear)")
        mod = linears[name]
        have_in, have_out = _irreps_of(mod)
        if (have_in, have_out) != (info["irreps_in"], info["irreps_out"]):
            raise ValueError(
                f"module {name!r}: saved adapter has irreps {info['irreps_in']} -> {info['irreps_out']} "
                f"but the model has {have_in} -> {have_out}"
            )
        if "paths" in info:
            have_paths = [[p.i_in, p.i_out] for p in linear_paths(mod.base if isinstance(mod, AdapterLinear) else mod)]
            if [list(p) for p in info["paths"]] != have_paths:
                raise ValueError(f"module {name!r}: saved ELoRA blocks (i_in, i_out) {info['paths']} are not the "
                                 f"weight blocks of the model's layer {have_paths}")
    existing = adapted_modules(model)
    if existing:
        if set(existing) != set(targets):
            raise ValueError(f"model already has adapters on {sorted(set(existing) ^ set(targets))} that differ "
                             "from the saved ones; unload(model) first")
        for n, m in existing.items():
            have = m.adapter_options()
            if m.method != method or any(have.get(k) != v for k, v in saved_opts.items() if k in _SHAPING[method]):
                raise ValueError(f"module {n!r} has {m.method} adapters {have}, the state holds {method} {saved_opts}")
        _copy_adapter_state(model, adapter_state["state"])
        return report(model)
    rank = saved_opts.pop("rank")
    bad = sorted(set(options) - {"backend"})
    if bad:
        raise ValueError(f"only 'backend' can be chosen when loading adapters; {bad} come from the saved state")
    saved_opts.update(options)
    try:
        inject_adapters(model, method=method, rank=rank, target_modules=list(targets), **saved_opts)
        _copy_adapter_state(model, adapter_state["state"])
    except BaseException:
        unload(model)  # all or nothing: the model is left as it was
        raise
    return report(model)


def _copy_adapter_state(model: nn.Module, state: dict) -> None:
    """Copy ``state`` into the adapter weights after checking every key and shape (nothing is
    copied when one does not fit)."""
    mods = adapted_modules(model)
    own = {f"{n}.{pn}": p for n, m in mods.items() for pn, p in m.named_parameters() if not pn.startswith("base.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"adapter state does not fit: missing keys {missing}, unexpected keys {unexpected}")
    for k, p in own.items():
        v = state[k]
        if not torch.is_tensor(v) or tuple(v.shape) != tuple(p.shape):
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"adapter weight {k!r} has shape {got} in the state but {tuple(p.shape)} in the model")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def _irreps_of(mod: nn.Module):
    if isinstance(mod, AdapterLinear):
        return mod.in_layout.irreps_str, mod.out_layout.irreps_str
    from ..layout import IrrepsLayout
    return IrrepsLayout.of(mod.irreps_in).irreps_str, IrrepsLayout.of(mod.irreps_out).irreps_str


def _restore_grad_flags(model: nn.Module) -> None:
    saved = getattr(model, _SAVED_GRAD_FLAGS, None)
    if saved is None:
        return
    for n, p in model.named_parameters():
        if n in saved:
            p.requires_grad_(saved[n])
    object.__delattr__(model, _SAVED_GRAD_FLAGS)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter, putting the original (unchanged) layers back; restores requires_grad."""
    mods = adapted_modules(model)
    for name, m in mods.items():
        _set_submodule(model, name, m.base)
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
        if m.method == "mmea":
            m.merge()  # raises with the explanation
    for name, m in mods.items():
        _set_submodule(model, name, m.merge())
    _restore_grad_flags(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: run the base model (adapters bypassed) inside the block."""
    mods = list(adapted_modules(model).values())
    before = [m.adapter_enabled for m in mods]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_enabled = b
