"""The MMEA gate network on the C++ kernels (csrc/gate_net.cpp, ops/gate_net): values, first
derivatives (the no-graph kernel backward) and second derivatives (the create_graph formulas)
against the torch composition in float64; gradcheck and gradgradcheck; row tiles, weight-gradient
splits and their independence of the thread count; strided inputs; bad input."""
import pytest
import torch

from mmea_kernels.ops.gate_net import gate_net, gate_net_cpp_status, gate_net_reference

_OK, _WHY = gate_net_cpp_status(torch.zeros(1, 1))
if not _OK:
    pytest.skip(_WHY, allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def make(n, s=6, r=4, a=3, g=5, dtype=F64, seed=0, strided=False):
    """x0 [n, s] (a column slice of a wider matrix when strided) and the net's weights, all needing grads."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    if strided:
        x0 = rnd(n, s + 7)[:, 2:2 + s].detach().requires_grad_(True)
    else:
        x0 = rnd(n, s).requires_grad_(True)
    params = [rnd(r, s), rnd(r), 0.5 * rnd(a + g, r), 0.5 * rnd(a + g)]
    return x0, [p.requires_grad_(True) for p in params], a


@pytest.mark.parametrize("phi", ["exp", "residual"])
@pytest.mark.parametrize("n,strided", [(1, False), (300, True), (1100, False), (40000, False)])
def test_values_and_gradients_match_torch(phi, n, strided):
    """n = 300: one partial tile; n = 1100: three weight-gradient splits; n = 40000: more row tiles
    than the 64 splits (a split then spans several tiles)."""
    x0, params, a = make(n, strided=strided)
    add, gates = gate_net(x0, *params, a, phi, backend="cpp")
    radd, rgates = gate_net_reference(x0, *params, a, phi)
    torch.testing.assert_close(add, radd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gates, rgates, rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(1)  # not the global RNG: the same draws in any test order
    dadd = torch.randn(add.shape, generator=gen, dtype=F64)
    dg = torch.randn(gates.shape, generator=gen, dtype=F64)
    inputs = [x0] + params
    got = torch.autograd.grad((add, gates), inputs, (dadd, dg))
    want = torch.autograd.grad((radd, rgates), inputs, (dadd, dg))
    for name, u, v in zip(("x0", "w_down", "b_down", "w_up", "b_up"), got, want):
        # weight gradients are sums over n rows of terms up to ~1e4 (exp gates) with both signs: an
        # element that cancels to near 0 carries the rounding of its large terms, so the error is
        # measured against the largest element (float64 round-off: ~1e-15 of it)
        err = ((u - v).abs().max() / v.abs().max()).item()
        assert err <= 1e-12, (name, err)


@pytest.mark.parametrize("phi", ["exp", "residual"])
def test_second_derivatives_match_torch(phi):
    """Force-training shape: a scalar of the outputs, its gradient in x0 with create_graph, and the
    gradient of a loss of that gradient in every input."""
    x0, params, a = make(200, seed=1)
    inputs = [x0] + params
    vals = []
    for fn in (lambda *t: gate_net(*t, a, phi, backend="cpp"), lambda *t: gate_net_reference(*t, a, phi)):
        add, gates = fn(x0, *params)
        e = (add.sin().sum() + (gates * gates.cos()).sum())
        (dx0,) = torch.autograd.grad(e, x0, create_graph=True)
        vals.append(torch.autograd.grad((dx0 ** 2).sum(), inputs))
    for name, u, v in zip(("x0", "w_down", "b_down", "w_up", "b_up"), *vals):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("phi", ["exp", "residual"])
def test_gradcheck_and_gradgradcheck(phi):
    x0, params, a = make(5, s=3, r=2, a=2, g=3, seed=2, strided=True)
    fn = lambda *t: gate_net(*t, a, phi, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x0] + params)
    assert torch.autograd.gradgradcheck(fn, [x0] + params)


def test_one_output_used_and_partial_needs():
    """Only the gates used (dadd absent), only x0 needing a gradient; and only the additive used."""
    x0, params, a = make(140, seed=3)
    for p in params:
        p.requires_grad_(False)
    _, gates = gate_net(x0, *params, a, backend="cpp")
    _, rg = gate_net_reference(x0, *params, a)
    (g1,) = torch.autograd.grad(gates.sum(), x0)
    (g2,) = torch.autograd.grad(rg.sum(), x0)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    params[0].requires_grad_(True)
    add, _ = gate_net(x0, *params, a, backend="cpp")
    radd, _ = gate_net_reference(x0, *params, a)
    got = torch.autograd.grad(add.sum(), [x0, params[0]])
    want = torch.autograd.grad(radd.sum(), [x0, params[0]])
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_float32_matches_float64_reference():
    x0, params, a = make(700, dtype=torch.float32, seed=4)
    add, gates = gate_net(x0, *params, a, backend="cpp")
    radd, rgates = gate_net_reference(x0.double(), *(p.double() for p in params), a)
    torch.testing.assert_close(add.double(), radd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gates.double(), rgates, rtol=1e-5, atol=1e-5)


def test_weight_gradients_do_not_depend_on_threads():
    x0, params, a = make(1500, seed=5)
    out = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            add, gates = gate_net(x0, *params, a, backend="cpp")
            out.append(torch.autograd.grad((add.sum() + gates.sum()), params))
    finally:
        torch.set_num_threads(prev)
    for u, v in zip(*out):
        assert torch.equal(u, v)


@pytest.mark.parametrize("n", [5, 17, 1025, 3000])
def test_values_and_gradients_are_bitwise_the_same_on_one_and_two_threads(n):
    """MKL's GEMM gives rows other bits on two threads than on one, and in a GEMM of another height:
    small inputs (run serially) at n = 5, 17 differed by 7e-16 when BLAS ran on the session's
    threads, and n = 1025 by 7e-15 when the forward cut its rows per thread."""
    x0, params, a = make(n, s=6, r=7, a=4, g=23, seed=11)
    out = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            add, gates = gate_net(x0, *params, a, backend="cpp", phi="residual")
            loss = (add.sin() * add).sum() + (gates * gates.cos()).sum()
            out.append((add, gates) + torch.autograd.grad(loss, [x0] + params))
    finally:
        torch.set_num_threads(prev)
    for name, u, v in zip(["add", "gates", "dx0", "dw_down", "db_down", "dw_up", "db_up"], *out):
        assert torch.equal(u, v), (name, (u - v).abs().max().item())


def test_bad_input_is_named():
    x0, params, a = make(4)
    with pytest.raises(RuntimeError, match="w_down must be"):
        gate_net(x0, params[0][:, :-1], *params[1:], a, backend="cpp")
    with pytest.raises(RuntimeError, match="b_up must be"):
        gate_net(x0, *params[:3], params[3][:-1], a, backend="cpp")
    with pytest.raises(RuntimeError, match="dtype"):
        gate_net(x0, params[0].float(), *params[1:], a, backend="cpp")
    with pytest.raises(RuntimeError, match="num_additive"):
        gate_net(x0, *params, 100, backend="cpp")
    with pytest.raises(ValueError, match="unknown phi"):
        gate_net(x0, *params, a, "cube")
    with pytest.raises(ValueError, match="2-D"):
        gate_net(x0[0], *params, a)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        gate_net(x0.half(), *(p.half() for p in params), a, backend="cpp")


def test_backward_reads_row_strided_output_gradients():
    """dadd arrives as a column slice of the fused linear's dy: the kernel reads it (and dgates) in
    place, with the same result as from contiguous copies."""
    x0, params, a = make(600, seed=6)
    with torch.no_grad():
        _, gates = gate_net(x0, *params, a, backend="cpp")
        wide = torch.randn(600, 20, dtype=F64)
        dadd, dg = wide[:, 1:1 + a], wide[:, 9:9 + gates.shape[1]]
        op = torch.ops.mmea_kernels_ext.gate_net_bwd
        got = op(x0, params[0], params[1], params[2], gates, dadd, dg, a, 0, True, True)
        want = op(x0, params[0], params[1], params[2], gates, dadd.contiguous(), dg.contiguous(), a, 0, True, True)
    assert not dadd.is_contiguous()
    for u, v in zip(got, want):
        assert torch.equal(u, v)
    radd, rgates = gate_net_reference(x0, *params, a)
    ref = torch.autograd.grad((radd, rgates), [x0] + params, (dadd, dg))
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-11, atol=1e-11)


def test_no_graph_calls_run_the_kernel_without_an_autograd_node():
    """With grad mode off, or nothing that needs a gradient, gate_net is the forward kernel alone
    (no autograd node: tens of µs of host time per call at MD sizes), with the same values; with a
    gradient needed it is the differentiable node."""
    x0, params, a = make(37)
    want = gate_net(x0, *params, a, "exp", backend="cpp")
    assert all(t.grad_fn is not None for t in want)
    with torch.no_grad():
        got = gate_net(x0, *params, a, "exp", backend="cpp")
    frozen = gate_net(x0.detach(), *[p.detach() for p in params], a, "exp", backend="cpp")
    for out in (got, frozen):
        assert all(t.grad_fn is None and not t.requires_grad for t in out)
        for g, w in zip(out, want):
            torch.testing.assert_close(g, w.detach(), rtol=0, atol=0)
