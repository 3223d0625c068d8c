"""``mmea_kernels.aten_forms``: the adapters and FusedGates of a model replaced in place by their aten
forms (the modules TorchScript compiles), so that a ``torch.export`` / AOTInductor program of the
model calls no op of this package and loads where it is not installed (NequIP's ``pair_nequip``
runs AOTInductor files from C++, without Python: a file that calls this package's Python custom ops
fails there with "Could not find schema for mmea_kernels::gated_linear"). References: the eager
adapted model (float64, values and input gradients) and a new process that cannot import
mmea_kernels."""
import subprocess
import sys

import pytest
import torch
from e3nn import nn as enn
from e3nn import o3

import mmea_kernels as mk
from mmea_kernels.nn.fused_gate import ScriptableFusedGate

from helpers import REPO, randomise, randomise_adapters


class Net(torch.nn.Module):
    def __init__(self, act=torch.nn.functional.silu):
        super().__init__()
        self.l1 = o3.Linear("4x0e+2x1o", "6x0e+2x1o")
        self.g = enn.Gate("4x0e", [act], "2x0e", [torch.sigmoid], "2x1o")
        self.l2 = o3.Linear("4x0e+2x1o", "3x0e+2x1o")

    def forward(self, x):
        return self.l2(self.g(self.l1(x)))


def _adapted(method, act=torch.nn.functional.silu):
    torch.manual_seed(0)
    model = Net(act).double()
    mk.inject_adapters(model, method=method, rank=2)
    randomise_adapters(model, 0.3, seed=1)
    mk.replace_gates(model)
    return model


def _value_and_grad(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (g,) = torch.autograd.grad((y * y).sum(), x)
    return y.detach(), g


LOAD_WITHOUT_PACKAGE = """
import sys, torch
sys.modules["mmea_kernels"] = None  # importing mmea_kernels fails in this process
ep = torch.export.load(sys.argv[1] + "/m.pt2")
x, want = torch.load(sys.argv[1] + "/ref.pt")
print("max diff", float((ep.module()(x) - want).abs().max()))
"""


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_aten_forms_compute_the_same_and_export_without_the_package(tmp_path, method):
    model = _adapted(method)
    x = torch.randn(6, 10, dtype=torch.float64)
    want, want_grad = _value_and_grad(model, x)
    eager = {n: m for n, m in model.named_children()}
    done = mk.aten_forms(model)
    assert done == {"l1": f"Scriptable{type(eager['l1']).__name__}", "g": "ScriptableFusedGate",
                    "l2": f"Scriptable{type(eager['l2']).__name__}"}
    assert isinstance(model.g, ScriptableFusedGate)
    assert not any(hasattr(m, "_nequip_custom_ops_libs") for m in model.modules())  # NequIP's loaders need nothing
    got, got_grad = _value_and_grad(model, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
    ep = torch.export.export(model, (x,))
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and "mmea_kernels" in str(n.target)]
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save((x, want), tmp_path / "ref.pt")
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("max diff")[1]) <= 1e-12
    # undone: the eager modules are back, and the peft functions see the adapters again
    assert mk.restore_eager_forms(model) == 3
    assert all(getattr(model, n) is m for n, m in eager.items())
    assert len(mk.adapted_modules(model)) == 2


def test_the_eager_model_exports_the_package_ops():
    """The control: without aten_forms the program calls this package's ops (what a Python-free loader lacks)."""
    model = _adapted("mmea")
    ep = torch.export.export(model, (torch.randn(6, 10, dtype=torch.float64),))
    assert [n for n in ep.graph.nodes if n.op == "call_function" and "mmea_kernels" in str(n.target)]


def test_a_gate_with_an_unfused_activation_gets_its_e3nn_gate_back():
    act = torch.nn.functional.gelu  # no fused kernel, no aten form of FusedGate: e3nn's own Gate is aten ops
    model = _adapted("mmea", act)
    assert isinstance(model.g, mk.FusedGate) and not model.g.fused
    x = torch.randn(6, 10, dtype=torch.float64)
    want = model(x)
    done = mk.aten_forms(model)
    assert done["g"] == "Gate" and isinstance(model.g, enn.Gate)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
    # a FusedGate built directly has no gate to give back: it stays (its plain path is aten ops)
    direct = torch.nn.Sequential(mk.FusedGate("4x0e", [act], "2x0e", [torch.sigmoid], "2x1o"))
    assert mk.aten_forms(direct) == {"0": "FusedGate (kept: its plain path; activation not fused)"}


def test_what_has_no_aten_form_is_refused_and_nothing_changes():
    from mmea_kernels.nn.mmea import MMEATensorProduct

    class WithTP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = o3.Linear("4x0e+2x1o", "4x0e+2x1o")
            self.tp = o3.FullyConnectedTensorProduct("4x0e+2x1o", "1x0e+1x1o", "3x0e+2x1o")

    model = WithTP().double()
    mk.inject_adapters(model, method="mmea", rank=2)
    model.tp = MMEATensorProduct(model.tp, rank=2)
    randomise(model.tp, 0.3)
    lin = model.lin
    with pytest.raises(NotImplementedError, match=r"tp .*mmea-tp.*no aten form"):
        mk.aten_forms(model)
    assert model.lin is lin  # checked before anything is replaced
    model.tp = model.tp.base
    model.lin.backend = "cpp"  # pinned kernels: the aten form cannot honour that
    with pytest.raises(NotImplementedError, match=r"aten_forms: adapter 'lin' has its gate backend pinned"):
        mk.aten_forms(model)
    with pytest.raises(ValueError, match="inside a model"):
        mk.aten_forms(model.lin)
