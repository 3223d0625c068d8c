"""Models loaded from a ``torch.package`` file that holds its own copy of e3nn (NequIP's packages,
``nequip-package``, intern e3nn: their layers are ``<torch_package_0>.e3nn.o3._linear.Linear``, not
``e3nn.o3.Linear``). ``inject_adapters`` refused such a model ("no o3.Linear ... to adapt") and
``replace_gates`` left its Gates alone (NequIP review, 2026-12-03: NequIP's foundation models are
distributed as packages). Reference: the same model before packaging, with the same adapters."""
import pytest
import torch
import torch.package
from e3nn import nn as enn
from e3nn import o3

import mmea_kernels as mk


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        o3.Linear("4x0e+2x1o", "6x0e+2x1o"),
        enn.Gate("4x0e", [torch.nn.functional.silu], "2x0e", [torch.sigmoid], "2x1o"),
        o3.Linear("4x0e+2x1o", "3x0e+2x1o+1x2e")).double()


def _packaged(model, path):
    with torch.package.PackageExporter(str(path)) as exp:
        exp.intern(["e3nn.**"])
        exp.extern(["opt_einsum_fx.**", "opt_einsum.**", "numpy.**", "sympy.**", "scipy.**", "packaging.**", "io",
                    "sys"])
        exp.mock(["matplotlib.**"])
        exp.save_pickle("model", "m.pkl", model)
    return torch.package.PackageImporter(str(path)).load_pickle("model", "m.pkl")


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_adapters_and_fused_gate_on_a_model_with_packaged_e3nn(method, tmp_path):
    plain = _model()
    packaged = _packaged(_model(), tmp_path / "m.pt")
    assert type(packaged[0]).__module__.startswith("<torch_package_") and not isinstance(packaged[0], o3.Linear)
    x = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = packaged(x).detach()
    torch.testing.assert_close(want, plain(x), rtol=0, atol=0)
    report = mk.replace_gates(packaged)
    gates = [m for m in packaged.modules() if type(m).__name__ == "FusedGate"]
    assert len(gates) == 1 and gates[0].fused, report
    mk.inject_adapters(packaged, method=method, rank=2)
    assert sorted(mk.adapted_modules(packaged)) == ["0", "2"]
    torch.testing.assert_close(packaged(x), want, rtol=1e-12, atol=1e-12)  # the base model at initialisation
    with torch.no_grad():
        for p in packaged.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    got = packaged(x)
    assert (got - want).abs().max() > 1e-3
    mk.load_adapter_state_dict(plain, mk.adapter_state_dict(packaged))  # the same adapters, unpackaged e3nn
    torch.testing.assert_close(got, plain(x), rtol=1e-12, atol=1e-12)
    trainable = [p for p in packaged.parameters() if p.requires_grad]
    grads = torch.autograd.grad(got.square().sum(), trainable)  # the adapters train
    assert all(torch.isfinite(g).all() for g in grads) and max(float(g.abs().max()) for g in grads) > 0
