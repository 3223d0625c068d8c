"""CPU benchmarks (pytest-benchmark) of the gate nonlinearity: e3nn's ``Gate`` against
:class:`mmea_kernels.nn.FusedGate` on SevenNet-0's gate shape (``128x0e`` scalars, 96 gates,
gated ``64x1e+32x2e``, silu), forward, forward+backward and a force step (second derivatives). Rows go to the same results file as
the other benchmarks (``make bench``). For the speed-up itself (paired ratios over many rounds,
and the whole-model number) use ``bench/gate_speed.py``."""
import os

import pytest
import torch
import torch.nn.functional as F

from providers import make_run

QUICK = os.environ.get("MMEA_BENCH_QUICK") == "1"
SIZES = [4000] if QUICK else [1000, 4000, 16000]
DTYPES = [torch.float32] if QUICK else [torch.float32, torch.float64]
GATE = ("128x0e", [F.silu], "64x0e+32x0e", [F.silu, F.silu], "64x1e+32x2e")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "force"])
@pytest.mark.parametrize("provider", ["base", "fused"])
def test_gate(benchmark, record, n, dtype, mode, provider):
    """``base`` is e3nn's Gate (the overhead column of the table is then FusedGate / Gate - 1)."""
    from e3nn.nn import Gate

    from mmea_kernels.nn.fused_gate import FusedGate

    torch.manual_seed(0)
    ref = Gate(*GATE).to(dtype)
    m = ref if provider == "base" else FusedGate.from_module(ref)
    x = torch.randn(n, ref.irreps_in.dim, dtype=dtype, requires_grad=(mode != "fwd"))
    dy = torch.randn(n, ref.irreps_out.dim, dtype=dtype)
    if provider == "fused":
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)

    benchmark.pedantic(make_run(m, x, dy, mode), rounds=7, warmup_rounds=2, iterations=1)
    record("gate", provider, mode, f"sevennet-0 gate N={n} {str(dtype).split('.')[-1]}")
