"""The one-pass double backward of the fused gate (the force step's second derivatives: C++
``fused_gate_dbwd`` on CPU, Triton ``double_backward``: CUDA, or the interpreter on CPU) against
:func:`reference.double_backward` (float64 1e-12, float32, fp16/bf16 against float32), both layouts,
every activation, many rows (the threaded C++ path); that FusedGate's autograd uses it when no graph
is recorded and the differentiable reference when one is (third derivatives against e3nn's Gate);
bad input named."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("e3nn")
from e3nn.nn import Gate  # noqa: E402

from mmea_kernels.nn.fused_gate import FusedGate  # noqa: E402
from mmea_kernels.ops.fused_gate import fused_gate_backend_status, reference, ssp  # noqa: E402
from mmea_kernels.ops.fused_gate.function import _cpp_has_dbwd  # noqa: E402
from mmea_kernels.ops.fused_gate.spec import spec_tables  # noqa: E402

ACTS = [[F.silu, torch.sigmoid], [torch.tanh, torch.abs], [F.softplus, ssp], [None, F.silu]]
CASES = [("cpp", "cpu"), ("triton", "cpu"), pytest.param("triton", "cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def _need(backend, device):
    ok, why = fused_gate_backend_status(backend, device)
    if not ok:
        pytest.skip(f"{backend} on {device}: {why}")
    if backend == "cpp" and not _cpp_has_dbwd():
        pytest.skip("mmea_kernels._C predates fused_gate_dbwd (rebuild it): the torch formulas run instead")


def _dbwd(backend, x, dy, v, t):
    if backend == "cpp":
        return torch.ops.mmea_kernels_ext.fused_gate_dbwd(x, dy, v, t.cpp_segs, t.cpp_csts, t.spec.num_gates)
    from mmea_kernels.ops.fused_gate import triton as tr

    return tr.double_backward(x, dy, v, t)


def _inputs(fg, n, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, fg.irreps_in.dim, generator=gen, dtype=torch.float64)
    x[0, :3] = torch.tensor([25.0, -30.0, 0.0])  # softplus threshold, a large negative, abs at 0
    dy = torch.randn(n, fg.irreps_out.dim, generator=gen, dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), dy.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("acts", ACTS, ids=lambda a: "-".join(getattr(f, "__name__", "id") for f in a))
def test_kernel_matches_reference(layout, acts, backend, device):
    _need(backend, device)
    # gated widths 3, 5 and 7 (unrolled), 9 (the generic loop) and 1 (0o)
    fg = FusedGate("3x0e+1x0e", acts, "2x0e+6x0e", acts, "2x1o+3x2e+1x4e+1x0o+1x3o", layout=layout, backend=backend)
    t = spec_tables(fg._key, device)
    # C++: 4 row chunks, above the serial threshold, on two threads; the interpreter: 3 programs
    n = 3000 if backend == "cpp" or device == "cuda" else 130
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x, dy, v = _inputs(fg, n, dtype, device)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            got = _dbwd(backend, x, dy, v, t)
        finally:
            torch.set_num_threads(before)
        want = reference.double_backward(x, dy, v, t)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    x, dy, v = _inputs(fg, 64, torch.float32, device)
    want = _dbwd(backend, x, dy, v, t)
    for low in (torch.float16, torch.bfloat16):  # computed in float32, rounded once
        got = _dbwd(backend, x.to(low), dy.to(low), v.to(low), t)
        for g, w in zip(got, want):
            assert g.dtype == low
            torch.testing.assert_close(g.float(), w, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend, device", CASES)
def test_autograd_uses_the_kernel_without_a_graph_and_torch_ops_with_one(monkeypatch, backend, device):
    _need(backend, device)
    args = ("4x0e", [F.silu], "2x0e+1x0e", [torch.sigmoid, torch.tanh], "2x1o+1x2e")
    ref, fg = Gate(*args).double().to(device), FusedGate(*args, backend=backend).to(device)
    x = torch.randn(7, ref.irreps_in.dim, dtype=torch.float64, device=device, requires_grad=True)
    dy = torch.randn(7, ref.irreps_out.dim, dtype=torch.float64, device=device, requires_grad=True)
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


def test_a_build_without_the_kernel_runs_the_torch_formulas(monkeypatch):
    """An extension built before the kernel existed (forward and backward only): the second
    derivatives still come, from the torch formulas, equal to e3nn's."""
    _need("cpp", "cpu")
    from mmea_kernels.ops.fused_gate import function

    monkeypatch.setattr(function, "_cpp_has_dbwd", lambda: False)
    monkeypatch.setattr(torch.ops.mmea_kernels_ext, "fused_gate_dbwd", None, raising=False)
    args = ("2x0e", [F.silu], "1x0e", [torch.sigmoid], "1x1o")
    ref, fg = Gate(*args).double(), FusedGate(*args, backend="cpp")
    x = torch.randn(5, ref.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    derivs = []
    for m in (fg, ref):
        (g,) = torch.autograd.grad((m(x) ** 2).sum(), x, create_graph=True)
        derivs.append(torch.autograd.grad((g ** 2).sum(), x)[0])
    torch.testing.assert_close(derivs[0], derivs[1], rtol=1e-12, atol=1e-12)


def test_bad_input_is_named():
    """Shapes and dtypes the raw ops cannot use, named (the module path never passes them)."""
    _need("cpp", "cpu")
    fg = FusedGate("2x0e", [F.silu], "1x0e", [F.silu], "1x1o", backend="cpp")
    t = spec_tables(fg._key, "cpu")
    x, dy, v = _inputs(fg, 4, torch.float64)
    with pytest.raises(RuntimeError, match=r"fused_gate_dbwd: x \[4, 6\], dy \[4, 5\], v \[4, 5\]"):
        _dbwd("cpp", x, dy, v[:, :5], t)
    with pytest.raises(RuntimeError, match="fused_gate_dbwd: x, dy and v must share a dtype"):
        _dbwd("cpp", x, dy, v.float(), t)
    # a wider dy (or x) than the gate's: refused, not columns of the result left unwritten
    ops = torch.ops.mmea_kernels_ext
    wide = torch.cat([dy, dy[:, :2]], dim=1)
    msg = "the gate's segments cover 6 input and 5 output columns, but the tensors have"
    with pytest.raises(RuntimeError, match=f"fused_gate_dbwd: {msg} 6 and 7"):
        _dbwd("cpp", x, wide, v, t)
    with pytest.raises(RuntimeError, match=f"fused_gate_bwd: {msg} 6 and 7"):
        ops.fused_gate_bwd(x, wide, t.cpp_segs, t.cpp_csts, t.spec.num_gates)
    with pytest.raises(RuntimeError, match=f"fused_gate_fwd: {msg} 8 and 5"):
        ops.fused_gate_fwd(torch.cat([x, x[:, :2]], dim=1), t.cpp_segs, t.cpp_csts, 5, t.spec.num_gates)
    # a gated block reading a gate that no gate segment computes: refused, not last row's scratch read
    segs = t.cpp_segs.clone()
    segs[segs[:, 0] == 2, 6] = 1
    for name, args in (("fwd", (x, segs, t.cpp_csts, 5, 2)), ("bwd", (x, dy, segs, t.cpp_csts, 2)),
                       ("dbwd", (x, dy, v, segs, t.cpp_csts, 2))):
        with pytest.raises(RuntimeError, match=f"fused_gate_{name}: gate 1 is read by a gated block but no gate"):
            getattr(ops, f"fused_gate_{name}")(*args)
