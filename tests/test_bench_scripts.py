"""The GPU benchmark script stays correct: it runs at small sizes on CPU (Triton interpreter),
checks each implementation against the reference and writes its JSON."""
import json
import pathlib
import sys

import pytest

from mmea_kernels.ops import backend_status

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def test_gpu_script_small_run(tmp_path):
    ok, why = backend_status("triton", "cpu")
    if not ok:
        pytest.skip(why)
    sys.path.insert(0, str(BENCH / "gpu"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    bench_gpu.main(["--small", "--out", str(tmp_path)])
    (out,) = tmp_path.glob("*-gpu.json")
    data = json.loads(out.read_text())
    providers = {r["provider"] for r in data["rows"]}
    assert {"base", "linear+torch-gate", "fused", "torch", "triton"} <= providers
    assert data["copy_GBps"] > 0
