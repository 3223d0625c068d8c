"""The C++ double backward of the fused gate (``fused_gate_dbwd``, the force step's second
derivatives) against :func:`reference.double_backward` (float64 1e-12, float32, fp16/bf16 against
float32), both layouts, every activation, many rows (the threaded path); that FusedGate's autograd
uses it when no graph is recorded and the differentiable reference when one is (third derivatives
against e3nn's Gate); bad input named."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("e3nn")
from e3nn.nn import Gate  # noqa: E402

from mmea_kernels.nn.fused_gate import FusedGate  # noqa: E402
from mmea_kernels.ops.fused_gate import fused_gate_backend_status, reference, ssp  # noqa: E402
from mmea_kernels.ops.fused_gate.spec import spec_tables  # noqa: E402

ok, why = fused_gate_backend_status("cpp", "cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpp backend: {why}")

ACTS = [[F.silu, torch.sigmoid], [torch.tanh, torch.abs], [F.softplus, ssp], [None, F.silu]]


def _dbwd(x, dy, v, t):
    return torch.ops.mmea_kernels_ext.fused_gate_dbwd(x, dy, v, t.cpp_segs, t.cpp_csts, t.spec.num_gates)


def _inputs(fg, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, fg.irreps_in.dim, generator=gen, dtype=torch.float64)
    x[0, :3] = torch.tensor([25.0, -30.0, 0.0])  # softplus threshold, a large negative, abs at 0
    dy = torch.randn(n, fg.irreps_out.dim, generator=gen, dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype), v.to(dtype)


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("acts", ACTS, ids=lambda a: "-".join(getattr(f, "__name__", "id") for f in a))
def test_kernel_matches_reference(layout, acts):
    fg = FusedGate("3x0e+1x0e", acts, "2x0e+3x0e", acts, "2x1o+3x2e", layout=layout, backend="cpp")
    t = spec_tables(fg._key, "cpu")
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x, dy, v = _inputs(fg, 3000, dtype)  # 4 row chunks, above the serial threshold: two threads
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            got = _dbwd(x, dy, v, t)
        finally:
            torch.set_num_threads(before)
        want = reference.double_backward(x, dy, v, t)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    x, dy, v = _inputs(fg, 64, torch.float32)
    want = _dbwd(x, dy, v, t)
    for low in (torch.float16, torch.bfloat16):  # computed in float32, rounded once
        got = _dbwd(x.to(low), dy.to(low), v.to(low), t)
        for g, w in zip(got, want):
            assert g.dtype == low
            torch.testing.assert_close(g.float(), w, rtol=0.05, atol=0.05)


def test_autograd_uses_the_kernel_without_a_graph_and_torch_ops_with_one(monkeypatch):
    args = ("4x0e", [F.silu], "2x0e+1x0e", [torch.sigmoid, torch.tanh], "2x1o+1x2e")
    ref, fg = Gate(*args).double(), FusedGate(*args, backend="cpp")
    x = torch.randn(7, ref.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, ref.irreps_out.dim, dtype=torch.float64, requires_grad=True)
    w, u = torch.randn_like(x), torch.randn_like(x)

    def second(m, create_graph):
        (g,) = torch.autograd.grad(m(x), x, dy, create_graph=True)
        return torch.autograd.grad((g * w).sum(), (x, dy), create_graph=create_graph)

    calls = []
    real = reference.double_backward
    monkeypatch.setattr(reference, "double_backward", lambda *a: calls.append(1) or real(*a))
    for a, b in zip(second(fg, False), second(ref, False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not calls  # the one-pass kernel
    third = [torch.autograd.grad((s[0] * u).sum(), x)[0] for s in (second(fg, True), second(ref, True))]
    assert calls  # a graph recorded: the differentiable torch formulas
    torch.testing.assert_close(third[0], third[1], rtol=1e-10, atol=1e-10)


def test_bad_input_is_named():
    fg = FusedGate("2x0e", [F.silu], "1x0e", [F.silu], "1x1o", backend="cpp")
    t = spec_tables(fg._key, "cpu")
    x, dy, v = _inputs(fg, 4, torch.float64)
    with pytest.raises(RuntimeError, match=r"fused_gate_dbwd: x \[4, 6\], dy \[4, 5\], v \[4, 5\]"):
        _dbwd(x, dy, v[:, :5], t)
    with pytest.raises(RuntimeError, match="fused_gate_dbwd: x, dy and v must share a dtype"):
        _dbwd(x, dy, v.float(), t)
