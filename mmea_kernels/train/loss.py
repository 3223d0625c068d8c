"""The training loss and the error metrics: ``w_E·MSE(E/N_atoms) + w_F·MSE(F)`` (+ ``w_S·MSE(σ)``
for runs on stresses), each frame's terms times its weights as mace-torch reads them
(:func:`frame_weights`) (:func:`loss`), energy, force and stress MAE / RMSE over every frame,
unweighted as mace-torch's (:func:`errors`, :func:`split_errors`) and their table (:func:`format_table`)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .data import make_batches
from .device import module_device

__all__ = ["loss", "errors", "split_errors", "format_table", "frame_weights"]

SPLITS = ("train", "valid", "test")


def frame_weights(batch: dict, dtype) -> tuple:
    """Per-frame loss weights as mace-torch reads them from a frame's info (``config_weight`` times
    ``config_energy_weight`` / ``config_forces_weight`` / ``config_stress_weight``; 1 where not given):
    (energy ``[B]``, forces per atom ``[N, 1]``, stress ``[B]``)."""
    ones = torch.ones(batch["ptr"].numel() - 1, dtype=dtype, device=batch["ptr"].device)
    w = batch.get("weight", ones).to(dtype)
    per_atom = (w * batch.get("forces_weight", ones).to(dtype))[batch["batch"]].unsqueeze(-1)
    return w * batch.get("energy_weight", ones).to(dtype), per_atom, w * batch.get("stress_weight", ones).to(dtype)


def _loss_terms(model, batch, training: bool, stress: bool = False):
    """(energies, forces, atoms per frame, stresses ``[B, 3, 3]`` or None)."""
    inputs = {k: v for k, v in batch.items() if k not in ("_global", "_dummy")}
    out = model(inputs, training=training, compute_force=True, **({"compute_stress": True} if stress else {}))
    n_atoms = (batch["ptr"][1:] - batch["ptr"][:-1]).to(out["energy"].dtype)
    return out["energy"], out["forces"], n_atoms, (out["stress"] if stress else None)


def loss(model, batch: dict, w_energy: float = 1.0, w_forces: float = 1000.0, global_frames: Optional[int] = None,
         global_atoms: Optional[int] = None, world: int = 1, w_stress: float = 0.0) -> torch.Tensor:
    """``w_E·MSE(E/N_atoms) + w_F·MSE(F) + w_S·MSE(σ)`` on one batch, differentiable (forces and
    stresses with create_graph); the stress term (mean over the 9 components of every frame, eV/Å³)
    only for ``w_stress > 0``.

    Data-parallel: ``batch`` is this process's share of a global batch of ``global_frames`` frames
    and ``global_atoms`` atoms; the sums are divided by the global counts and multiplied by
    ``world`` so that DDP's gradient average equals the single-process gradient of the global batch.
    A ``_dummy`` batch (no frame of a short last batch for this process) contributes zero."""
    e, f, n, s = _loss_terms(model, batch, training=True, stress=w_stress > 0)
    nf = e.shape[0] if global_frames is None else global_frames
    na = f.shape[0] if global_atoms is None else global_atoms
    we, wf, ws = frame_weights(batch, e.dtype)
    value = (w_energy * (we * ((e - batch["energy"]) / n) ** 2).sum() / nf
             + w_forces * (wf * (f - batch["forces"]) ** 2).sum() / (3 * na))
    if s is not None:
        value = value + w_stress * (ws.reshape(-1, 1, 1) * (s - batch["stress"].to(s.dtype)) ** 2).sum() / (9 * nf)
    if batch.get("_dummy"):  # a process without a frame of a short last batch: in the average, with 0
        value = value * 0.0
    return world * value


def errors(model, batches, w_energy: float = 1.0, w_forces: float = 1000.0, w_stress: float = 0.0,
           stress: Optional[bool] = None) -> Dict[str, float]:
    """Energy (total, meV) and force (meV/Å) MAE and RMSE, and the loss, over ``batches``; with
    ``stress`` (default: ``w_stress > 0``; the batches then hold stress labels) the stress MAE and
    RMSE too (meV/Å³, per component), and ``w_stress`` times its MSE in the loss."""
    de, df, dea, ds, we, wf, ws = [], [], [], [], [], [], []
    for b in batches:
        e, f, n, s = _loss_terms(model, b, training=False, stress=w_stress > 0 if stress is None else stress)
        de.append((e.detach() - b["energy"]).double())
        dea.append(de[-1] / n.double())
        df.append((f.detach() - b["forces"]).double().reshape(-1))
        w = frame_weights(b, torch.float64)
        we.append(w[0])
        wf.append(w[1].expand(-1, 3).reshape(-1))
        if s is not None:
            ds.append((s.detach().double() - b["stress"].double()).reshape(-1))
            ws.append(w[2].repeat_interleave(9))
    de, df, dea, we, wf = torch.cat(de), torch.cat(df), torch.cat(dea), torch.cat(we), torch.cat(wf)
    out = {"energy_mae_meV": 1000 * float(de.abs().mean()), "energy_rmse_meV": 1000 * float(de.pow(2).mean().sqrt()),
           "forces_mae_meV_per_A": 1000 * float(df.abs().mean()),
           "forces_rmse_meV_per_A": 1000 * float(df.pow(2).mean().sqrt()),
           "loss": w_energy * float((we * dea.pow(2)).mean()) + w_forces * float((wf * df.pow(2)).mean())}
    if ds:
        ds, ws = torch.cat(ds), torch.cat(ws)
        out.update(stress_mae_meV_per_A3=1000 * float(ds.abs().mean()),
                   stress_rmse_meV_per_A3=1000 * float(ds.pow(2).mean().sqrt()))
        out["loss"] += w_stress * float((ws * ds.pow(2)).mean())
    return out


def split_errors(model, graphs: dict, batch_size: int, w_energy: float = 1.0, w_forces: float = 1000.0,
                 w_stress: float = 0.0) -> dict:
    """``{split: errors + frames}`` for every non-empty split of ``graphs`` (train, valid, test), on
    the model's device."""
    dev = module_device(model)
    return {split: dict(errors(model, make_batches(graphs[split], batch_size, device=dev), w_energy, w_forces,
                               w_stress), frames=len(graphs[split]))
            for split in SPLITS if graphs[split]}


def _row(label: str, m: dict, stress: bool) -> str:
    row = (f"| {label} | {m['frames']} | {m['energy_mae_meV']:.2f} | {m['energy_rmse_meV']:.2f} | "
           f"{m['forces_mae_meV_per_A']:.2f} | {m['forces_rmse_meV_per_A']:.2f} |")
    return row + (f" {m['stress_mae_meV_per_A3']:.3f} | {m['stress_rmse_meV_per_A3']:.3f} |" if stress else "")


def format_table(metrics: dict) -> str:
    """A markdown table of a run's errors per split (and, after ``refit_e0s_after``, the errors
    with the E0s before the re-fit), under a line on the method, size and training time; stress
    columns for a run on stresses."""
    stress = any("stress_mae_meV_per_A3" in (metrics.get(split) or {}) for split in SPLITS)
    rows = [_row(split, metrics[split], stress) for split in SPLITS if metrics.get(split)]
    head = (f"method {metrics['method']}, {metrics['trainable_parameters']:,} trainable parameters, "
            f"{metrics['epochs_run']} epochs (best {metrics['best_epoch']}), {metrics['train_seconds']:.1f} s training\n"
            "| split | frames | E MAE meV | E RMSE meV | F MAE meV/Å | F RMSE meV/Å |"
            + (" σ MAE meV/Å³ | σ RMSE meV/Å³ |" if stress else "")
            + "\n|---|---|---|---|---|---|" + ("---|---|" if stress else ""))
    before = metrics.get("before_e0_refit")
    if before:
        rows += [_row(f"{split}, E0s before re-fit", before[split], stress) for split in SPLITS if before.get(split)]
    return head + "\n" + "\n".join(rows)


def label_scale_note(model, graphs, frames: int = 8, stress: bool = False) -> str:
    """A ``note:`` line when the label forces of (up to ``frames``) training graphs are more than 5×
    larger or smaller than the base ``model``'s forces on them, as labels in other units look
    (kcal/mol/Å is 23× eV/Å, Hartree/Bohr 1/51); with ``stress``, one more when the label stresses are
    more than 20× off the model's (kbar is 1602× eV/Å³, GPa 160×; either side counted as at least an RMS
    of 1e-3 eV/Å³) or, both above that, point against them (VASP's and LAMMPS' pressure sign); ''
    otherwise (nothing is changed either way)."""
    if not graphs:
        return ""
    (batch,) = make_batches(list(graphs[:frames]), frames, device=module_device(model))
    e, f, _, s = _loss_terms(model, batch, training=False, stress=stress)
    n, notes = min(frames, len(graphs)), []
    a, b = batch["forces"].detach().double().reshape(-1), f.detach().double().reshape(-1)
    label, base = float(a.norm()) / a.numel() ** 0.5, float(b.norm()) / b.numel() ** 0.5
    if base > 0 and not 0.2 <= label / base <= 5:
        notes.append(f"note: the training labels' forces (RMS {label:.3g} eV/Å over {n} frames) are {label / base:.3g}x "
                     f"the base model's on the same frames (RMS {base:.3g} eV/Å): labels in other units look like this "
                     "(kcal/mol/Å: 23x, Hartree/Bohr: 1/51); energies and forces must be eV and eV/Å")
    cos = float(a @ b) / (label * base * a.numel()) if label > 0 and base > 0 else 0.0
    if cos < -0.5:
        notes.append(f"note: the training labels' forces point against the base model's on the same frames (cosine "
                     f"{cos:.2f} over {n} frames): energy gradients (dE/dx) stored as forces look like this; forces "
                     "must be -dE/dx")
    notes.append(_energy_spread_note(batch, e))
    if s is not None:
        a, b = batch["stress"].detach().double().reshape(-1), s.detach().double().reshape(-1)
        label, base = float(a.norm()), float(b.norm())
        cos = float(a @ b) / (label * base) if label > 0 and base > 0 else 0.0
        floor = 1e-3 * a.numel() ** 0.5  # RMS 1e-3 eV/Å³ (1.6 kbar): below it, near zero pressure says nothing
        if label > 20 * max(base, floor) or base > 20 * max(label, floor) or (min(label, base) > floor and cos < -0.5):
            notes.append(f"note: the training labels' stresses (RMS {label / a.numel() ** 0.5:.3g} eV/Å³ over {n} frames) "
                         f"are {label / base:.3g}x the base model's, with cosine {cos:.2f} to them: stresses must be "
                         "eV/Å³ with ASE's sign (positive under tension; 1 eV/Å³ = 1602 kbar = 160 GPa; VASP's and "
                         "LAMMPS' pressure tensors have the opposite sign)")
    return "\n".join(n for n in notes if n)


def _energy_spread_note(batch: dict, e: torch.Tensor) -> str:
    """A ``note:`` line when, over the frames of the most common composition in ``batch`` (at least
    3), the label energies spread more than 5x more or less than the base model's energies ``e``
    (Hartree is 1/27.2 eV, kcal/mol 23x): an offset per element, which the E0 fit absorbs, cannot
    hide that; '' otherwise, or when both spreads are below 5 meV."""
    counts = torch.zeros(e.shape[0], batch["node_attrs"].shape[1], dtype=torch.float64, device=e.device)
    counts.index_add_(0, batch["batch"], batch["node_attrs"].detach().double())
    _, which = torch.unique(counts, dim=0, return_inverse=True)
    top = int(torch.bincount(which).argmax())
    rows = which == top
    if int(rows.sum()) < 3:
        return ""
    label, base = (float(t.detach().double()[rows].std()) for t in (batch["energy"], e))
    if max(label, base) < 5e-3 or (label > 0 and base > 0 and 0.2 <= label / base <= 5):
        return ""
    ratio = f"{label / base:.3g}x" if base > 0 else "not comparable to"
    return (f"note: the training labels' energies spread {ratio} the base model's over {int(rows.sum())} frames of one "
            f"composition (standard deviation {label:.3g} eV against {base:.3g} eV): energies in other units look like "
            "this (Hartree: 1/27.2, kcal/mol: 23x); energies must be eV")
