"""The adaptation benchmark's fast mode (what CI can afford) runs end to end and its table agrees
with the per-run metrics it summarises."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("mace")


def test_adapt_fast_mode(rmd17, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MMEA_RMD17_DIR=str(rmd17))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "adapt.py"), "--mode", "fast", "--work",
                           str(tmp_path / "work"), "--results", str(tmp_path / "res")],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
        assert f"| ethanol | {r['method']} |" in md
    by = {r["method"]: r for r in rows}
    assert by["readout"]["trainable"] < by["mmea"]["trainable"] < by["full"]["trainable"] == by["scratch"]["trainable"]
