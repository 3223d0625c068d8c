"""The same learning-rate search for every method, chosen on validation: the rMD17 few-shot protocol
of ``bench/adapt.py`` (``--mode full``: 50 train / 50 validation / all 1000 test frames, 60 epochs,
batch 5, EMA 0.95, float32, rank 16, E0s re-fitted after training) run for each method at every
learning rate of one grid; for each (molecule, method) the rate with the lowest best-validation
force MAE (mean over the seeds) is kept and its test errors are reported. ``bench/adapt.py``'s
table uses one rate per method, picked with unequal effort (full's on the ethanol pilot's *test*
MAE; MMEA's on validation in an ablation; the others untuned): this answers whether the ranking
survives equal tuning.

    python bench/adapt_lr.py --molecules ethanol,toluene --seeds 0,1 --workers 2

Runs: ``<work>/lr<rate>/<molecule>/<method>/s<seed>/metrics.json`` (a finished run is not repeated).
Results: ``<results>/adapt-lr-grid.{json,md}`` (every run's validation and test errors, and the choice).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import adapt  # noqa: E402  (bench/adapt.py: the protocol and one run)

GRID = (2e-3, 5e-3, 1e-2)
METHODS = ("full", "elora", "mmea", "mmea-paper")


def _job(job):
    """One run's metrics, or ``{"diverged": why}`` when its training stopped on a non-finite loss or
    gradient (a rate too high for the method: it loses the choice, the grid goes on)."""
    from mmea_kernels.train.guard import TrainingDiverged

    mol, method, seed, a, lr = job
    try:
        return adapt._one((mol, method, seed, dict(a, work=f"{a['work']}/lr{lr:g}", lr={method: lr})))
    except TrainingDiverged as exc:
        print(f"{mol:>14} {method:>10} seed {seed} lr {lr:g}: diverged ({str(exc)[:120]})", flush=True)
        return {"diverged": str(exc)}


def best_valid_f(m: dict) -> float:
    """The best validation force MAE of a run (the EMA weights kept are the best-validation ones);
    infinite for a run that diverged."""
    if "diverged" in m:
        return float("inf")
    return min(h["valid"]["forces_mae_meV_per_A"] for h in m["history"])


def choose(runs: dict, mols, methods, seeds, grid) -> list:
    """One row per (molecule, method): the grid (mean validation / test force MAE per rate) and the
    rate with the lowest mean best-validation force MAE, with its test errors (mean ± std)."""
    rows = []
    for mol in mols:
        for method in methods:
            cells = {}
            for lr in grid:
                ms = [runs[(mol, method, s, lr)] for s in seeds if (mol, method, s, lr) in runs]
                if len(ms) == len(seeds):
                    cells[lr] = ms
            if not cells:
                continue
            score = {lr: float(np.mean([best_valid_f(m) for m in ms])) for lr, ms in cells.items()}
            pick = min(score, key=score.get)
            if not np.isfinite(score[pick]):
                continue  # every rate diverged
            ms = cells[pick]
            stat = lambda k: (float(np.mean([m["test"][k] for m in ms])),  # noqa: E731
                              float(np.std([m["test"][k] for m in ms], ddof=1)) if len(ms) > 1 else 0.0)
            rows.append({"molecule": mol, "method": method, "lr": pick, "seeds": len(ms),
                         "edge_of_grid": pick in (min(grid), max(grid)),
                         "valid_F": score[pick], "test_E": stat("energy_mae_meV"), "test_F": stat("forces_mae_meV_per_A"),
                         "grid": {f"{lr:g}": ({"valid_F": score[lr],
                                               "test_F": float(np.mean([m["test"]["forces_mae_meV_per_A"] for m in c])),
                                               "test_E": float(np.mean([m["test"]["energy_mae_meV"] for m in c]))}
                                              if np.isfinite(score[lr]) else {"diverged": sum("diverged" in m for m in c)})
                                  for lr, c in cells.items()}})
    return rows


def markdown(rows, meta) -> str:
    grid = [f"{lr:g}" for lr in meta["grid"]]
    out = [f"Protocol: bench/adapt.py --mode full's (50 train / 50 valid / {meta['test_desc']}, {meta['epochs']} epochs, "
           f"batch 5, EMA {adapt.EMA_DECAY}, {meta['dtype']}, rank 16, E0s re-fitted after training), base "
           f"`{meta['model']}`, Adam lr grid {', '.join(grid)} for every method, seeds {list(meta['seeds'])}; the rate "
           f"is chosen per molecule and method on the mean best-validation force MAE; machine: {meta['machine']}; "
           f"{meta['date']}.", "",
           "| molecule | method | chosen lr | valid F | test E MAE meV | test F MAE meV/Å | "
           + " | ".join(f"valid / test F at {g}" for g in grid) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(grid)]
    for r in rows:
        cells = [("-" if g not in r["grid"] else f"diverged ({r['grid'][g]['diverged']} of {r['seeds']})"
                  if "diverged" in r["grid"][g] else f"{r['grid'][g]['valid_F']:.1f} / {r['grid'][g]['test_F']:.1f}")
                 for g in grid]
        edge = " (edge)" if r["edge_of_grid"] else ""
        out.append(f"| {r['molecule']} | {r['method']} | {r['lr']:g}{edge} | {r['valid_F']:.1f} | "
                   f"{r['test_E'][0]:.1f} ± {r['test_E'][1]:.1f} | {r['test_F'][0]:.1f} ± {r['test_F'][1]:.1f} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--molecules", default="ethanol,toluene")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lrs", default=",".join(f"{v:g}" for v in GRID))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=adapt.MODES["full"]["epochs"])
    p.add_argument("--test", default=adapt.MODES["full"]["test"], help="test.xyz slice (default: all frames)")
    p.add_argument("--model", default="builtin:mace-xtb-small")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", default="/tmp/mmea_adapt_lr")
    p.add_argument("--results", default=str(adapt.ROOT / "bench" / "results"))
    p.add_argument("--name", default="adapt-lr-grid", help="stem of the result files")
    args = p.parse_args(argv)
    from mmea_kernels.app.data import find_rmd17

    mols = tuple(args.molecules.split(","))
    methods = tuple(args.methods.split(","))
    unknown = [m for m in methods if m not in adapt.METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; expected some of {list(adapt.METHODS)}")
    grid = tuple(float(v) for v in args.lrs.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    data_dir = find_rmd17(args.data_dir, mols)
    if data_dir is None:
        raise SystemExit("rMD17 splits not found: pass --data-dir or set MMEA_RMD17_DIR")
    a = {"data_dir": str(data_dir), "model": args.model, "dtype": "float32", "epochs": args.epochs, "test": args.test,
         "n_train": 50, "n_valid": 50, "work": args.work, "refit_e0s": True}
    # rates interleaved (every method's first rate before any second one), so a cut run has all methods
    jobs = [(mol, method, s, a, lr) for mol in mols for s in seeds for lr in grid for method in methods]
    t0 = time.perf_counter()
    results = adapt.run_jobs(_job, jobs, args.workers)
    runs = {(j[0], j[1], j[2], j[4]): r for j, r in zip(jobs, results)}
    meta = {"model": args.model, "dtype": "float32", "epochs": args.epochs, "seeds": seeds, "grid": grid,
            "molecules": mols, "methods": methods, "date": time.strftime("%Y-%m-%dT%H:%M"),
            "test_desc": "test.xyz (all 1000 frames)" if args.test == ":" else f"test.xyz[{args.test}]",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} worker(s) x 1 thread",
            "wall_seconds": time.perf_counter() - t0}
    rows = choose(runs, mols, methods, seeds, grid)
    stem = pathlib.Path(args.results) / args.name
    stem.parent.mkdir(parents=True, exist_ok=True)
    every = [{"molecule": k[0], "method": k[1], "seed": k[2], "lr": k[3], "diverged": m["diverged"]} if "diverged" in m
             else {"molecule": k[0], "method": k[1], "seed": k[2], "lr": k[3], "best_valid_F": best_valid_f(m),
                   "test": m["test"], "epochs_run": m["epochs_run"]} for k, m in runs.items()]
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": every}, indent=1))
    md = markdown(rows, meta)
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
