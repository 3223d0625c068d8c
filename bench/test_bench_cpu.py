"""CPU benchmarks (pytest-benchmark): the adapted linear layer in each implementation against the
base ``o3.Linear`` measured in the same run (``cpp``: MMEALinear's fused C++ linear + gate, fwd and
fwd+bwd), and one whole MACE fine-tuning step. Paired per-layer ratios: bench/linear_speed.py.

Run: ``make bench`` (full grid) or ``MMEA_BENCH_QUICK=1 make bench`` (one size)."""
import os

import pytest
import torch
from e3nn import o3

from mmea_kernels.ops import backend_status
from mmea_kernels.ops.gated_linear import cpp_status

from providers import CPU_LAYERS as LAYERS
from providers import Variant, make_run

QUICK = os.environ.get("MMEA_BENCH_QUICK") == "1"
SIZES = [2000] if QUICK else [500, 2000, 8000]
DTYPES = [torch.float32] if QUICK else [torch.float32, torch.float64]
# cpp: MMEALinear's fused C++ linear + gate (its CPU default); cpp-unfused: o3.Linear, then the C++ gate ops
PROVIDERS = ["base", "published", "broadcast", "compiled", "cpp", "cpp-unfused"]


def _provider_param(p):
    if p == "cpp":
        ok, why = cpp_status("cpu")
        return pytest.param(p, marks=pytest.mark.skipif(not ok, reason=why))
    if p == "cpp-unfused":
        ok, why = backend_status("cpp", "cpu")
        return pytest.param(p, marks=pytest.mark.skipif(not ok, reason=why))
    return p


@pytest.mark.parametrize("layer", list(LAYERS) if not QUICK else ["128x0e+128x1o+128x2e+128x3o"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", [_provider_param(p) for p in PROVIDERS])
def test_adapted_linear(benchmark, record, layer, n, dtype, mode, provider):
    irreps_in, irreps_out = LAYERS[layer]
    torch.manual_seed(0)
    lin = o3.Linear(irreps_in, irreps_out).to(dtype)
    v = Variant(lin, provider).to(dtype)
    v.requires_grad_(False)  # input gradient only, as in the measurement
    x = torch.randn(n, lin.irreps_in.dim, dtype=dtype, requires_grad=(mode != "fwd"))
    gy = torch.randn(n, lin.irreps_out.dim, dtype=dtype)
    # the benchmark measures what it claims: every adapted provider gives the same numbers
    if provider != "base":
        ref = Variant(lin, "broadcast").to(dtype)
        ref.load_state_dict(v.state_dict())
        torch.testing.assert_close(v(x), ref(x), rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-4)

    run = make_run(v, x, gy, mode)
    rounds = 3 if n * lin.irreps_out.dim > 8e6 else 7
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    record("adapted_linear", provider, mode, f"{layer} N={n} {str(dtype).split('.')[-1]}")


@pytest.mark.parametrize("adapted", [False, True], ids=["base", "mmea"])
def test_mace_finetune_step(benchmark, record, adapted):
    """One fine-tuning step (energy + forces + backward through the forces) of the
    MACE-OFF23-medium architecture on 4 toluene molecules: full fine-tuning of the base model
    (every weight trainable) against MMEA (adapter weights trainable, base frozen)."""
    import mmea_kernels as mk
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch, build_mace
    from mmea_kernels.train import loss

    torch.manual_seed(0)
    model = build_mace("mace-off23-medium")
    if adapted:
        mk.inject_adapters(model)
    batch = atoms_to_batch(toy_molecules("toluene", 4), [1, 6, 8], 5.0)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss(model, batch, 1.0, 100.0).backward()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    record("mace_step", "mmea" if adapted else "base", "fwd+bwd", "mace-off23-medium 4x toluene fp32",
           trainable=sum(p.numel() for p in params))


@pytest.fixture(scope="module")
def whole_model():
    """MACE-OFF23-medium architecture: frozen, MMEA-adapted and ELoRA-adapted copies (rank 16,
    non-trivial adapter values) and 4 frames: aspirin from the rMD17 splits when found, else toluene
    (as bench/model_overhead.py, whose paired ratios are the numbers to quote)."""
    import argparse

    import model_overhead as mo
    mol = mo.default_molecule()
    args = argparse.Namespace(preset="mace-off23-medium", molecule=mol, frames=4, rank=16, data_dir=None)
    base, mmea, elora, batch = mo.build(args, torch.device("cpu"), torch.float32)
    return {"frozen": base, "mmea": mmea, "elora": elora}, batch, f"mace-off23-medium 4x {mol} fp32", mo


@pytest.mark.parametrize("which", ["frozen", "mmea"])
def test_mace_energy_forces(benchmark, record, whole_model, which):
    """Energy + forces (one MD step's model cost): the MMEA-adapted model against the frozen one."""
    models, batch, size, mo = whole_model
    benchmark.pedantic(lambda: mo.energy_forces(models[which], batch), rounds=5, warmup_rounds=1, iterations=1)
    record("mace_energy_forces", which, "fwd+dx", size)


@pytest.mark.parametrize("which", ["elora", "mmea"])
def test_mace_adapter_step(benchmark, record, whole_model, which):
    """One force-training step (E+F loss, backward to the adapter weights): MMEA against ELoRA at the
    same rank."""
    models, batch, size, mo = whole_model
    model = models[which]
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        e, f = mo.energy_forces(model, batch, training=True)
        n = batch["ptr"][1:] - batch["ptr"][:-1]
        (((e / n) ** 2).mean() + 100.0 * (f ** 2).mean()).backward()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    record("mace_adapter_step", which, "fwd+bwd", size, trainable=sum(p.numel() for p in params))
