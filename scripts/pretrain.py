"""Pretrain the project's own MACE (``builtin:mace-xtb-small``) on GFN2-xTB data and write it with its
recipe and training log (default ``/tmp/mmea_pretrain/mace-xtb-small.pt``).

    OMP_NUM_THREADS=1 python scripts/data/xtb_md.py --out /tmp/mmea_xtb/pretrain.xyz   # ~5 min
    OMP_NUM_THREADS=1 python scripts/pretrain.py --data /tmp/mmea_xtb/pretrain.xyz      # see --epochs

Replacing the shipped model (``--out mmea_kernels/assets/mace-xtb-small.pt --overwrite``) makes every
checkpoint fine-tuned from ``builtin:mace-xtb-small`` refer to weights that are gone: they are then
refused (their base-model fingerprint no longer matches), so an existing file is never replaced
without ``--overwrite``.

Architecture: the ``xtb-small`` preset (models/mace.py) with ``avg_num_neighbors`` measured on the
data and the ScaleShift block set to the data's RMS force (scale) and mean per-atom interaction
energy (shift) after a least-squares fit of per-element reference energies (E0s). Training: the
package's own fine-tuning loop (method ``full`` from random weights), float32, 10 % of the frames
held out for validation (early stopping, EMA, ReduceLROnPlateau).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmea_kernels.train import FinetuneConfig, finetune, load_finetuned, read_frames  # noqa: E402
from mmea_kernels.train.checks import checked_graphs, read_label  # noqa: E402
from mmea_kernels.train.foundation import save_model  # noqa: E402
from mmea_kernels.integrations.mace import PRESETS, build_mace  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/mmea_xtb/pretrain.xyz")
    p.add_argument("--out", default="/tmp/mmea_pretrain/mace-xtb-small.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .log)")
    p.add_argument("--work", default="/tmp/mmea_pretrain")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--w-forces", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--energy-key", default="REF_energy",
                   help="info key of the energies (as finetune's; also read from ASE's calculator results, "
                        "where ase.io.read puts extended-XYZ energy=)")
    p.add_argument("--forces-key", default="REF_forces", help="arrays key of the forces (as --energy-key)")
    args = p.parse_args(argv)
    if pathlib.Path(args.out).exists() and not args.overwrite:
        p.error(f"--out {args.out} exists; pass --overwrite to replace it (for the shipped model: every checkpoint "
                "fine-tuned from builtin:mace-xtb-small is then refused, its base fingerprint gone)")
    torch.manual_seed(args.seed)
    ek, fk = args.energy_key, args.forces_key
    # the labels as finetune reads them: checked (named in the error), from info/arrays or calc.results
    try:
        frames = read_frames(args.data, ek, fk)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        p.error(f"--data {args.data}: {exc.args[0] if isinstance(exc, KeyError) else exc}")
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = PRESETS["xtb-small"]
    z = list(cfg.atomic_numbers)
    counts = np.array([[int((a.numbers == zz).sum()) for zz in z] for a in frames], dtype=float)
    energies = np.array([read_label(a, "energy", ek)[0] for a in frames], dtype=float)
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    inter = (energies - counts @ e0) / counts.sum(1)
    forces = np.concatenate([np.asarray(read_label(a, "forces", fk)[0], dtype=float).reshape(-1) for a in frames])
    graphs = checked_graphs(frames[::10], z, cfg.r_max, args.data, ek, fk)
    avg_nb = float(np.mean([g.edge_index.shape[1] / g.num_nodes for g in graphs]))
    cfg = dataclasses.replace(cfg, avg_num_neighbors=avg_nb, atomic_energies=[float(v) for v in e0],
                              scale=float(np.sqrt(np.mean(forces ** 2))), shift=float(inter.mean()))
    init = work / "init.pt"
    save_model(build_mace(cfg), cfg, init)
    e0_json = work / "e0s.json"
    e0_json.write_text(json.dumps({str(zz): float(v) for zz, v in zip(z, e0)}))
    ft = FinetuneConfig(train=args.data, out_dir=str(work / "run"), model=str(init), method="full", dtype="float32",
                        e0s=str(e0_json), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        w_forces=args.w_forces, patience=10, plateau_patience=3, valid_fraction=0.1,
                        seed=args.seed, resume=args.resume, eval_batch_size=100, energy_key=ek, forces_key=fk)
    t0 = time.perf_counter()
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(str(msg))

    metrics = finetune(ft, log=log)
    model, _ = load_finetuned(work / "run" / "checkpoint.pt")
    recipe = {"data": "GFN2-xTB (tblite) Langevin MD at 500 K of 32 small H/C/N/O molecules, no rMD17 molecule "
                      "(scripts/data/xtb_md.py defaults, 80 frames each, 2560 frames)",
              "config": cfg.to_dict(), "training": {k: v for k, v in dataclasses.asdict(ft).items()
                                                    if k not in ("out_dir", "model", "progress")},
              "valid": metrics["valid"], "train": metrics["train"], "epochs_run": metrics["epochs_run"],
              "wall_seconds": time.perf_counter() - t0, "trainable_parameters": metrics["trainable_parameters"]}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, cfg, out, recipe=recipe)
    hist = ["epoch train_loss valid_loss valid_E_MAE_meV valid_F_MAE_meV/A lr seconds"]
    hist += [f"{h['epoch']} {h['train_loss']:.5f} {h['valid']['loss']:.5f} {h['valid']['energy_mae_meV']:.2f} "
             f"{h['valid']['forces_mae_meV_per_A']:.2f} {h['lr']:.2e} {h['seconds']:.0f}" for h in metrics["history"]]
    out.with_suffix(".log").write_text("\n".join(log_lines + ["", *hist, "", "recipe:", json.dumps(recipe, indent=1)]) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.log')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
