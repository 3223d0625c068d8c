"""Why does plain MMEA trail ELoRA on forces? A small ablation on the adaptation benchmark's
protocol (``bench/adapt.py``: 50 train / 50 validation frames of rMD17, EMA, plateau schedule, E0
re-fit after training), one setting changed at a time from the MMEA default.

Settings are CHOSEN ON VALIDATION ERROR ONLY: the best validation force MAE over training (what
early stopping keeps) decides; test errors are reported beside it, never used to choose.

    python bench/ablation.py --workers 2                   # the grid below, ethanol + toluene, seed 0
    python bench/ablation.py --mode fast                   # CI-sized: 2 settings, 1 epoch, 20 test frames

Each run is cached (``<work>/<molecule>/<setting>/s<seed>/metrics.json``) and resumes when
interrupted. Results: ``<results>/ablation-<mode>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from adapt import run_jobs  # noqa: E402  (the same process pool as the adaptation benchmark)

# name -> (method, overrides of the default run); the default: lr 1e-2, 60 epochs, rank 16, phi exp, init identity
SETTINGS = {
    "mmea": ("mmea", {}),
    "elora": ("elora", {}),
    "mmea lr 5e-3": ("mmea", {"lr": 5e-3}),
    "mmea lr 2e-2": ("mmea", {"lr": 2e-2}),
    "mmea 200 epochs": ("mmea", {"epochs": 200}),
    "elora 200 epochs": ("elora", {"epochs": 200}),
    "mmea rank 32": ("mmea", {"rank": 32}),
    "mmea rank 64": ("mmea", {"rank": 64}),
    "mmea phi residual": ("mmea", {"adapter_options": {"phi": "residual"}}),
    "mmea init paper": ("mmea", {"adapter_options": {"init": "paper"}}),
    "mmea-tp (gates on tensor-product outputs)": ("mmea-tp", {}),
}
MODES = {
    "full": dict(molecules=("ethanol", "toluene"), settings=tuple(SETTINGS), epochs=60, seeds=(0,), test=":"),
    "fast": dict(molecules=("ethanol",), settings=("mmea", "mmea phi residual"), epochs=1, seeds=(0,), test=":20"),
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _one(job):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from mmea_kernels.train import FinetuneConfig, finetune

    mol, name, seed, a = job
    out = pathlib.Path(a["work"]) / mol / _slug(name) / f"s{seed}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    method, over = SETTINGS[name]
    d = pathlib.Path(a["data_dir"]) / mol
    kw = dict(train=f"{d}/train.xyz@:50", valid=f"{d}/train.xyz@50:100", test=f"{d}/test.xyz@{a['test']}",
              out_dir=str(out), model=a["model"], method=method, epochs=a["epochs"], seed=seed, dtype="float32",
              lr=1e-2, ema_decay=0.95, progress=False, resume=True, rank=16, eval_batch_size=100,
              refit_e0s_after=True)
    kw.update(over)
    if a["epochs"] < 60:  # a shortened mode shortens every setting alike
        kw["epochs"] = min(kw["epochs"], a["epochs"])
    kw["patience"] = kw["epochs"]
    t0 = time.perf_counter()
    finetune(FinetuneConfig(**kw), log=lambda *_: None)
    m = json.loads((out / "metrics.json").read_text())
    best = min(h["valid"]["forces_mae_meV_per_A"] for h in m["history"])
    print(f"{mol:>10} {name:>42} s{seed}: best valid F {best:7.2f}  test F {m['test']['forces_mae_meV_per_A']:7.2f} "
          f"meV/Å ({time.perf_counter() - t0:.0f} s)", flush=True)
    return m


def rows_of(runs: dict, a: dict) -> list:
    import numpy as np

    rows = []
    for mol in a["molecules"]:
        for name in a["settings"]:
            ms = [runs[(mol, name, s)] for s in a["seeds"] if (mol, name, s) in runs]
            if not ms:
                continue
            valid = [min(h["valid"]["forces_mae_meV_per_A"] for h in m["history"]) for m in ms]
            rows.append({"molecule": mol, "setting": name, "method": SETTINGS[name][0], "seeds": len(ms),
                         "trainable": ms[0]["trainable_parameters"],
                         "valid_F_best": float(np.mean(valid)),
                         "test_F": float(np.mean([m["test"]["forces_mae_meV_per_A"] for m in ms])),
                         "test_E": float(np.mean([m["test"]["energy_mae_meV"] for m in ms])),
                         "train_seconds": float(np.mean([m["train_seconds"] for m in ms])),
                         "epochs_run": [m["epochs_run"] for m in ms]})
    return rows


def choose(rows: list) -> dict:
    """Per molecule, the MMEA-family setting with the lowest best validation force MAE, and the
    setting whose mean rank over the molecules is best (validation only)."""
    mols = sorted({r["molecule"] for r in rows})
    mmea = [r for r in rows if r["method"].startswith("mmea")]
    per_mol = {m: min((r for r in mmea if r["molecule"] == m), key=lambda r: r["valid_F_best"])["setting"]
               for m in mols}
    ranks = {}
    for m in mols:
        ordered = sorted((r for r in mmea if r["molecule"] == m), key=lambda r: r["valid_F_best"])
        for k, r in enumerate(ordered):
            ranks.setdefault(r["setting"], []).append(k + 1)
    complete = {s: sum(v) / len(v) for s, v in ranks.items() if len(v) == len(mols)}
    overall = min(complete, key=complete.get) if complete else None
    return {"best_per_molecule": per_mol, "mean_rank": complete, "best_overall": overall}


def markdown(rows: list, chosen: dict, a: dict) -> str:
    lines = [f"Base `{a['model']}`, 50 train / 50 valid frames, test {a['test_desc']}, float32, seeds "
             f"{list(a['seeds'])}, E0s re-fitted after training; machine: {a['machine']}. One setting changed at a "
             "time from MMEA's default (lr 1e-2, 60 epochs, rank 16, phi exp, init identity, gates on the linears). "
             "**Chosen on `valid F best` only** (the best validation force MAE during training); test columns are "
             "reported, never used to choose.", "",
             "| molecule | setting | trainable | valid F best meV/Å | test F meV/Å | test E meV | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['molecule']} | {r['setting']} | {r['trainable']:,} | {r['valid_F_best']:.2f} | "
                     f"{r['test_F']:.2f} | {r['test_E']:.2f} | {r['train_seconds']:.0f} |")
    lines += ["", f"Best MMEA setting per molecule (validation): {chosen['best_per_molecule']}; best mean rank: "
              f"{chosen['best_overall']} ({chosen['mean_rank']})."]
    if a.get("missing_runs"):
        lines += ["", f"**Unfinished:** {a['missing_runs']} of {len(a['molecules']) * len(a['seeds']) * len(a['settings'])} "
                      "runs are missing (a partial table; nothing is chosen from it)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(MODES), default="full")
    p.add_argument("--data-dir", default=None, help="rMD17 splits (default: $MMEA_RMD17_DIR or ../shared/data/rmd17)")
    p.add_argument("--molecules", default=None)
    p.add_argument("--settings", default=None, help=f"'|'-separated, some of: {' | '.join(SETTINGS)}")
    p.add_argument("--seeds", default=None)
    p.add_argument("--model", default="builtin:mace-xtb-small")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", default=None, help="run directories (default /tmp/mmea_ablation_<mode>)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--summarize-only", action="store_true",
                   help="no training: tabulate the runs already finished in --work (missing runs are left out)")
    args = p.parse_args(argv)
    from mmea_kernels.app.data import find_rmd17

    mode = MODES[args.mode]
    molecules = tuple(args.molecules.split(",")) if args.molecules else mode["molecules"]
    settings = tuple(args.settings.split("|")) if args.settings else mode["settings"]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; expected some of {list(SETTINGS)}")
    try:
        data_dir = find_rmd17(args.data_dir, molecules)
    except FileNotFoundError as exc:
        raise SystemExit(f"--data-dir: {exc}") from None
    if data_dir is None:
        raise SystemExit("rMD17 splits not found: pass --data-dir or set MMEA_RMD17_DIR")
    a = {"mode": args.mode, "data_dir": str(data_dir), "model": args.model, "molecules": molecules,
         "settings": settings, "epochs": mode["epochs"], "test": mode["test"],
         "seeds": tuple(int(s) for s in args.seeds.split(",")) if args.seeds else mode["seeds"],
         "work": args.work or f"/tmp/mmea_ablation_{args.mode}",
         "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} worker(s) x 1 thread"}
    a["test_desc"] = "test.xyz (all 1000 frames)" if a["test"] == ":" else f"test.xyz[{a['test']}]"
    jobs = [(mol, name, s, a) for mol in molecules for s in a["seeds"] for name in settings]
    t0 = time.perf_counter()
    if args.summarize_only:
        done = [pathlib.Path(a["work"]) / j[0] / _slug(j[1]) / f"s{j[2]}" / "metrics.json" for j in jobs]
        results = [json.loads(f.read_text()) if f.is_file() else None for f in done]
        a["missing_runs"] = sum(r is None for r in results)
    else:
        results = run_jobs(_one, jobs, args.workers)
    rows = rows_of({(j[0], j[1], j[2]): r for j, r in zip(jobs, results) if r is not None}, a)
    chosen = choose(rows)
    res = pathlib.Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    stem = res / f"ablation-{args.mode}"
    meta = {k: v for k, v in a.items() if k != "work"}
    meta.update(date=time.strftime("%Y-%m-%dT%H:%M"), wall_seconds=time.perf_counter() - t0)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "chosen": chosen}, indent=1))
    md = markdown(rows, chosen, a)
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
