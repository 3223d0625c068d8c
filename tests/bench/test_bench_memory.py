"""bench/train_memory.py: its CPU peak (the profiler's allocation records) is checked against
allocations of known size, and the script's rows against the models it measures."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO

BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def train_memory():
    sys.path.insert(0, str(BENCH))
    try:
        import train_memory
    finally:
        sys.path.pop(0)
    return train_memory


def test_cpu_peak_is_the_most_held_at_once(train_memory):
    """4 MB kept, 8 MB made and freed, then 2 MB more: the peak is 12 MB (not the 14 MB allocated in
    all), and what was held before the call does not count."""
    held = torch.ones(3_000_000)  # noqa: F841 - allocated before the measurement

    def fn():
        keep = torch.empty(1_000_000)
        tmp = torch.empty(2_000_000)
        del tmp
        more = torch.empty(500_000)
        return keep, more

    peak = train_memory.peak_bytes(fn, torch.device("cpu"))
    assert 12_000_000 <= peak <= 12_000_000 + 4096, peak
    # a step that frees memory held before it (a gradient set to None) does not lower the peak below 0
    assert train_memory.peak_bytes(lambda: None, torch.device("cpu")) == 0


def test_train_memory_script_rows(tmp_path):
    pytest.importorskip("mace")
    res = subprocess.run([sys.executable, str(BENCH / "train_memory.py"), "--preset", "tiny", "--frames", "1",
                          "--molecule", "ethanol", "--repeats", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (out,) = tmp_path.glob("train-memory-cpu-*.json")
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == ["elora", "frozen", "full", "mmea"]
    # the same step allocates the same: both repeats agree to the byte
    assert all(len(set(r["peak_MB"])) == 1 and r["peak_MB"][0] > 0 for r in rows.values())
    # a training step holds the force graph and gradients, which inference without a graph does not
    assert all(rows[m]["peak_MB"][0] > rows["frozen"]["peak_MB"][0] for m in ("mmea", "elora", "full"))
    # the trainable counts are the models' own: full = every weight of the base (float32: 3 copies kept)
    from mmea_kernels.integrations.mace import build_mace
    n_base = sum(p.numel() for p in build_mace("tiny").parameters())
    assert rows["full"]["trainable"] == n_base and rows["frozen"]["trainable"] == 0
    assert 0 < rows["mmea"]["trainable"] < n_base and rows["elora"]["trainable"] > 0
    assert rows["full"]["state_MB"] == pytest.approx(3 * 4 * n_base / 2 ** 20)
