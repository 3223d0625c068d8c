"""A small energy + force training loop for MACE-style models (used by the demo and tests;
the full fine-tuning workflow builds on it)."""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from .models.mace import energy_and_forces

__all__ = ["fit_e0s", "TrainResult", "train", "evaluate"]


def fit_e0s(atoms_list: Sequence, atomic_numbers: Sequence[int], energy_key: str = "REF_energy") -> List[float]:
    """Per-element reference energies by least squares: E ≈ Σ_Z count_Z · E0_Z."""
    z = list(atomic_numbers)
    counts = np.array([[int((a.numbers == zz).sum()) for zz in z] for a in atoms_list], dtype=float)
    try:
        energies = np.array([a.info[energy_key] for a in atoms_list], dtype=float)
    except KeyError:
        raise KeyError(f"a frame has no energy under atoms.info[{energy_key!r}]") from None
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return [float(v) for v in e0]


@dataclasses.dataclass
class TrainResult:
    losses: List[float]
    seconds: float


def _loss(model, batch, w_energy, w_forces):
    e, f = energy_and_forces(model, batch, training=True)
    n_atoms = (batch["ptr"][1:] - batch["ptr"][:-1]).to(e.dtype)
    le = (((e - batch["energy"]) / n_atoms) ** 2).mean()
    lf = ((f - batch["forces"]) ** 2).mean()
    return w_energy * le + w_forces * lf


def train(model, batches: Sequence[dict], params: Iterable[torch.nn.Parameter], steps: int, lr: float = 1e-2,
          w_energy: float = 1.0, w_forces: float = 100.0, log_every: int = 0) -> TrainResult:
    """Adam on ``params`` for ``steps`` steps, cycling over ``batches``; loss
    ``w_E·MSE(E/atom) + w_F·MSE(F)`` with forces differentiated twice."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters were given")
    opt = torch.optim.Adam(params, lr=lr, amsgrad=True)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch, w_energy, w_forces)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:4d}  loss {losses[-1]:.5f}", flush=True)
    model.eval()
    return TrainResult(losses, time.perf_counter() - t0)


def evaluate(model, batches: Sequence[dict]) -> Dict[str, float]:
    """Energy MAE (meV, total energy) and force MAE (meV/Å) over ``batches`` (labels in eV, eV/Å)."""
    e_err, f_err = [], []
    for batch in batches:
        e, f = energy_and_forces(model, batch, training=False)
        e_err.append((e.detach() - batch["energy"]).abs())
        f_err.append((f.detach() - batch["forces"]).abs().reshape(-1))
    return {"energy_mae_meV": 1000 * float(torch.cat(e_err).mean()),
            "forces_mae_meV_per_A": 1000 * float(torch.cat(f_err).mean())}
