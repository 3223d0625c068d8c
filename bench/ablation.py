"""Why does plain MMEA trail ELoRA on forces? A small ablation on the adaptation benchmark's
protocol (``bench/adapt.py``: 50 train / 50 validation frames of rMD17, EMA, plateau schedule, E0
re-fit after training), one setting changed at a time from the MMEA default.

Settings are CHOSEN ON VALIDATION ERROR ONLY: the best validation force MAE over training decides
(the kept checkpoint is the epoch of lowest validation loss, w_E·MSE(E/N) + w_F·MSE(F), which need
not be that epoch); test errors are reported beside it, never used to choose.

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

# name -> (method, overrides of the baseline run); the baseline (MMEA's defaults before this
# ablation): lr 1e-2, 60 epochs, rank 16, phi exp, init identity
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
    """One row per (molecule, setting): means over the seeds that ran, and each seed's best validation
    force MAE (``valid_by_seed``)."""
    import numpy as np

    rows = []
    seeds = sorted({k[2] for k in runs})
    for mol in a["molecules"]:
        for name in a["settings"]:
            ms = {s: runs[(mol, name, s)] for s in seeds if (mol, name, s) in runs}
            if not ms:
                continue
            valid = {s: min(h["valid"]["forces_mae_meV_per_A"] for h in m["history"]) for s, m in ms.items()}
            vals = list(ms.values())
            rows.append({"molecule": mol, "setting": name, "method": SETTINGS[name][0], "seeds": sorted(ms),
                         "trainable": vals[0]["trainable_parameters"], "valid_by_seed": valid,
                         "valid_F_best": float(np.mean(list(valid.values()))),
                         "test_F": float(np.mean([m["test"]["forces_mae_meV_per_A"] for m in vals])),
                         "test_E": float(np.mean([m["test"]["energy_mae_meV"] for m in vals])),
                         "train_seconds": float(np.mean([m["train_seconds"] for m in vals])),
                         "epochs_run": [m["epochs_run"] for m in vals]})
    return rows


def _vs_mmea(rows: list, setting: str, mols: list) -> dict:
    """Per molecule: the seeds both ``setting`` and plain ``mmea`` ran, and the validation differences."""
    out = {}
    for m in mols:
        cand = next((r for r in rows if r["molecule"] == m and r["setting"] == setting), None)
        base = next((r for r in rows if r["molecule"] == m and r["setting"] == "mmea"), None)
        common = sorted(set(cand["valid_by_seed"]) & set(base["valid_by_seed"])) if cand and base else []
        if common:
            d = [cand["valid_by_seed"][s] - base["valid_by_seed"][s] for s in common]
            out[m] = {"seeds": common, "deltas": d, "delta": sum(d) / len(d)}
    return out


def choose(rows: list, primary: int = 0, min_seeds: int = 2) -> dict:
    """Validation only. Per molecule, the MMEA-family setting with the lowest best validation force
    MAE of the primary seed, and the setting whose mean rank over the molecules is best. The default
    changes only for a setting that beats plain ``mmea`` on validation on EVERY molecule and EVERY
    seed both ran, with at least ``min_seeds`` seeds (the largest mean gain among such settings)."""
    mols = sorted({r["molecule"] for r in rows})
    # the epoch budget is the protocol's, not a method setting: every method gains from more epochs
    mmea = [r for r in rows if r["method"].startswith("mmea") and primary in r["valid_by_seed"]
            and "epochs" not in SETTINGS[r["setting"]][1]]
    key = lambda r: r["valid_by_seed"][primary]  # noqa: E731
    per_mol = {m: min((r for r in mmea if r["molecule"] == m), key=key)["setting"]
               for m in mols if any(r["molecule"] == m for r in mmea)}
    ranks = {}
    for m in mols:
        for k, r in enumerate(sorted((r for r in mmea if r["molecule"] == m), key=key)):
            ranks.setdefault(r["setting"], []).append(k + 1)
    complete = {s: sum(v) / len(v) for s, v in ranks.items() if len(v) == len(mols)}
    overall = min(complete, key=complete.get) if complete else None
    paired = {s: _vs_mmea(rows, s, mols) for s in complete if s != "mmea"}
    wins = {s: sum(v["delta"] for v in d.values()) / len(d) for s, d in paired.items()
            if len(d) == len(mols) and all(x < 0 for v in d.values() for x in v["deltas"])
            and all(len(v["seeds"]) >= min_seeds for v in d.values())}
    default = min(wins, key=wins.get) if wins else "mmea"
    return {"best_per_molecule": per_mol, "mean_rank": complete, "best_overall": overall,
            "vs_mmea": {s: d for s, d in paired.items() if d}, "consistent_winners": wins, "default": default}


def markdown(rows: list, chosen: dict, a: dict) -> str:
    lines = [f"Base `{a['model']}`, 50 train / 50 valid frames, test {a['test_desc']}, float32, seed "
             f"{a['seeds'][0]} for every setting (a second seed for the finalists: the `seeds` column), E0s re-fitted "
             f"after training; machine: {a['machine']}. One setting changed at a time from the ablation's baseline, MMEA's settings before it (lr 1e-2, "
             "60 epochs, rank 16, phi exp, init identity, gates on the linears). **Chosen on validation only** "
             "(`valid F best`: the best validation force MAE during training, mean over the seeds that ran; "
             "`per seed`: each seed's); test columns are reported, never used to choose.", "",
             "| molecule | setting | trainable | seeds | valid F best meV/Å | per seed | test F meV/Å | test E meV "
             "| train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " / ".join(f"{v:.2f}" for _, v in sorted(r["valid_by_seed"].items()))
        lines.append(f"| {r['molecule']} | {r['setting']} | {r['trainable']:,} | {','.join(map(str, r['seeds']))} | "
                     f"{r['valid_F_best']:.2f} | {per} | {r['test_F']:.2f} | {r['test_E']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    vs = "; ".join(f"{s}: " + ", ".join(f"{m} {' / '.join(f'{x:+.2f}' for x in v['deltas'])}" for m, v in d.items())
                   for s, d in chosen["vs_mmea"].items() if any(len(v["seeds"]) > 1 for v in d.values()))
    lines += ["", f"Best MMEA setting per molecule (validation, seed {a['seeds'][0]}): {chosen['best_per_molecule']}; "
              f"best mean rank: {chosen['best_overall']} "
              f"({ {k: round(v, 2) for k, v in chosen['mean_rank'].items()} })."]
    if vs:
        lines += ["", f"Validation F minus plain mmea's, per seed (settings run on more than one seed): {vs} meV/Å."]
    verdict = "provisional, candidate runs are missing" if a.get("missing_candidates") else "final"
    lines += ["", f"Default after this ablation ({verdict}): **{chosen['default']}** (a setting replaces plain mmea only if it is "
                  "better on validation on every molecule and every seed, with at least two seeds)."]
    budget = []
    for m in a["molecules"]:
        for method in ("mmea", "elora"):
            r60 = next((r for r in rows if r["molecule"] == m and r["setting"] == method), None)
            r200 = next((r for r in rows if r["molecule"] == m and r["setting"] == f"{method} 200 epochs"), None)
            common = sorted(set(r60["valid_by_seed"]) & set(r200["valid_by_seed"])) if r60 and r200 else []
            if common:  # like for like: the seeds both budgets ran
                v60 = sum(r60["valid_by_seed"][k] for k in common) / len(common)
                v200 = sum(r200["valid_by_seed"][k] for k in common) / len(common)
                budget.append(f"{m} {method} {v60:.2f} -> {v200:.2f}")
    if budget:
        lines += ["", "Epoch budget (validation F, 60 -> 200 epochs, on the seeds both ran; not a candidate default): "
                  + "; ".join(budget) + "."]
    if a.get("missing_runs"):
        lines += ["", f"**Unfinished:** {a['missing_runs']} of {len(a['molecules']) * len(a['settings'])} "
                      f"seed-{a['seeds'][0]} runs are missing ({a.get('missing_candidates', 0)} of them candidate settings, the "
                      "rest the epoch-budget runs, which are never candidates)."]
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
        # every seed found on disk for these settings (the finalists' extra seeds included)
        jobs = [(mol, name, int(d.name[1:]), a) for mol in molecules for name in settings
                for d in sorted((pathlib.Path(a["work"]) / mol / _slug(name)).glob("s[0-9]*"))
                if (d / "metrics.json").is_file()]
        results = [json.loads((pathlib.Path(a["work"]) / j[0] / _slug(j[1]) / f"s{j[2]}" / "metrics.json").read_text())
                   for j in jobs]
        missing = [name for mol in molecules for name in settings if (mol, name, a["seeds"][0]) not in {j[:3] for j in jobs}]
        a["missing_runs"] = len(missing)
        a["missing_candidates"] = sum("epochs" not in SETTINGS[name][1] for name in missing)
    else:
        results = run_jobs(_one, jobs, args.workers)
    rows = rows_of({(j[0], j[1], j[2]): r for j, r in zip(jobs, results) if r is not None}, a)
    chosen = choose(rows, a["seeds"][0])
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
