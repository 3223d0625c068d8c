"""gate_mul / seg_dot: values against naive float64 loops, gradcheck and gradgradcheck for each
backend on each device it runs on (CPU here; CUDA too where a GPU exists), backend selection, and
bad input."""
import os

import pytest
import torch

from mmea_kernels import IrrepsLayout, gate_mul, seg_dot
from mmea_kernels.ops import backend_status

from helpers import TOL, assert_gradchecks, gate_inputs, naive_gate_mul, naive_seg_dot

IRREPS = "2x0e+2x1o+1x0o+1x2e+1x1e"


def backends():
    """(backend, device) pairs; the CUDA ones are skipped, with the reason, without a GPU."""
    out = []
    for dev in ("cpu", "cuda"):
        for name in ("torch", "triton", "cpp"):
            if dev == "cuda" and not torch.cuda.is_available():
                ok, why = False, "no CUDA device on this machine"
            else:
                ok, why = backend_status(name, dev)
            out.append(pytest.param((name, dev), id=f"{name}-{dev}", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


@pytest.fixture(params=backends())
def backend_device(request):
    return request.param


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("shared", [False, True])
def test_values_match_naive(backend_device, layout, shared):
    backend, dev = backend_device
    L = IrrepsLayout.of(IRREPS, layout)
    x, b, g = gate_inputs(L, 7, shared, seed=0)
    xd, bd, gd = x.to(dev), b.to(dev), g.to(dev)
    # tighter than TOL: one product (gate_mul) or a sum of at most 5 (seg_dot) per element
    torch.testing.assert_close(gate_mul(xd, gd, L, backend=backend).cpu(), naive_gate_mul(x, g, IRREPS, layout),
                               rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(seg_dot(xd, bd, L, shared=shared, backend=backend).cpu(),
                               naive_seg_dot(x, b, IRREPS, layout, shared), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_and_gradgradcheck(backend_device, layout, shared):
    backend, dev = backend_device
    L = IrrepsLayout.of(IRREPS, layout)
    x, b, g = (t.to(dev).requires_grad_() for t in gate_inputs(L, 3, shared, seed=1))
    f_mul = lambda x, g: gate_mul(x, g, L, backend=backend)  # noqa: E731
    f_dot = lambda a, b: seg_dot(a, b, L, shared=shared, backend=backend)  # noqa: E731
    assert_gradchecks(f_mul, (x, g), dev, interpreted_triton=backend == "triton")
    assert_gradchecks(f_dot, (x, b), dev, interpreted_triton=backend == "triton")


def test_third_derivative_matches_autograd_of_reference():
    """Derivatives of any order equal those of the plain-torch expression."""
    L = IrrepsLayout.of("1x0e+2x1o", "mul_ir")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, L.dim, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, L.num_gates, generator=gen, dtype=torch.float64, requires_grad=True)

    def third(fn):
        y = (fn(x, g) ** 2).sum()
        (dx,) = torch.autograd.grad(y, x, create_graph=True)
        (dg,) = torch.autograd.grad((dx ** 2).sum(), g, create_graph=True)
        return torch.autograd.grad(dg.sum(), (x, g))

    ref = third(lambda x, g: naive_gate_mul(x, g, "1x0e+2x1o", "mul_ir"))
    got = third(lambda x, g: gate_mul(x, g, L, backend="torch"))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_leading_dims_and_noncontiguous_input():
    L = IrrepsLayout.of(IRREPS, "mul_ir")
    base = torch.randn(L.dim, 2, 5, dtype=torch.float64)
    x = base.permute(1, 2, 0)  # [2, 5, D], not contiguous
    assert not x.is_contiguous()
    g = torch.randn(2, 5, L.num_gates, dtype=torch.float64)
    torch.testing.assert_close(gate_mul(x, g, L), naive_gate_mul(x, g, IRREPS, "mul_ir"))
    torch.testing.assert_close(seg_dot(x, x, L), naive_seg_dot(x, x, IRREPS, "mul_ir"))


def test_empty_batch(backend_device):
    backend, dev = backend_device
    L = IrrepsLayout.of(IRREPS, "mul_ir")
    x = torch.zeros(0, L.dim, dtype=torch.float64, device=dev, requires_grad=True)
    g = torch.zeros(L.num_gates, dtype=torch.float64, device=dev, requires_grad=True)
    y = gate_mul(x, g, L, backend=backend)
    assert y.shape == (0, L.dim)
    s = seg_dot(x, x, L, shared=True, backend=backend)
    assert s.shape == (L.num_gates,) and torch.equal(s, torch.zeros(L.num_gates, dtype=torch.float64, device=dev))
    gx, gg = torch.autograd.grad(y.sum() + s.sum(), (x, g), allow_unused=True)
    assert gx.shape == x.shape
    assert gg is None or torch.equal(gg, torch.zeros_like(g))


def test_irreps_without_gates_is_identity():
    L = IrrepsLayout.of("4x0e", "mul_ir")
    x = torch.randn(3, 4)
    assert torch.equal(gate_mul(x, torch.zeros(3, 0), L), x)
    assert seg_dot(x, x, L).shape == (3, 0)


# ----------------------------------------------------------------------------- bad input
def test_wrong_feature_width():
    L = IrrepsLayout.of("2x0e+1x1o", "mul_ir")
    with pytest.raises(ValueError, match=r"last dimension must be 5, the dim of irreps 2x0e\+1x1o"):
        gate_mul(torch.randn(3, 6), torch.randn(3, 1), L)
    with pytest.raises(ValueError, match="last dimension must be 5"):
        seg_dot(torch.randn(3, 5), torch.randn(3, 4), L)


def test_wrong_gate_shape():
    L = IrrepsLayout.of("2x0e+2x1o", "mul_ir")
    with pytest.raises(ValueError, match=r"gates have shape \(3, 3\), expected \(3, 2\) \(per row\) or \(2,\)"):
        gate_mul(torch.randn(3, 8), torch.randn(3, 3), L)
    with pytest.raises(ValueError, match=r"shared gates have shape \(5,\), expected \(2,\)"):
        gate_mul(torch.randn(3, 8), torch.randn(5), L)


def test_dtype_and_device_mismatch():
    L = IrrepsLayout.of("2x0e+2x1o", "mul_ir")
    with pytest.raises(TypeError, match="x has dtype torch.float32 but gates has dtype torch.float64"):
        gate_mul(torch.randn(3, 8), torch.randn(3, 2, dtype=torch.float64), L)
    with pytest.raises(ValueError, match="x is on cpu but gates is on meta"):
        gate_mul(torch.randn(3, 8), torch.randn(3, 2, device="meta"), L)
    with pytest.raises(TypeError, match="floating-point"):
        gate_mul(torch.ones(3, 8, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64), L)
    with pytest.raises(ValueError, match=r"a has shape \(3, 8\) but b has shape \(2, 8\)"):
        seg_dot(torch.randn(3, 8), torch.randn(2, 8), L)


def test_backend_selection(monkeypatch):
    L = IrrepsLayout.of("2x0e+2x1o", "mul_ir")
    x, g = torch.randn(3, 8), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; expected one of \['auto', 'cpp', 'torch', 'triton'\]"):
        gate_mul(x, g, L, backend="cudnn")
    monkeypatch.setenv("MMEA_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        gate_mul(x, g, L)
    monkeypatch.setenv("MMEA_BACKEND", "torch")
    torch.testing.assert_close(gate_mul(x, g, L), naive_gate_mul(x, g, "2x0e+2x1o", "mul_ir").float())
    # triton asked for explicitly on CPU without the interpreter: a clear error, not a crash
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' is not available for cpu tensors"):
        gate_mul(x, g, L, backend="triton")
    # auto never fails on CPU
    monkeypatch.setenv("MMEA_BACKEND", "auto")
    torch.testing.assert_close(gate_mul(x, g, L), naive_gate_mul(x, g, "2x0e+2x1o", "mul_ir").float())


def test_auto_prefers_cpp_on_cpu(monkeypatch):
    """With MMEA_BACKEND unset, ``auto`` picks the compiled extension on CPU when it is built."""
    from mmea_kernels.ops import resolve_backend

    ok, why = backend_status("cpp", "cpu")
    if not ok:
        pytest.skip(why)
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    assert resolve_backend(None, "cpu").name == "cpp"
    assert resolve_backend("auto", "cpu").name == "cpp"


def test_gate_gradient_skipped_when_the_pass_does_not_need_it(monkeypatch):
    """Forces with trainable gates: autograd.grad(E, x) must not pay the gates' seg_dot; asking for
    the gates' gradient still computes it, with the right values."""
    from mmea_kernels.ops.gate import reference as torch_backend
    calls = []
    real = torch_backend.seg_dot
    monkeypatch.setattr(torch_backend, "seg_dot", lambda *a, **k: calls.append(1) or real(*a, **k))
    L = IrrepsLayout.of(IRREPS, "mul_ir")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, L.dim, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, L.num_gates, generator=gen, dtype=torch.float64, requires_grad=True)
    y = gate_mul(x, w.exp(), L, backend="torch")
    (gx,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
    assert calls == []
    torch.testing.assert_close(gx, 2 * naive_gate_mul(y.detach(), w.exp().detach(), IRREPS, "mul_ir"))
    (gw,) = torch.autograd.grad(y.square().sum(), w)
    assert calls == [1]
    ref = 2 * naive_seg_dot(y.detach(), x.detach(), IRREPS, "mul_ir") * w.exp().detach()
    torch.testing.assert_close(gw, ref)
