"""The adaptation benchmark's fast mode (what CI can afford) runs end to end and its table agrees
with the per-run metrics it summarises."""
import json

import pytest

from helpers import run_rmd17_bench

pytest.importorskip("mace")


def test_adapt_fast_mode(rmd17, tmp_path):
    # two worker processes (the README's `make bench-adapt` runs that way): the pool path is
    # exercised, and the run takes about half the time on CI's two cores
    run_rmd17_bench("adapt.py", "fast", rmd17, tmp_path, extra=("--workers", "2"))
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
