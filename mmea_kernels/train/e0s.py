"""Per-element reference energies (E0s): fitted to the training data before training
(:func:`refit_e0s`, :func:`set_e0s`) and, with ``refit_e0s_after``, again with the trained model
(:func:`refit_after_training`)."""
from __future__ import annotations

import json
import math
import pathlib
from typing import List, Sequence

import numpy as np
import torch

from .loss import SPLITS, split_errors

__all__ = ["refit_e0s", "set_e0s", "refit_after_training"]


def _energies(frames, key):
    return np.array([a.info[key] for a in frames], dtype=float)


def refit_e0s(model, frames, z_table: Sequence[int], mode: str, energy_key: str, batch_size: int = 50,
              from_scratch: bool = False) -> List[float]:
    """Per-element reference energies for a new level of theory, keeping the model's interaction
    energy: the residual ``E_ref - (E_model - Σ E0_old)`` of the training frames is fitted by
    ``lstsq`` (least squares on element counts for the change from ``E0_old``, minimum-norm when
    the compositions do not determine every element: an element absent from the data keeps its E0)
    or ``average`` (one mean residual per atom for every element);
    ``keep`` leaves them; a JSON file path gives ``{"Z": eV}`` explicitly. ``from_scratch``: fit the
    energies themselves (a randomly initialised model's interaction energy means nothing)."""
    from ..integrations.mace import atoms_to_batch
    from .device import module_device

    e0_old = model.atomic_energies_fn.atomic_energies.detach().double().reshape(-1).cpu().numpy()
    if mode == "keep":
        return [float(v) for v in e0_old]
    if mode not in ("lstsq", "average"):
        p = pathlib.Path(mode)
        if not p.is_file():
            raise ValueError(f"e0s must be lstsq, average, keep or a JSON file; {mode!r} is none of these")
        try:
            raw = json.loads(p.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON {type(raw).__name__}, not an object")
            given = {int(k): float(v) for k, v in raw.items()}
        except (ValueError, TypeError) as exc:
            raise ValueError(f"E0 file {p}: expected a JSON object {{\"<atomic number>\": <eV>, ...}} such as "
                             f'{{"1": -13.6, "8": -2041.2}} ({exc})') from None
        missing = [z for z in z_table if z not in given]
        if missing:
            raise KeyError(f"{p}: no E0 for elements {missing}")
        return [given[int(z)] for z in z_table]
    counts = np.array([[int((a.numbers == z).sum()) for z in z_table] for a in frames], dtype=float)
    interaction = np.zeros(len(frames))
    if not from_scratch:
        r_max = float(model.r_max)
        dtype, device = next(model.parameters()).dtype, module_device(model)
        preds = []
        for i in range(0, len(frames), batch_size):
            b = atoms_to_batch(frames[i:i + batch_size], z_table, r_max, device=device, dtype=dtype)
            out = model(b, training=False, compute_force=False)
            preds.append(out["energy"].detach().double().cpu().numpy())
        interaction = np.concatenate(preds) - counts @ e0_old
    resid = _energies(frames, energy_key) - interaction
    if mode == "average":
        per_atom = float(np.mean(resid / counts.sum(1)))
        return [per_atom] * len(z_table)
    # the correction to the model's E0s, minimum-norm where the compositions do not determine every
    # element: an element absent from the data keeps its E0, and one composition (an rMD17
    # molecule) spreads the correction over its elements instead of setting absolute E0s
    # proportional to the atom counts (ethanol: H -616 eV, and N, absent, 0; found in review)
    delta, *_ = np.linalg.lstsq(counts, resid - counts @ e0_old, rcond=None)
    return [float(v) for v in e0_old + delta]


def set_e0s(model, e0s, source: str = "the E0s") -> None:
    """Put ``e0s`` (one per element of the model) into the model; ``source`` names them in errors."""
    buf = model.atomic_energies_fn.atomic_energies
    if len(e0s) != buf.numel():
        z = [int(v) for v in getattr(model, "atomic_numbers", [])]
        raise ValueError(f"{source} holds {len(e0s)} reference energies (E0s), but the base model has {buf.numel()} "
                         f"elements {z}: it was made for a base model with other elements")
    if not all(math.isfinite(float(v)) for v in e0s):
        raise ValueError(f"{source}: non-finite reference energies (E0s) {list(e0s)}")
    with torch.no_grad():
        buf.copy_(torch.tensor(e0s, dtype=buf.dtype).reshape(buf.shape))


def refit_after_training(cfg, r, metrics: dict, log) -> None:
    """Fair energies: the E0s re-fitted by least squares on the training frames with the trained
    model (its interaction energy kept), so that a constant offset left by training does not count
    as model error. The new E0s go into the model and the checkpoint; the metrics before the re-fit
    stay in ``metrics["before_e0_refit"]``, side by side."""
    before = {split: metrics[split] for split in SPLITS if split in metrics}
    old = list(r.e0s)
    new = refit_e0s(r.model, r.train_frames, r.z, "lstsq", cfg.energy_key)
    set_e0s(r.model, new, "the re-fitted E0s")
    r.e0s = new
    metrics.update(split_errors(r.model, r.graphs, cfg.eval_batch_size, cfg.w_energy, cfg.w_forces, cfg.w_stress))
    metrics.update(e0s=new, e0s_before_refit=old, before_e0_refit=before)
    log("E0s re-fitted after training: " + ", ".join(f"Z={z}: {a:+.4f} -> {b:+.4f} eV" for z, a, b in zip(r.z, old, new)))
