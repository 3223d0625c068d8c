"""The fields of a fine-tuning checkpoint, checked before any of them is used: a crafted or corrupt
file (a key of the wrong type, an adapter option that is no option of its method, a reference frame of
the wrong shape) is refused with one line that names the file and the key, never an internal error
deep in loading. Only types and shapes are checked here; whether the tensors fit the model is
:func:`~.checkpoint.load_finetuned`'s check."""
from __future__ import annotations

import math
import numbers
import re

import torch

__all__ = ["check_fields"]

_STR = ("method", "model", "base_fingerprint", "dtype")
_STR_OR_NONE = ("model_as_given", "model_config", "model_config_as_given", "head", "energy_key", "forces_key",
                "stress_key")
_INT = ("rank", "seed")
_INT_OR_NONE = ("epoch", "trainable_parameters")
_WEIGHTS = ("w_stress", "w_energy", "w_forces")
_DICT_OR_NONE = ("metrics", "parameter_groups", "config", "provenance")


def _bad(path, key: str, want: str, value) -> ValueError:
    shown = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
    return ValueError(f"checkpoint {path}: {key!r} must be {want}, found {shown[:80]} (a corrupt or altered file)")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def check_fields(ckpt: dict, path) -> None:
    """``ValueError`` naming ``path`` and the key for the first field of ``ckpt`` (a checkpoint dict
    whose format and required keys are already checked) of the wrong type or shape."""
    from .methods import ADAPTER_METHODS, METHODS

    for key in _STR:
        if not isinstance(ckpt[key], str):
            raise _bad(path, key, "a string", ckpt[key])
    if ckpt["method"] not in METHODS:
        raise _bad(path, "method", f"one of {', '.join(METHODS)}", ckpt["method"])
    for key in _STR_OR_NONE:
        if ckpt.get(key) is not None and not isinstance(ckpt[key], str):
            raise _bad(path, key, "a string or None", ckpt[key])
    for key in _INT + _INT_OR_NONE:
        if (key in _INT or ckpt.get(key) is not None) and not _is_int(ckpt[key]):
            raise _bad(path, key, "an integer", ckpt[key])
    if ckpt["rank"] < 1:
        raise _bad(path, "rank", "an integer >= 1", ckpt["rank"])
    for key in _WEIGHTS:
        if key in ckpt and not (_is_real(ckpt[key]) and ckpt[key] >= 0):
            raise _bad(path, key, "a finite number >= 0", ckpt[key])
    for key in _DICT_OR_NONE:
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise _bad(path, key, "a dict or None", ckpt[key])
    e0s = ckpt["e0s"]
    if not isinstance(e0s, (list, tuple)) or not all(_is_real(v) for v in e0s):
        raise _bad(path, "e0s", "a list of finite numbers (one reference energy per element)", e0s)
    for key in ("trainable", "buffers"):
        if key in ckpt and not (isinstance(ckpt[key], dict)
                                and all(isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in ckpt[key].items())):
            raise _bad(path, key, "a dict of tensors by parameter name", ckpt[key])
        _check_finite(ckpt.get(key, {}), key, path)
    if ckpt["method"] in ADAPTER_METHODS:
        _check_rank(ckpt, path)
    _check_options(ckpt, path, ADAPTER_METHODS)
    _check_span(ckpt.get("e0_span"), path)
    if "probe" in ckpt:
        _check_probe(ckpt["probe"], path)


def _check_finite(tensors: dict, key: str, path) -> None:
    """Every floating (or complex) tensor finite: an older checkpoint without a reference prediction
    ('probe') would otherwise give NaN energies and errors without a word."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"checkpoint {path}: {key!r} must be finite weights, found non-finite values "
                             f"(NaN or inf) in {name!r} (a corrupt or altered file)")


# the trainable tensors whose shape holds the adapter rank: (name ending, dimension)
_RANK_DIMS = ((re.compile(r"(^|\.)mmea_down\.weight$"), 0), (re.compile(r"(^|\.)elora_A\.\d+$"), 1),
              (re.compile(r"(^|\.)elora_B\.\d+$"), 0))


UNCONFIRMED_RANK = 4096  # a rank no saved adapter weight confirms: above any real one (16-128), cheap to build


def _check_rank(ckpt: dict, path) -> None:
    """The adapter ``rank`` of an adapter method equals the width the saved adapter weights have
    (``mmea_down.weight`` rows, ``elora_A.i`` columns, ``elora_B.i`` rows), checked before the adapters
    are built at that rank: a rank of 10**9 would allocate gate nets of that width first. (mmea-paper's
    low-rank updates clamp the rank to each block's size; its MMEA adapters carry it.) With no such
    weight to match, a rank above :data:`UNCONFIRMED_RANK` is refused."""
    rank, found = ckpt["rank"], False
    for name, t in ckpt["trainable"].items():
        for pattern, dim in _RANK_DIMS:
            if pattern.search(name) and t.dim() == 2:
                found = True
                if t.shape[dim] != rank:
                    raise _bad(path, "rank", f"the width of the adapter weights ({name!r} has shape {tuple(t.shape)}, "
                                             f"rank {t.shape[dim]})", rank)
    if not found and rank > UNCONFIRMED_RANK:  # nothing to match (a crafted file): loading refuses it, but
        # only after the adapters are built at this rank
        raise _bad(path, "rank", f"at most {UNCONFIRMED_RANK} when no adapter weight shows it ('trainable' holds no "
                                 "mmea_down.weight / elora_A.N)", rank)


def _check_options(ckpt: dict, path, adapter_methods) -> None:
    from ..nn import ADAPTERS

    opts, method = ckpt.get("adapter_options") or {}, ckpt["method"]
    if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
        raise _bad(path, "adapter_options", "a dict of options by name", opts)
    if opts and method not in adapter_methods:
        raise _bad(path, "adapter_options", f"empty for method {method!r} (it has no adapters)", opts)
    known = ADAPTERS["elora" if method == "elora" else "mmea"].option_names if opts else ()
    bad = sorted(set(opts) - set(known))
    if bad:
        raise _bad(path, "adapter_options", f"made of {', '.join(known)} for method {method!r} (unknown: "
                                            f"{', '.join(bad)})", opts)


def _check_span(span, path) -> None:
    if span is None:
        return
    ok = (isinstance(span, dict) and isinstance(span.get("elements"), (list, tuple))
          and all(_is_int(v) for v in span["elements"]) and isinstance(span.get("basis"), (list, tuple))
          and all(isinstance(row, (list, tuple)) and len(row) == len(span["elements"]) and all(_is_real(v) for v in row)
                  for row in span["basis"])
          and all(isinstance(c, str) for c in span.get("compositions", [])) and _is_int(span.get("n_compositions", 0)))
    if not ok:
        raise _bad(path, "e0_span", "None or the span of the training compositions (elements, basis rows of their "
                                    "length, compositions)", span)


def _check_probe(probe, path) -> None:
    tensors = ("numbers", "positions", "forces", "cell", "pbc")
    if not isinstance(probe, dict) or not all(isinstance(probe.get(k), torch.Tensor) for k in tensors):
        raise _bad(path, "probe", f"the reference frame (tensors {', '.join(tensors)}, energy, dtype)", probe)
    n = probe["numbers"].shape
    ok = (len(n) == 1 and n[0] >= 1 and tuple(probe["positions"].shape) == (n[0], 3)
          and tuple(probe["forces"].shape) == (n[0], 3) and tuple(probe["cell"].shape) == (3, 3)
          and tuple(probe["pbc"].shape) == (3,) and _is_real(probe.get("energy"))
          and probe.get("dtype") in ("float32", "float64"))
    if not ok:
        raise _bad(path, "probe", "the reference frame: numbers (n,), positions and forces (n, 3), cell (3, 3), "
                                  "pbc (3,), a finite energy and its dtype", {k: probe.get(k) for k in ("energy", "dtype")})
