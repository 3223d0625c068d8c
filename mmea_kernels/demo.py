"""The README's main job on its embedded default: pretrain a small MACE on some molecules, then
adapt it to a new molecule with MMEA and with ELoRA, and print the comparison."""
from __future__ import annotations

import copy
import time

import torch

from . import inject_adapters
from .data import find_rmd17, read_xyz, toy_molecules
from .models.mace import atoms_to_batch, build_mace, energy_and_forces
from .train import evaluate, fit_e0s, train

Z = (1, 6, 8)


def _load(data_dir):
    """(pretraining frames, adaptation train frames, adaptation test frames, description)."""
    root = find_rmd17(data_dir)
    if root is not None:
        pre = []
        for mol in ("ethanol", "malonaldehyde", "benzene"):
            pre += read_xyz(root / mol / "train.xyz", ":40")
        return (pre, read_xyz(root / "toluene" / "train.xyz", ":50"), read_xyz(root / "toluene" / "test.xyz", ":200"),
                f"rMD17 from {root}: pretrain on ethanol+malonaldehyde+benzene (120 frames), "
                "adapt to toluene (50 frames), test on 200 toluene test frames")
    pre = toy_molecules("ethanol", 60, "A", seed=1) + toy_molecules("toluene", 60, "A", seed=2)
    return (pre, toy_molecules("toluene", 50, "B", seed=3), toy_molecules("toluene", 200, "B", seed=4),
            "no rMD17 found (set MMEA_RMD17_DIR): self-made Morse-potential data, pretrain at level A "
            "(ethanol+toluene), adapt to level B on toluene")


def _batches(frames, size, r_max):
    return [atoms_to_batch(frames[i:i + size], Z, r_max) for i in range(0, len(frames), size)]


def run(data_dir=None, pretrain_steps: int = 300, adapt_steps: int = 150, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    pre, ada, test, what = _load(data_dir)
    print(f"data: {what}")
    e0 = fit_e0s(pre, Z)
    base = build_mace("tiny", hidden_irreps="16x0e+16x1o", atomic_energies=e0)
    r_max = 5.0
    pre_b, ada_b, test_b = _batches(pre, 10, r_max), _batches(ada, 10, r_max), _batches(test, 50, r_max)
    # interleave molecules so each step sees a mix
    pre_b = _batches([pre[(k % 3) * 40 + k // 3] for k in range(len(pre))], 10, r_max) if len(pre) == 120 else pre_b
    print(f"pretraining the base MACE ({sum(p.numel() for p in base.parameters()):,} parameters, "
          f"{pretrain_steps} steps) ...", flush=True)
    res = train(base, pre_b, base.parameters(), pretrain_steps, lr=1e-2)
    print(f"  loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} in {res.seconds:.1f} s")

    rows = [("pretrained, not adapted", 0, evaluate(base, test_b), 0.0)]
    for method in ("mmea", "elora"):
        model = copy.deepcopy(base)
        report = inject_adapters(model, method=method, rank=16)
        if method == "mmea":
            print(report)
            e_b, f_b = energy_and_forces(base, test_b[0])
            e_a, f_a = energy_and_forces(model, test_b[0])
            print(f"identity at init: max |dE| = {(e_a - e_b).abs().max():.2e} eV, "
                  f"max |dF| = {(f_a - f_b).abs().max():.2e} eV/A")
        res = train(model, ada_b, model.parameters(), adapt_steps, lr=1e-2)
        rows.append((f"{method.upper()} rank 16", report.trainable_parameters, evaluate(model, test_b), res.seconds))

    print(f"\nadaptation to the new molecule ({adapt_steps} Adam steps, batch 10, float32, CPU):")
    print(f"{'model':<26}{'trainable':>10}{'E MAE meV':>12}{'F MAE meV/A':>13}{'train s':>9}")
    for name, n, m, sec in rows:
        print(f"{name:<26}{n:>10,}{m['energy_mae_meV']:>12.1f}{m['forces_mae_meV_per_A']:>13.1f}{sec:>9.1f}")
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    return {name: dict(m, trainable=n, seconds=sec) for name, n, m, sec in rows}
