"""The MMEA gate network on the Triton kernels (ops/gate_net/triton.py; the interpreter on CPU,
CUDA where a GPU exists): values, first derivatives (the no-graph kernel backward, with and without
weight gradients) and second derivatives against the torch composition in float64; gradcheck and
gradgradcheck; several row blocks and column tiles; padded ranks; no additive / no gate columns;
row-strided inputs and output gradients; float32; MMEALinear's fused Triton path runs it."""
from unittest import mock

import pytest
import torch

from mmea_kernels.ops import backend_status
from mmea_kernels.ops.gate_net import gate_net, gate_net_reference, gate_net_status

F64 = torch.float64


@pytest.fixture(autouse=True)
def _triton(device):
    ok, why = backend_status("triton", device)
    if not ok:
        pytest.skip(why)


def make(n, s=6, r=4, a=3, g=5, dtype=F64, seed=0, strided=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).to(device)  # noqa: E731
    x0 = rnd(n, s + 7)[:, 2:2 + s] if strided else rnd(n, s)
    params = [rnd(r, s) / s ** 0.5, rnd(r), rnd(a + g, r) / r ** 0.5, 0.5 * rnd(a + g)]  # moderate γ
    return x0.detach().requires_grad_(True), [p.requires_grad_(True) for p in params], a


def tiny_blocks():
    """Blocks of 16 rows, 16 input and 16 output columns: several programs and loop trips at small sizes."""
    from mmea_kernels.ops.gate_net import triton as tr
    return mock.patch.object(tr, "_blocks", lambda n, s, o, interp: (16, 16, 16, 1))


def check_first_order(x0, params, a, phi, dadd=None, dgates=None, tol=1e-11):
    add, gates = gate_net(x0, *params, a, phi, backend="triton")
    radd, rgates = gate_net_reference(x0, *params, a, phi)
    torch.testing.assert_close(add, radd, rtol=tol, atol=tol)
    torch.testing.assert_close(gates, rgates, rtol=tol, atol=tol)
    dadd = torch.randn_like(add) if dadd is None else dadd
    dgates = torch.randn_like(gates) if dgates is None else dgates
    inputs = [x0] + [p for p in params if p.requires_grad]
    got = torch.autograd.grad((add, gates), inputs, (dadd, dgates))
    want = torch.autograd.grad((radd, rgates), inputs, (dadd, dgates))
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("phi", ["exp", "residual"])
@pytest.mark.parametrize("n,s,r,a,g,strided", [(1, 6, 4, 3, 5, False), (37, 20, 3, 7, 40, True),
                                               (50, 40, 17, 0, 20, False), (33, 9, 5, 12, 0, True)])
def test_values_and_gradients_match_torch(phi, n, s, r, a, g, strided, device):
    """Padded ranks (3, 4, 5 -> 16; 17 -> 32), no additive (a = 0) and no gate (g = 0) columns, strided
    x0; under tiny blocks: several row blocks, input-column tiles and output-column tiles."""
    x0, params, a = make(n, s, r, a, g, seed=n, strided=strided, device=device)
    check_first_order(x0, params, a, phi)
    with tiny_blocks():
        check_first_order(x0, params, a, phi)


def test_forces_pass_is_one_kernel_without_weight_gradients(device):
    """Frozen weights (the forces pass of an adapted model): only dx0, from the kernel; the additive
    alone or the gates alone used."""
    x0, params, a = make(40, seed=3, device=device)
    for p in params:
        p.requires_grad_(False)
    from mmea_kernels.ops.gate_net import triton as tr
    calls = []
    real = tr.triton_gate_net_bwd

    def spy(*args):
        calls.append(args[-2:])  # (need_x, need_w)
        return real(*args)
    with mock.patch.object(tr, "triton_gate_net_bwd", spy):
        check_first_order(x0, params, a, "exp")
        for k in (0, 1):  # the additive alone, then the gates alone
            out = gate_net(x0, *params, a, backend="triton")[k]
            ref = gate_net_reference(x0, *params, a)[k]
            torch.testing.assert_close(torch.autograd.grad(out.sum(), x0)[0], torch.autograd.grad(ref.sum(), x0)[0],
                                       rtol=1e-12, atol=1e-12)
    assert calls and all(c == (True, False) for c in calls)


def test_row_strided_output_gradients(device):
    """dadd arrives as a column slice of the fused linear's dy."""
    x0, params, a = make(30, seed=6, device=device)
    wide = torch.randn(30, 20, dtype=F64, device=device)
    dadd, dg = wide[:, 1:1 + a], wide[:, 9:14]
    assert not dadd.is_contiguous()
    check_first_order(x0, params, a, "exp", dadd, dg)


@pytest.mark.parametrize("phi", ["exp", "residual"])
def test_second_derivatives_match_torch(phi, device):
    x0, params, a = make(25, seed=1, device=device)
    inputs = [x0] + params
    vals = []
    for fn in (lambda *t: gate_net(*t, a, phi, backend="triton"), lambda *t: gate_net_reference(*t, a, phi)):
        add, gates = fn(x0, *params)
        e = add.sin().sum() + (gates * gates.cos()).sum()
        (dx0,) = torch.autograd.grad(e, x0, create_graph=True)
        vals.append(torch.autograd.grad((dx0 ** 2).sum(), inputs))
    for u, v in zip(*vals):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_gradgradcheck(device):
    x0, params, a = make(5, s=3, r=2, a=2, g=3, seed=2, strided=True, device=device)
    fn = lambda *t: gate_net(*t, a, "exp", backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x0] + params)
    assert torch.autograd.gradgradcheck(fn, [x0] + params)


def test_float32_matches_float64_reference(device):
    x0, params, a = make(70, dtype=torch.float32, seed=4, device=device)
    add, gates = gate_net(x0, *params, a, backend="triton")
    radd, rgates = gate_net_reference(x0.double(), *(p.double() for p in params), a)
    torch.testing.assert_close(add.double(), radd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gates.double(), rgates, rtol=1e-5, atol=1e-5)


def test_what_it_refuses(device):
    x0, params, a = make(4, device=device)
    assert not gate_net_status("triton", x0.half(), 4)[0]
    ok, why = gate_net_status("triton", x0, 33)
    assert not ok and "ranks up to 32" in why
    with pytest.raises(RuntimeError, match="triton backend cannot run"):
        gate_net(x0.half(), *(p.half() for p in params), a, backend="triton")


def test_mmea_linear_fused_triton_path_runs_the_gate_net_kernels(device):
    """MMEALinear with backend='triton': the gate net is the Triton op (forward and backward), and the
    layer equals the unfused torch path in values and in input and adapter gradients."""
    from e3nn import o3
    from mmea_kernels import MMEALinear
    from mmea_kernels.ops.gate_net import triton as tr
    torch.manual_seed(0)
    lin = o3.Linear("3x0e+2x1o", "3x0e+2x1o+1x2e").to(F64)
    plain = MMEALinear(lin, rank=3, backend="torch")
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    fused = MMEALinear(o3.Linear("3x0e+2x1o", "3x0e+2x1o+1x2e").to(F64), rank=3, backend="triton").to(device)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(7, lin.irreps_in.dim, dtype=F64, requires_grad=True)
    xd = x.detach().to(device).requires_grad_()
    params = lambda ad: [p for n, p in ad.named_parameters() if not n.startswith("base.")]  # noqa: E731
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = tr.triton_gate_net_fwd, tr.triton_gate_net_bwd

    def count(name, fn):
        def f(*args):
            calls[name] += 1
            return fn(*args)
        return f
    with mock.patch.object(tr, "triton_gate_net_fwd", count("fwd", fwd)), \
            mock.patch.object(tr, "triton_gate_net_bwd", count("bwd", bwd)):
        y = fused(xd)
        got = torch.autograd.grad((y * y.cos()).sum(), [xd] + params(fused))
    assert calls == {"fwd": 1, "bwd": 1}
    y_ref = plain(x)
    want = torch.autograd.grad((y_ref * y_ref.cos()).sum(), [x] + params(plain))
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-11, atol=1e-11)
    for u, v in zip(got, want):
        torch.testing.assert_close(u.cpu(), v, rtol=1e-10, atol=1e-10)
