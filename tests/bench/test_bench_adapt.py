"""The adaptation benchmark's fast mode (what CI can afford) runs end to end and its table agrees
with the per-run metrics it summarises."""
import json

import pytest

from helpers import run_rmd17_bench

pytest.importorskip("mace")


def test_adapt_fast_mode(rmd17, tmp_path):
    # two worker processes (`make bench-adapt` runs that way, docs/adaptation.md): the pool path is
    # exercised, and the run takes about half the time on CI's two cores; one epoch, not the mode's
    # two: the table's plumbing is under test here, not its numbers
    run_rmd17_bench("adapt.py", "fast", rmd17, tmp_path, extra=("--workers", "2", "--epochs", "1"))
    res = json.loads((tmp_path / "res" / "adapt-fast.json").read_text())
    assert (tmp_path / "res" / "adapt-fast.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "res" / "adapt-fast.md").read_text()
    rows = res["rows"]
    assert {r["method"] for r in rows} == {"scratch", "full", "readout", "elora", "mmea", "mmea-paper"}
    for r in rows:
        assert r["seeds"] == 2 and r["test_frames"] == 50
        runs = [json.loads((tmp_path / "work" / "ethanol" / r["method"] / f"s{s}" / "metrics.json").read_text())
                for s in (0, 1)]
        mean_f = sum(m["test"]["forces_mae_meV_per_A"] for m in runs) / 2
        assert r["forces_mae_meV_per_A"][0] == pytest.approx(mean_f, rel=1e-12)
        # every method re-fits its E0s after training; the table keeps the energies before it too
        assert r["e0_refit"] and all("before_e0_refit" in m for m in runs)
        raw = sum(m["before_e0_refit"]["test"]["energy_mae_meV"] for m in runs) / 2
        assert r["energy_mae_raw_meV"][0] == pytest.approx(raw, rel=1e-12)
        assert r["trainable"] == runs[0]["trainable_parameters"]
        per_epoch = sum(m["train_seconds"] / m["epochs_run"] for m in runs) / 2
        assert r["seconds_per_epoch"][0] == pytest.approx(per_epoch, rel=1e-12)
        assert f"| ethanol | {r['method']} | {r['trainable']:,} | 2 |" in md  # the seeds column
        # each run trained at the learning rate the table's header and JSON report for its method
        assert all(m["config"]["lr"] == res["meta"]["lr"][r["method"]] for m in runs)
        assert f"{r['method']} {res['meta']['lr'][r['method']]:g}" in md
    by = {r["method"]: r for r in rows}
    from mmea_kernels.train.config import DEFAULT_LR

    assert res["meta"]["lr"]["mmea"] == DEFAULT_LR["mmea"]  # the package default since the ablation
    assert by["readout"]["trainable"] < by["mmea"]["trainable"] < by["full"]["trainable"] == by["scratch"]["trainable"]


def test_adapt_lr_grid_chooses_on_validation(rmd17, tmp_path):
    """bench/adapt_lr.py on a CI-sized grid (ethanol, two methods, two rates, one seed, one epoch, 20
    test frames): each chosen rate is the one with the lowest best-validation force MAE among its
    runs, and the reported test errors are that run's."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = dict(os.environ, OMP_NUM_THREADS="1", MMEA_RMD17_DIR=str(rmd17))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "adapt_lr.py"), "--molecules", "ethanol", "--methods",
                           "mmea,full", "--lrs", "5e-3,2e-2", "--seeds", "0", "--epochs", "1", "--test", ":20",
                           "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res"), "--name", "grid"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "res" / "grid.json").read_text())
    md = (tmp_path / "res" / "grid.md").read_text()
    assert len(res["runs"]) == 4 and {r["method"] for r in res["rows"]} == {"mmea", "full"}
    for row in res["rows"]:
        runs = {}
        for lr in (5e-3, 2e-2):
            m = json.loads((tmp_path / "work" / f"lr{lr:g}" / "ethanol" / row["method"] / "s0" / "metrics.json")
                           .read_text())
            assert m["config"]["lr"] == lr and m["test"]["frames"] == 20
            runs[lr] = m
        valid = {lr: min(h["valid"]["forces_mae_meV_per_A"] for h in m["history"]) for lr, m in runs.items()}
        assert row["lr"] == min(valid, key=valid.get) and row["valid_F"] == valid[row["lr"]]
        assert row["test_F"][0] == runs[row["lr"]]["test"]["forces_mae_meV_per_A"]
        assert row["test_E"][0] == runs[row["lr"]]["test"]["energy_mae_meV"]
        assert row["edge_of_grid"]  # a two-rate grid has only edges
        assert f"| ethanol | {row['method']} | {row['lr']:g} (edge) |" in md


def test_adapt_lr_grid_a_diverged_rate_loses_the_choice():
    """A run whose training diverged (a rate too high for the method) is a result, not a crash: its
    rate is never chosen and the table says so (mmea-paper at 5e-2 stopped the whole grid once)."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("adapt_lr", REPO / "bench" / "adapt_lr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(valid_f, test_f):
        return {"history": [{"valid": {"forces_mae_meV_per_A": v}} for v in valid_f],
                "test": {"forces_mae_meV_per_A": test_f, "energy_mae_meV": 1.0}}

    runs = {("eth", "m", 0, 1e-2): run([9.0, 7.0], 6.5), ("eth", "m", 1, 1e-2): run([8.0, 9.0], 7.5),
            ("eth", "m", 0, 5e-2): {"diverged": "inf gradient"}, ("eth", "m", 1, 5e-2): run([1.0], 1.0)}
    (row,) = mod.choose(runs, ["eth"], ["m"], [0, 1], (1e-2, 5e-2))
    assert row["lr"] == 1e-2 and row["valid_F"] == 7.5 and row["test_F"][0] == 7.0
    assert row["grid"]["0.05"] == {"diverged": 1}
    md = mod.markdown([row], {"grid": (1e-2, 5e-2), "test_desc": "t", "epochs": 1, "dtype": "float32", "model": "x",
                              "seeds": (0, 1), "machine": "m", "date": "d"})
    assert "| eth | m | 0.01 (edge) | 7.5 |" in md and "diverged (1 of 2)" in md
    runs[("eth", "m", 0, 1e-2)] = {"diverged": "nan loss"}
    assert mod.choose(runs, ["eth"], ["m"], [0, 1], (1e-2, 5e-2)) == []  # every rate diverged: no row
