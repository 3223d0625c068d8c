"""The README's main job on its embedded default: the project's own pretrained MACE
(``builtin:mace-xtb-small``, GFN2-xTB level, never saw ethanol) is adapted to ethanol at the DFT
level (PBE/def2-SVP labels shipped in ``mmea_kernels/assets/ethanol_pbe``) with MMEA, ELoRA and
full fine-tuning; prints the comparison and runs a short NVE MD with the MMEA model."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Sequence

from ..train.foundation import ASSETS, DEFAULT_MODEL

DATA = ASSETS / "ethanol_pbe"


def baseline(model_spec: str, train: str, test: str, dtype: str = "float64", device: str = "cpu") -> dict:
    """Errors of the base model with only its E0s re-fitted on ``train`` (no training), on ``device``;
    labels read and checked as ``evaluate`` reads them (``train.checks``: ``info``/``arrays`` or
    ``atoms.calc.results``)."""
    from ..train import errors, make_batches, read_frames, refit_e0s, set_e0s
    from ..train.checks import checked_graphs
    from ..train.device import resolve_device
    from ..train.foundation import load_model, model_info
    import torch

    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    dev = resolve_device(device)
    model = load_model(model_spec, dtype=dt).to(dev)
    z, r_max = model_info(model)
    tr = read_frames(train, "REF_energy", "REF_forces")
    set_e0s(model, refit_e0s(model, tr, z, "lstsq", "REF_energy"))
    te = read_frames(test, "REF_energy", "REF_forces")
    graphs = checked_graphs(te, z, r_max, str(test), "REF_energy", "REF_forces", dtype=dt)
    return dict(errors(model, make_batches(graphs, 50, device=dev)), frames=len(te))


def run(epochs: int = 60, methods: Sequence[str] = ("mmea", "elora", "full"), out: str = "runs/demo", seed: int = 0,
        md_steps: int = 400, data_dir=DATA, model: str = DEFAULT_MODEL, dtype: str = "float64",
        device: str = "auto") -> dict:
    from .calculator import MMEACalculator, nve_drift
    from ..train import FinetuneConfig, finetune, read_frames

    t_start = time.perf_counter()
    data_dir = pathlib.Path(data_dir)
    train, valid, test = (str(data_dir / f"{s}.xyz") for s in ("train", "valid", "test"))
    from ..train.device import resolve_device

    print(f"base model {model} on {resolve_device(device)}; data {data_dir} (PBE/def2-SVP ethanol, pyscf; "
          f"{len(read_frames(train, 'REF_energy', 'REF_forces'))} train / {len(read_frames(valid, 'REF_energy', 'REF_forces'))} valid / "
          f"{len(read_frames(test, 'REF_energy', 'REF_forces'))} test frames)")
    rows = {"base, E0s re-fitted only": dict(baseline(model, train, test, dtype, device), trainable_parameters=0,
                                             train_seconds=0.0)}
    outs = pathlib.Path(out)
    for method in methods:
        print(f"\n== {method} ==", flush=True)
        run_dir = outs / method
        cfg = FinetuneConfig(train=train, valid=valid, test=test, out_dir=str(run_dir), model=model, method=method,
                             epochs=epochs, seed=seed, dtype=dtype, resume=True, lr=1e-2 if method != "full" else 5e-3,
                             device=device)
        m = finetune(cfg)
        rows[method] = dict(m["test"], trainable_parameters=m["trainable_parameters"], train_seconds=m["train_seconds"])
    print(f"\nadapting {model} (GFN2-xTB) to PBE/def2-SVP ethanol, {epochs} epochs, {dtype}, seed {seed}; "
          f"test set {rows['base, E0s re-fitted only']['frames']} frames:")
    print(f"| model | trainable | E MAE meV | F MAE meV/Å | F RMSE meV/Å | train s |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['trainable_parameters']:,} | {r['energy_mae_meV']:.2f} | {r['forces_mae_meV_per_A']:.2f} | "
              f"{r['forces_rmse_meV_per_A']:.2f} | {r['train_seconds']:.0f} |")
    result = {"rows": rows}
    if "mmea" in methods and md_steps > 0:
        atoms = read_frames(test, "REF_energy", "REF_forces")[0]
        md = nve_drift(atoms, MMEACalculator(checkpoint=str(outs / "mmea" / "checkpoint.pt"), device=device),
                       steps=md_steps)
        print(f"\nNVE MD with the MMEA model (ASE velocity Verlet, {md['steps']} x {md['dt_fs']} fs, ~300 K start): "
              f"energy drift {md['drift_meV_per_atom_per_ps']:.3f} meV/atom/ps, max |E - E0| "
              f"{md['max_deviation_meV_per_atom']:.3f} meV/atom, mean T {md['mean_temperature_K']:.0f} K")
        result["md"] = md
    (outs / "demo.json").write_text(json.dumps(result, indent=1))
    print(f"total wall time {time.perf_counter() - t_start:.0f} s; outputs in {outs}/")
    return result
