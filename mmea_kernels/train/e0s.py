"""Per-element reference energies (E0s): fitted to the training data before training
(:func:`refit_e0s`, :func:`set_e0s`) or given in a JSON file, and, with ``refit_e0s_after``, fitted
again with the trained model (:func:`refit_after_training`).

A fit determines the E0s only along the span of the training compositions (element-count
vectors); elsewhere they keep the base model's values (minimum-norm correction). A checkpoint whose
E0s were fitted stores that span (:func:`fitted_span`); :func:`warn_outside_span` warns when frames
to evaluate have a composition outside it: their energies then carry an unknown per-element offset
(forces do not)."""
from __future__ import annotations

import json
import math
import pathlib
import re
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..integrations.heads import head_e0s
from .data import energy_weight
from .loss import SPLITS, split_errors

__all__ = ["refit_e0s", "set_e0s", "refit_after_training", "E0OffsetWarning", "composition_span", "fitted_span",
           "outside_span", "warn_outside_span"]


def _energies(frames, key):
    from .checks import read_label

    return np.array([read_label(a, "energy", key)[0] for a in frames], dtype=float)


def _names(zs) -> str:
    from ase.data import chemical_symbols

    names = [f"{chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'} (Z={z})" for z in zs]
    return ", ".join(names[:12]) + (f" … ({len(names)} elements)" if len(names) > 12 else "")


def _log_rank0(log, text: str) -> None:
    import torch.distributed as dist

    if log is not None:
        log(text)
    elif not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        print(text)


E0_LIMIT = 1e10  # eV: no atom's energy comes near it (the heaviest elements' total energies are ~1e6 eV)


def _energy(p: pathlib.Path, key: str, value) -> float:
    """``value`` (a JSON number) as a float; ``ValueError`` naming the file and element for one beyond
    :data:`E0_LIMIT`: a huge integer overflows ``float()`` (an internal OverflowError), and 1e300 is finite
    in float64 but inf in a float32 model (and in any sum of energies near it). NaN and inf are left to
    the non-finite check of :func:`_given_e0s`."""
    try:
        v = float(value)
    except OverflowError:
        shown = f"a {len(str(abs(value)))}-digit integer"
    else:
        if not math.isfinite(v) or abs(v) <= E0_LIMIT:
            return v
        shown = f"{v}"
    raise ValueError(f"E0 file {p}: Z={key}: {shown} eV is no reference energy: an E0 must be at most {E0_LIMIT:g} eV "
                     "in magnitude (no atom's energy comes near that: the heaviest elements' total energies are ~1e6 "
                     "eV; larger values overflow a float32 model)")


def _given_e0s(p: pathlib.Path, z_table: Sequence[int], e0_old, frames, log) -> List[float]:
    """The E0s of a JSON file ``{"Z": eV}``: every key an atomic number given once, every value finite;
    elements the base model does not have are not used, and an element of the model the file leaves
    out keeps the base model's E0 (each said in one log line), unless the training data contain it."""
    try:
        raw = json.loads(p.read_text(), object_pairs_hook=lambda kv: ("object", kv))  # repeated keys kept
        if not (isinstance(raw, tuple) and raw[0] == "object"):
            raise ValueError(f"a JSON {type(raw).__name__}, not an object")
        raw = raw[1]
        for k, v in raw:
            z = int(k)  # "H": int()'s own message names the key
            if not re.fullmatch(r"[0-9]+", k):  # int() also takes "1_0" (as 10), " 6", "+8", other scripts' digits
                raise ValueError(f"the key {k!r} is not an atomic number in the digits 0-9 (int() reads it as {z})")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"the value of {k!r} is {json.dumps(v)}, not a number")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"E0 file {p}: expected a JSON object {{\"<atomic number>\": <eV>, ...}} such as "
                         f'{{"1": -13.6, "8": -2041.2}} ({exc})') from None
    pairs = [(int(k), _energy(p, k, v)) for k, v in raw]
    given = dict(pairs)
    z_model = [int(z) for z in z_table]
    twice = sorted({z for z, _ in pairs if sum(1 for y, _ in pairs if y == z) > 1})
    if twice:
        raise ValueError(f"E0 file {p} gives elements {_names(twice)} more than once")
    not_elements = sorted(z for z in given if not 1 <= z <= 118)
    if not_elements:
        raise ValueError(f"E0 file {p}: {not_elements} {'is not an atomic number' if len(not_elements) == 1 else 'are not atomic numbers'}")
    unknown = sorted(set(given) - set(z_model))
    if unknown:  # a periodic-table file serves several base models: the others' elements are not used
        _log_rank0(log, f"E0 file {p}: {_names(unknown)} not used (not elements of the base model)")
    bad = {z: v for z, v in given.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"E0 file {p}: non-finite given E0s {', '.join(f'Z={z}: {v}' for z, v in sorted(bad.items()))}")
    missing = [z for z in z_model if z not in given]
    present = sorted({int(n) for a in frames for n in a.numbers})
    needed = [z for z in missing if z in present]
    if needed:
        raise KeyError(f"{p}: no E0 for elements {needed} ({_names(needed)}), which the training data contain; "
                       "give them too (elements absent from the data may be left out: they keep the base model's E0s)")
    if missing:
        from ase.data import chemical_symbols

        listed = _names(missing) if len(missing) <= 12 else " ".join(chemical_symbols[z] for z in missing)
        _log_rank0(log, f"E0 file {p} leaves out {len(missing)} of the base model's {len(z_model)} elements, absent from "
                        f"the training data; they keep the base model's E0s: {listed}")
    return [given[z] if z in given else float(e0_old[k]) for k, z in enumerate(z_model)]


def refit_e0s(model, frames, z_table: Sequence[int], mode: str, energy_key: str, batch_size: int = 50,
              from_scratch: bool = False, log=None) -> List[float]:
    """Per-element reference energies for a new level of theory, keeping the model's interaction
    energy: the residual ``E_ref - (E_model - Σ E0_old)`` of the training frames is fitted by
    ``lstsq`` (least squares on element counts for the change from ``E0_old``, minimum-norm when
    the compositions do not determine every element: an element absent from the data keeps its E0)
    or ``average`` (the same: mace-torch's name for a per-element least-squares fit; it once meant one
    mean per atom for every element here, which gave elements absent from the data that value and
    mixed compositions errors of keV);
    ``keep`` leaves them; a JSON file path gives ``{"Z": eV}`` explicitly (:func:`_given_e0s`: an
    element of the model it leaves out, absent from ``frames``, keeps its E0, said through ``log``,
    default ``print`` on rank 0). ``from_scratch``: fit the energies themselves (a randomly
    initialised model's interaction energy means nothing). A fit weighs each frame by its energy loss
    weight (``config_weight`` x ``config_energy_weight``, mace-torch's; 1 by default): a frame the
    loss ignores sets no E0."""
    from ..integrations.mace import atoms_to_batch
    from .device import module_device

    e0_old = head_e0s(model).detach().double().reshape(-1).cpu().numpy()  # a multi-head model: its head's
    if mode == "keep":
        return [float(v) for v in e0_old]
    if mode not in ("lstsq", "average"):
        p = pathlib.Path(mode)
        if not p.is_file():
            what = "no such file" if mode.lower().endswith(".json") or "/" in mode else "none of these"
            raise ValueError(f"--e0s must be lstsq, average, keep or a JSON file of E0s; {mode!r}: {what}")
        return _given_e0s(p, z_table, e0_old, frames, log)
    # frames the loss gives no energy weight (config_weight x config_energy_weight = 0) set no E0 either,
    # and the others count by that weight (mace-torch's own fit counts every frame alike)
    w = np.array([energy_weight(a) for a in frames])
    if len(frames) and not (w > 0).any():
        raise ValueError("--e0s: every training frame has energy weight 0 (config_weight x config_energy_weight), "
                         "so the E0s cannot be fitted: give them (--e0s FILE.json) or keep the base model's (keep)")
    frames = [a for a, wi in zip(frames, w) if wi > 0]
    w = np.sqrt(w[w > 0])
    counts = _counts(frames, z_table)
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
    # the correction to the model's E0s, minimum-norm where the compositions do not determine every
    # element: an element absent from the data keeps its E0, and one composition (an rMD17
    # molecule) spreads the correction over its elements instead of setting absolute E0s
    # proportional to the atom counts (ethanol: H -616 eV, and N, absent, 0; found in review)
    delta, *_ = np.linalg.lstsq(counts * w[:, None], (resid - counts @ e0_old) * w, rcond=None)
    return [float(v) for v in e0_old + delta]


def set_e0s(model, e0s, source: str = "the E0s") -> None:
    """Put ``e0s`` (one per element of the model) into the model (a multi-head model: into the head it
    runs, :func:`~mmea_kernels.integrations.heads.head_e0s`); ``source`` names them in errors."""
    buf, table = head_e0s(model), model.atomic_energies_fn.atomic_energies
    if table.dim() == 2 and len(e0s) == table.numel() != buf.numel():
        raise ValueError(f"{source} holds the E0s of all {table.shape[0]} heads of a multi-head base: it was trained "
                         "before this package chose a head (it trained head 0, whatever the base's default); "
                         "fine-tune again (--head chooses the head)")
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
    if not any(energy_weight(a) > 0 for a in r.train_frames):
        log("note: --refit-e0s-after: every training frame has energy weight 0 (config_weight x "
            "config_energy_weight): nothing to fit the E0s on; they stay as trained")
        return
    before = {split: metrics[split] for split in SPLITS if split in metrics}
    old = list(r.e0s)
    new = refit_e0s(r.model, r.train_frames, r.z, "lstsq", cfg.energy_key)
    set_e0s(r.model, new, "the re-fitted E0s")
    r.e0s = new
    metrics.update(split_errors(r.model, r.graphs, cfg.eval_batch_size, cfg.w_energy, cfg.w_forces, cfg.w_stress))
    metrics.update(e0s=new, e0s_before_refit=old, before_e0_refit=before)
    log("E0s re-fitted after training: " + ", ".join(f"Z={z}: {a:+.4f} -> {b:+.4f} eV" for z, a, b in zip(r.z, old, new)))


# ------------------------------------------------------------------ where fitted E0s are determined
class E0OffsetWarning(UserWarning):
    """Energies of a composition outside the span of the compositions the E0s were fitted on."""


def _formula(counts: dict) -> str:
    from ase.data import chemical_symbols
    from ase.formula import Formula

    return Formula.from_dict({chemical_symbols[z]: int(n) for z, n in counts.items() if n}).format("hill")


def _counts(frames, z: Sequence[int]) -> np.ndarray:
    return np.array([[int((np.asarray(a.numbers) == zi).sum()) for zi in z] for a in frames], dtype=float).reshape(-1, len(z))


def composition_span(frames, z_table: Sequence[int], shown: int = 5) -> dict:
    """What tells whether a composition is one a fit of E0s on ``frames`` determines: the elements,
    an orthonormal basis of the span of the frames' element-count vectors and (for messages) up to
    ``shown`` of their distinct formulas. Plain types (a checkpoint stores it)."""
    z = [int(v) for v in z_table]
    counts = np.unique(_counts(frames, z), axis=0)
    basis = np.zeros((0, len(z)))
    if counts.size:
        _, sv, vt = np.linalg.svd(counts, full_matrices=False)
        basis = vt[: int((sv > sv.max() * max(counts.shape) * 1e-12).sum())]
    formulas = [_formula(dict(zip(z, c))) for c in counts]
    return {"elements": z, "basis": basis.tolist(), "compositions": formulas[:shown],
            "n_compositions": len(formulas)}


def fitted_span(cfg, r) -> Optional[dict]:
    """The span (:func:`composition_span`) of the training compositions of run ``r`` when its E0s
    were fitted on them (``lstsq``, ``average`` or ``refit_e0s_after``); None for E0s given or kept."""
    return training_span(cfg, r.train_frames, r.z)


def training_span(cfg, train_frames, z_table: Sequence[int]) -> Optional[dict]:
    """:func:`fitted_span` of a run's training frames and element table."""
    if cfg.refit_e0s_after or cfg.e0s in ("lstsq", "average"):
        fitted = [a for a in train_frames if energy_weight(a) > 0]  # the frames the E0s were fitted on
        return composition_span(fitted, z_table) if fitted else None
    return None


def outside_span(span: Optional[dict], frames) -> List[int]:
    """The indices of ``frames`` whose composition lies outside ``span`` (none without a span, and
    none for a frame with an element the span does not list: the model refuses those anyway)."""
    if not span or not len(frames):
        return []
    z = [int(v) for v in span["elements"]]
    basis = np.asarray(span["basis"], dtype=float).reshape(-1, len(z))
    c = _counts(frames, z)
    known = c.sum(1) == np.array([len(a) for a in frames])
    resid = np.linalg.norm(c - (c @ basis.T) @ basis, axis=1)
    return [int(i) for i in np.flatnonzero(known & (resid > 1e-6 * np.maximum(1.0, np.linalg.norm(c, axis=1))))]


def span_message(span: dict, frames, idx: Sequence[int], where: str, whose: str = "the checkpoint's") -> str:
    formulas = list(dict.fromkeys(frames[i].get_chemical_formula("hill") for i in idx))
    fitted = ", ".join(span.get("compositions", [])) + (" …" if span.get("n_compositions", 0) > len(span.get("compositions", [])) else "")
    which = "the structure" if len(frames) == 1 else f"{len(idx)} of {len(frames)} frames (first: frame {idx[0]})"
    return (f"{where}: {which} {'has' if len(frames) == 1 else 'have'} a composition ({', '.join(formulas[:5])}"
            f"{' …' if len(formulas) > 5 else ''}) outside the span of the training compositions {whose} E0s "
            f"were fitted on ({fitted}): energies there carry an unknown per-element offset (the fit does not determine "
            "it; it can be keV); forces are unaffected. To avoid it, fine-tune on several compositions that span the ones "
            "you evaluate, or give isolated-atom energies with --e0s FILE.json")


def warn_outside_span(span: Optional[dict], frames, where: str, stacklevel: int = 2) -> List[int]:
    """Warn once (:class:`E0OffsetWarning`) when frames have a composition outside ``span`` (a
    checkpoint's ``e0_span``; None, as in checkpoints from before it was stored: no warning);
    returns their indices."""
    idx = outside_span(span, frames)
    if idx:
        warnings.warn(span_message(span, frames, idx, where), E0OffsetWarning, stacklevel=stacklevel + 1)
    return idx


def split_span_note(cfg, frames: dict, z_table: Sequence[int]) -> str:
    """``note:`` lines for the --valid / --test frames of a run whose compositions lie outside the
    span of the training compositions its E0s are fitted on (:func:`fitted_span`): their energy
    errors carry an offset training cannot change, and the validation loss (best epoch, learning-rate
    schedule, early stopping) follows it; '' when there are none."""
    span = training_span(cfg, frames["train"], z_table)
    notes = []
    for split in ("valid", "test"):
        part = frames.get(split) or []
        idx = outside_span(span, part)
        if idx:
            extra = ("; the validation loss, which picks the best epoch and drives the learning-rate schedule and "
                     "early stopping, carries that offset too") if split == "valid" else ""
            notes.append("note: " + span_message(span, part, idx, f"--{split}", whose="this run's") + extra)
    return "\n".join(notes)

