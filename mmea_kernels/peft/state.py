"""Save and load only the adapter weights (peft's ``get_peft_model_state_dict`` /
``set_peft_model_state_dict``), with what is needed to rebuild the adapters and to refuse a model
they do not fit."""
from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..layout import IrrepsLayout
from ..linear_spec import LinearSpec
from ..nn import ADAPTERS, AdapterLinear, is_equivariant_linear
from ..nn.scriptable import restore_eager_forms
from ..ops.backends import check_backend_name
from .inject import adapted_modules, inject_adapters, report, tensor_product_gates, unload, InjectionReport

__all__ = ["adapter_state_dict", "load_adapter_state_dict", "FORMAT"]

FORMAT = "mmea_kernels.adapter/1"


TRAINABLE = ("warn", "include", "ignore")


def adapter_state_dict(model: nn.Module, trainable: str = "warn") -> dict:
    """Adapter weights only, with what is needed to rebuild them: method, options, each target's irreps.

    Parameters outside the adapters that were made trainable again (a model's per-element energy
    shifts, a readout: peft's ``modules_to_save``) are not adapter weights: ``trainable="warn"``
    (default) leaves them out with a ``RuntimeWarning`` naming them, ``"include"`` saves them too
    (under ``"trainable"``; :func:`load_adapter_state_dict` loads them back and makes them trainable),
    ``"ignore"`` leaves them out silently."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    mods = adapted_modules(model)
    if not mods:
        raise ValueError("model has no adapters to save")
    _refuse_tensor_product_gates(model, "saved in an adapter state")
    merged = [n for n, m in mods.items() if getattr(m, "merged", False)]
    if merged:  # its factors would be added once more by whoever loads them into an unmerged base
        raise ValueError(f"ELoRA adapters on {merged[0]} ({len(merged)} in all) are merged into their base weights: "
                         "unmerge() them before saving the adapter state")
    first = next(iter(mods.values()))
    _refuse_mixed_adapters(mods, first)
    state = {}
    for name, m in mods.items():
        for pname, p in m.named_parameters():
            if not pname.startswith("base."):
                state[f"{name}.{pname}"] = p.detach().clone()
    out = {
        "format": FORMAT,
        "method": first.method,
        "options": first.adapter_options(),
        "targets": {n: m.target_info() for n, m in mods.items()},
        "state": state,
    }
    others = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in state}
    if others and trainable == "include":
        out["trainable"] = {n: p.detach().clone() for n, p in others.items()}
    elif others and trainable == "warn":
        names = sorted(others)
        warnings.warn(f"{len(names)} trainable parameters outside the adapters ({', '.join(names[:4])}"
                      f"{', ...' if len(names) > 4 else ''}) are not saved in the adapter state: pass "
                      "trainable='include' to save them too, or freeze them (trainable='ignore' leaves them out "
                      "without this warning)", RuntimeWarning, stacklevel=2)
    return out


def _refuse_mixed_adapters(mods: dict, first: AdapterLinear) -> None:
    """The file records one method and one set of options for every target (what loading injects):
    adapters built one by one with different ones cannot be saved in it without changing what they compute."""
    name0 = next(iter(mods))
    opts0 = first.adapter_options()
    for name, m in mods.items():
        if m.method != first.method:
            raise ValueError(f"an adapter state holds one method: {name0!r} has {first.method} adapters, {name!r} "
                             f"{m.method}; save the model's state_dict() instead")
        opts = m.adapter_options()
        diff = {k: (opts0.get(k), opts.get(k)) for k in type(m).shaping_options if opts0.get(k) != opts.get(k)}
        if diff:
            shown = ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"an adapter state holds one set of {m.method} options for all layers, but {name0!r} and "
                             f"{name!r} differ ({shown}); loading would rebuild both with the first's; save the "
                             "model's state_dict() instead")


def load_adapter_state_dict(model: nn.Module, adapter_state: dict, trainable: str = "load",
                            **options) -> InjectionReport:
    """Load adapters saved by :func:`adapter_state_dict`, injecting them first if the model has none.

    Raises an error naming the module (and both irreps) when the model does not fit the saved adapters.
    The adapter weights do not depend on the feature layout (MMEA gates act per (irrep, multiplicity),
    ELoRA blocks per (input block, output block)), so adapters saved from an e3nn model load into its
    cuEquivariance conversion (``mul_ir`` or ``ir_mul``) and back, as long as the irreps agree.
    Other weights the state holds (``adapter_state_dict(..., trainable="include")``) are loaded and made
    trainable (``trainable="load"``), or left out (``"ignore"``: a model whose names differ).
    """
    if trainable not in ("load", "ignore"):
        raise ValueError(f"trainable must be 'load' or 'ignore', got {trainable!r}")
    if not isinstance(adapter_state, dict) or adapter_state.get("format") != FORMAT:
        fmt = adapter_state.get("format") if isinstance(adapter_state, dict) else type(adapter_state).__name__
        raise ValueError(f"not an mmea_kernels adapter state (format {fmt!r}, expected {FORMAT!r})")
    _check_adapter_state(adapter_state)
    method, saved_opts, targets = adapter_state["method"], dict(adapter_state["options"]), adapter_state["targets"]
    restore_eager_forms(model)  # the adapters an earlier torch.jit.script(model) replaced by their TorchScript forms
    _check_targets(model, targets)
    _refuse_tensor_product_gates(model, "loaded from an adapter state")
    existing = adapted_modules(model)
    if existing:
        if set(existing) != set(targets):
            raise ValueError(f"model already has adapters on {sorted(set(existing) ^ set(targets))} that differ "
                             "from the saved ones; unload(model) first")
        for n, m in existing.items():
            have = m.adapter_options()
            shaping = ADAPTERS[method].shaping_options if method in ADAPTERS else ()
            if m.method != method or any(have.get(k) != v for k, v in saved_opts.items() if k in shaping):
                raise ValueError(f"module {n!r} has {m.method} adapters {have}, the state holds {method} {saved_opts}")
        extra = _checked_trainable(model, adapter_state, trainable)
        _set_runtime_options(existing.values(), method, options)  # after the checks: all or nothing
        remerge = [m for m in existing.values() if getattr(m, "merged", False)]
        for m in remerge:  # the base weights hold the old ΔW: take it out, load, put the new one in
            m.unmerge()
        try:
            _copy_adapter_state(model, adapter_state["state"])
            _copy_trainable(extra)  # a saved base weight (unmerged) goes in before ΔW is added back
        finally:
            for m in remerge:
                m.merge()
        return report(model)
    if method not in ADAPTERS:
        raise ValueError(f"adapter state has unknown method {method!r}; expected one of {sorted(ADAPTERS)}")
    rank = saved_opts.pop("rank")
    free = ADAPTERS[method].runtime_options
    bad = sorted(set(options) - set(free))
    if bad:
        allowed = f"only {', '.join(map(repr, free))} can" if free else "no option can"
        raise ValueError(f"{allowed} be chosen when loading {method} adapters; {bad} come from the saved state")
    saved_opts.update(options)
    try:
        exact = "|".join(re.escape(t) for t in targets)  # the saved names only (a list also matches suffixes)
        inject_adapters(model, method=method, rank=rank, target_modules=exact, **saved_opts)
        extra = _checked_trainable(model, adapter_state, trainable)
        _copy_adapter_state(model, adapter_state["state"])
        _copy_trainable(extra)
    except BaseException:
        unload(model)  # all or nothing: the model is left as it was
        raise
    return report(model)


def _check_adapter_state(adapter_state: dict) -> None:
    """``KeyError`` / ``ValueError`` naming what a (hand-edited or foreign) adapter state lacks."""
    for key in ("method", "options", "targets", "state"):
        if key not in adapter_state:
            raise KeyError(f"adapter state is missing the key {key!r}")
    for key in ("options", "targets", "state"):
        if not isinstance(adapter_state[key], dict):
            raise ValueError(f"adapter state's {key!r} must be a dict, got {type(adapter_state[key]).__name__}")
    if "rank" not in adapter_state["options"]:
        raise KeyError("adapter state's 'options' lack the adapter rank ('rank')")
    for name, info in adapter_state["targets"].items():
        lacking = [k for k in ("irreps_in", "irreps_out") if not isinstance(info, dict) or k not in info]
        if lacking:
            raise KeyError(f"adapter state's target {name!r} lacks {lacking} (what the model's layer is checked against)")


def _check_targets(model: nn.Module, targets: dict) -> None:
    """``ValueError`` naming the first saved target the model's layer does not fit (name, irreps, blocks)."""
    linears = {n: m for n, m in model.named_modules() if is_equivariant_linear(m) or isinstance(m, AdapterLinear)}
    for name, info in targets.items():
        if name not in linears:
            shown = sorted(linears)[:12]
            raise ValueError(f"saved adapter targets module {name!r}, which the model does not have "
                             f"(or which is not an o3.Linear or cuequivariance_torch Linear); its linear layers: "
                             f"{shown}{' ...' if len(linears) > len(shown) else ''}")
        mod = linears[name]
        try:  # what injection refuses (a cuet.Linear of SO(3) irreps, ...), refused by name here too
            if not isinstance(mod, AdapterLinear):
                LinearSpec.from_module(mod)
            have_in, have_out = _irreps_of(mod)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"module {name!r} cannot take the saved adapters: {exc}") from None
        if (have_in, have_out) != (info["irreps_in"], info["irreps_out"]):
            raise ValueError(
                f"module {name!r}: saved adapter has irreps {info['irreps_in']} -> {info['irreps_out']} "
                f"but the model has {have_in} -> {have_out}"
            )
        if "paths" in info:
            spec = mod.spec if isinstance(mod, AdapterLinear) else LinearSpec.from_module(mod)
            have_paths = [[p.i_in, p.i_out] for p in spec.instructions]
            if [list(p) for p in info["paths"]] != have_paths:
                raise ValueError(f"module {name!r}: saved ELoRA blocks (i_in, i_out) {info['paths']} are not the "
                                 f"weight blocks of the model's layer {have_paths}")


def _checked_trainable(model: nn.Module, adapter_state: dict, mode: str = "load") -> list:
    """``[(parameter, saved tensor)]`` of the state's ``"trainable"`` entries (``adapter_state_dict(...,
    trainable="include")``), each checked against the model's parameter of that name (none for
    ``mode="ignore"``)."""
    if mode == "ignore":
        return []
    saved = adapter_state.get("trainable", {})
    if not isinstance(saved, dict):
        raise ValueError(f"adapter state's 'trainable' must be a dict, got {type(saved).__name__}")
    params = dict(model.named_parameters())
    out = []
    for k, v in saved.items():
        if k not in params:
            raise KeyError(f"adapter state's trainable parameter {k!r} is not a parameter of the model")
        p = params[k]
        if not torch.is_tensor(v) or tuple(v.shape) != tuple(p.shape) or not v.is_floating_point():
            got = f"shape {tuple(v.shape)}, dtype {v.dtype}" if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"trainable parameter {k!r} is {got} in the state but shape {tuple(p.shape)}, dtype "
                             f"{p.dtype} in the model")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"trainable parameter {k!r} holds non-finite values (nan/inf) in the state")
        out.append((p, v))
    return out


@torch.no_grad()
def _copy_trainable(pairs: list) -> None:
    for p, v in pairs:
        p.copy_(v)
        p.requires_grad_(True)


def _refuse_tensor_product_gates(model: nn.Module, what: str) -> None:
    tp = tensor_product_gates(model)
    if tp:
        raise ValueError(f"the model has mmea-tp gates on {len(tp)} tensor products ({next(iter(tp))}, ...), which "
                         f"cannot be {what} (it holds linear-layer adapters only): keep the fine-tuning "
                         "checkpoint (train.load_finetuned), or unload(model) first")


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
        if v.is_meta or p.is_meta:
            where = "the state holds a meta tensor" if v.is_meta else "the model's weight is on the meta device"
            raise ValueError(f"adapter weight {k!r}: {where} (no values to copy); materialise the model first "
                             "(model.to_empty(device=...), then load its base weights and this adapter state)")
        if not v.is_floating_point():
            raise ValueError(f"adapter weight {k!r} has dtype {v.dtype} in the state; adapter weights are floating point")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"adapter weight {k!r} holds non-finite values (nan/inf) in the state")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def _set_runtime_options(mods, method: str, options: dict) -> None:
    """Apply ``options`` (only the method's runtime options, such as MMEA's ``backend``) to adapters
    that are already in the model; ``ValueError`` for any other."""
    free = ADAPTERS[method].runtime_options if method in ADAPTERS else ()
    bad = sorted(set(options) - set(free))
    if bad:
        allowed = f"only {', '.join(map(repr, free))} can" if free else "no option can"
        raise ValueError(f"{allowed} be chosen when loading {method} adapters; {bad} come from the saved state")
    if "backend" in options:
        check_backend_name(options["backend"])
    for m in mods:
        for k, v in options.items():
            setattr(m, k, v)


def _irreps_of(mod: nn.Module):
    if isinstance(mod, AdapterLinear):
        return mod.in_layout.irreps_str, mod.out_layout.irreps_str
    return IrrepsLayout.of(mod.irreps_in).irreps_str, IrrepsLayout.of(mod.irreps_out).irreps_str


