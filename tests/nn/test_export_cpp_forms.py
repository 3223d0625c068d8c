"""``mmea_kernels.export_forms(model, kernels="cpp")``: MMEA adapters replaced in place by
``ScriptableMMEAFusedLinear`` (one op of the C++ extension, registered in C++ with its own autograd),
so that a ``torch.export`` / AOTInductor program of the model calls only C++-registered ops of this
package (``mmea_kernels_ext::*``) and runs without Python where the extension's library is loaded
(``torch.ops.load_library``; LAMMPS: ``mmea_ops.so``). Forces are traced the way NequIP's
``nequip-compile`` does (``make_fx`` of a function that differentiates, then ``torch.export``), which
reaches the C++ autograd's kernels: their fake (shape) implementations are checked against the real
kernels. References: the eager adapted model (float64 values and input gradients), a new process
that cannot import mmea_kernels."""
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import mmea_kernels as mk
from mmea_kernels.nn.scriptable import ScriptableMMEAFusedLinear
from mmea_kernels.ops.gate import cpp as cpp_backend

from helpers import REPO
from test_aten_forms import _adapted, _value_and_grad

EXT_OK, EXT_WHY = cpp_backend.ext_op_status("mmea_linear", "scripted fused adapter", "csrc/adapter_op.cpp")
pytestmark = pytest.mark.skipif(not EXT_OK, reason=f"cpp backend unavailable: {EXT_WHY}")


def _value_and_grad_fn(model):
    def f(x):  # what an energy + forces model does: the derivative inside the traced function
        x = x.requires_grad_(True) if not x.requires_grad else x
        y = model(x)
        (g,) = torch.autograd.grad((y * y).sum(), x)
        return y, g
    return f


def _called(graph):
    return {str(n.target) for n in graph.nodes if n.op == "call_function"}


LOAD_WITH_THE_LIBRARY_ONLY = """
import sys, torch
sys.modules["mmea_kernels"] = None  # importing mmea_kernels fails in this process
if sys.argv[2] != "-":
    torch.ops.load_library(sys.argv[2])  # the C++ ops, as LAMMPS loads mmea_ops.so
ep = torch.export.load(sys.argv[1] + "/m.pt2")
diff = 0.0
for x, want, want_grad in torch.load(sys.argv[1] + "/ref.pt"):  # two row counts: one program
    y, g = ep.module()(x)
    diff = max(diff, float((y - want).abs().max()), float((g - want_grad).abs().max()))
print("max diff", diff)
"""


def test_cpp_forms_compute_the_same_and_export_to_the_cpp_ops_only(tmp_path):
    model = _adapted("mmea")
    x, x9 = torch.randn(6, 10, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    want, want_grad = _value_and_grad(model, x)
    refs = [(x, want, want_grad), (x9, *_value_and_grad(model, x9))]
    done = mk.export_forms(model, "cpp")
    assert done == {"l1": "ScriptableMMEAFusedLinear", "g": "ScriptableFusedGate", "l2": "ScriptableMMEAFusedLinear"}
    assert isinstance(model.l1, ScriptableMMEAFusedLinear)
    got, got_grad = _value_and_grad(model, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
    # forward only: the one fused op (its fake gives the shape); with the derivative, its kernels
    ep = torch.export.export(model, (x,))
    assert "mmea_kernels_ext.mmea_linear.default" in _called(ep.graph)
    assert [tuple(n.meta["val"].shape) for n in ep.graph.nodes if "mmea_linear" in str(n.target)] == [(6, 12), (6, 9)]
    torch.testing.assert_close(ep.module()(x), want, rtol=0, atol=1e-12)
    fx = make_fx(_value_and_grad_fn(model), tracing_mode="symbolic", _allow_non_fake_inputs=True)(x)
    called = _called(fx.graph)
    ours = {t for t in called if "mmea_kernels" in t}
    assert ours and all(t.startswith("mmea_kernels_ext.") for t in ours), ours  # no Python op of the package
    assert {"mmea_kernels_ext.gate_net_fwd.default", "mmea_kernels_ext.gate_net_bwd.default"} <= ours
    assert "sym_size" in fx.code  # the row count stays symbolic (the C++ op reads sym sizes: no specialisation)
    ep = torch.export.export(fx, (x,), dynamic_shapes=({0: torch.export.Dim("rows", min=2)},))
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save(refs, tmp_path / "ref.pt")
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    library = cpp_backend._EXT.__file__

    def load(lib):
        return subprocess.run([sys.executable, "-c", LOAD_WITH_THE_LIBRARY_ONLY, str(tmp_path), lib],
                              capture_output=True, text=True, timeout=300, env=env)

    res = load(library)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("max diff")[1]) <= 1e-12
    res = load("-")  # the control: without the library the program does not load
    assert res.returncode != 0 and "mmea_kernels_ext" in res.stderr, res.stderr[-3000:]
    assert mk.restore_eager_forms(model) == 3 and len(mk.adapted_modules(model)) == 2


def test_what_the_fused_op_does_not_cover_keeps_its_aten_form():
    model = _adapted("elora")  # ELoRA: the aten form; so does MMEA on a layer pinned to no kernels
    done = mk.export_forms(model, "cpp")
    assert done["l1"] == "ScriptableELoRALinear" and done["g"] == "ScriptableFusedGate"
    with pytest.raises(ValueError, match=r"kernels='cuda': expected one of \('aten', 'cpp'\)"):
        mk.export_forms(_adapted("mmea"), "cuda")
    pinned = _adapted("mmea")
    pinned.l2.backend = "triton"  # a pinned gate backend: refused, named, nothing replaced
    with pytest.raises(NotImplementedError, match=r"export_forms\(kernels='cpp'\): adapter 'l2' has its gate backend"):
        mk.export_forms(pinned, "cpp")
    assert isinstance(pinned.l1, mk.MMEALinear)


def test_a_second_call_converts_afresh_and_a_refusal_leaves_the_forms():
    """A review found that a second call (cpp after cpp, cpp after aten) silently put the eager adapters
    back, whose program calls the Python ops that pair_nequip refuses."""
    model = _adapted("mmea")
    x = torch.randn(6, 10, dtype=torch.float64)
    want = model(x)
    for kernels, form in (("aten", "ScriptableMMEALinear"), ("cpp", "ScriptableMMEAFusedLinear"),
                          ("cpp", "ScriptableMMEAFusedLinear"), ("aten", "ScriptableMMEALinear")):
        done = mk.export_forms(model, kernels)
        assert done == {"l1": form, "g": "ScriptableFusedGate", "l2": form}
        assert type(model.l1).__name__ == form
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
    forms = dict(model.named_children())
    model.l2.__dict__["_eager_form"][0].backend = "triton"  # refused now: the aten forms stay as they were
    with pytest.raises(NotImplementedError, match="adapter 'l2' has its gate backend pinned"):
        mk.export_forms(model, "cpp")
    assert dict(model.named_children()) == forms


def test_without_the_extension_cpp_is_refused_and_the_forms_stay(monkeypatch):
    from mmea_kernels.ops.gated_linear import cpp_kernels

    model = _adapted("mmea")
    mk.export_forms(model, "aten")
    forms = dict(model.named_children())
    monkeypatch.setattr(cpp_kernels, "cpp_status", lambda device: (False, "not built (test)"))
    with pytest.raises(RuntimeError, match=r"kernels='cpp' needs this package's C\+\+ extension: not built \(test\)"):
        mk.export_forms(model, "cpp")
    assert dict(model.named_children()) == forms


def test_a_column_major_input_keeps_the_row_count_symbolic():
    """The C++ op copies a column-strided input; it compared the stride (the row count) as an int,
    which fixed the exported program to the traced row count (a review)."""
    model = _adapted("mmea")
    mk.export_forms(model, "cpp")

    class Transposed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, xt):
            return self.m(xt.t())

    xt, xt9 = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 9, dtype=torch.float64)
    ep = torch.export.export(Transposed(), (xt,), dynamic_shapes=({1: torch.export.Dim("rows", min=2)},))
    torch.testing.assert_close(ep.module()(xt9), model(xt9.t().contiguous()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("need_x0,need_weights", [(True, True), (True, False), (False, True), (False, False)])
def test_the_fakes_of_the_gate_net_kernels_have_the_real_shapes(need_x0, need_weights):
    torch.manual_seed(0)
    n, s, r, a, g = 5, 4, 3, 2, 6
    x0, w_down, b_down = torch.randn(n, s), torch.randn(r, s), torch.randn(r)
    w_up, b_up = torch.randn(a + g, r), torch.randn(a + g)
    ops = torch.ops.mmea_kernels_ext
    add, gates = ops.gate_net_fwd(x0, w_down, b_down, w_up, b_up, a, 0)
    real = ops.gate_net_bwd(x0, w_down, b_down, w_up, gates, torch.randn(n, a), torch.randn(n, g), a, 0, need_x0,
                            need_weights)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_fwd = ops.gate_net_fwd(x0, w_down, b_down, w_up, b_up, a, 0)
        fake = ops.gate_net_bwd(x0, w_down, b_down, w_up, gates, torch.randn(n, a), torch.randn(n, g), a, 0,
                                need_x0, need_weights)
    assert [t.shape for t in fake_fwd] == [add.shape, gates.shape] == [(n, a), (n, g)]
    assert [t.shape for t in fake] == [t.shape for t in real]
    assert real[0].shape == ((n, s) if need_x0 else (0, s))
