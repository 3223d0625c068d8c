"""The fused MMEA adapter as one autograd node (``ops/gated_linear/adapter.py``), on the C++ kernels
(CPU) and the Triton kernels (the interpreter on CPU, CUDA where a GPU exists): values, gradients
in every tensor input and second derivatives (force training) against an independent float64
reference, the gate net's torch composition feeding ``gated_linear_reference``; gradcheck and
gradgradcheck; both layouts, both gate functions, outputs with and without 0e channels or gated
blocks; a backward
that needs only some inputs skips the rest; and ``MMEALinear`` builds this one node where a graph is
built, and the composition (or no node) elsewhere."""
import pytest
import torch
from e3nn import o3

from mmea_kernels import MMEALinear
from mmea_kernels.linear_spec import LinearSpec
from mmea_kernels.ops import backend_status
from mmea_kernels.ops.gate_net import gate_net_reference, gate_net_status
from mmea_kernels.ops.gated_linear import adapter, gated_linear_reference

from helpers import CPP_DEVICES, TRITON_DEVICES, assert_gradchecks, randomise

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
# two 0e input blocks (one contiguous span), odd parity, l = 2; a 0e output block with a bias
IRR_IN, IRR_OUT = "3x0e+2x0e+2x1o+1x2e+1x0o", "4x0e+3x1o+2x2e+2x0o"
CASES = [pytest.param(be, d.values[0], id=f"{be}-{d.id}", marks=d.marks)
         for be, devices in (("cpp", CPP_DEVICES), ("triton", TRITON_DEVICES)) for d in devices]


def _skip_unless(backend, device):
    if backend == "cpp" and torch.device(device).type != "cpu":
        pytest.skip("the C++ fused linear runs on cpu tensors")
    ok, why = backend_status(backend, device)
    if not ok or not gate_net_status(backend, torch.zeros(1, 1, dtype=F64, device=device), 4)[0]:
        pytest.skip(why or f"no {backend} gate-net kernels")


def make(irr_in=IRR_IN, irr_out=IRR_OUT, layout="mul_ir", n=6, rank=3, seed=0, device="cpu"):
    """(x, weight, bias, w_down, b_down, w_up, b_up), every tensor needing a gradient; the number of
    additive terms, the 0e input span and the spec."""
    gen = torch.Generator().manual_seed(seed)
    lin = o3.Linear(irr_in, irr_out, biases=True)
    spec = LinearSpec.from_e3nn(lin).with_layout(layout)
    start, count = spec.in_layout.scalar_span
    a, g = spec.out_layout.num_scalars, spec.out_layout.num_gates
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64)  # noqa: E731
    tensors = [rnd(n, spec.dim_in), rnd(spec.weight_numel), rnd(spec.bias_numel), rnd(rank, count) / count ** 0.5,
               rnd(rank), 0.5 * rnd(a + g, rank) / rank ** 0.5, 0.5 * rnd(a + g)]
    return [t.to(device).requires_grad_(True) for t in tensors], a, (start, count), spec


def reference(x, weight, bias, w_down, b_down, w_up, b_up, a, span, spec, phi):
    add, gates = gate_net_reference(x[:, span[0]:span[0] + span[1]], w_down, b_down, w_up, b_up, a, phi)
    return gated_linear_reference(x, weight, bias, gates, add if a > 0 else None, spec)


def fused(backend, phi):
    def run(x, weight, bias, w_down, b_down, w_up, b_up, a, span, spec):
        return adapter.mmea_adapter_fused(x, weight, bias, w_down, b_down, w_up, b_up, a, phi, *span, spec, backend)
    return run


def force_training(fn, tensors, *consts):
    """A scalar energy of the output, its x-gradient with create_graph (the forces), and the gradient
    of a loss of the forces in every input (what a force-training step differentiates)."""
    x = tensors[0]
    y = fn(*tensors, *consts)
    energy = (y.tanh() * y).sum() + (x ** 3).sum()  # x also feeds another op
    (fx,) = torch.autograd.grad(energy, x, create_graph=True)
    return [y, fx] + list(torch.autograd.grad((fx ** 2).sum(), tensors))


@pytest.mark.parametrize("phi", ["exp", "residual"])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("backend,device", CASES)
def test_values_gradients_and_second_derivatives_match_reference(backend, device, layout, phi):
    _skip_unless(backend, device)
    tensors, a, span, spec = make(layout=layout, n=21, device=device)
    got = force_training(fused(backend, phi), tensors, a, span, spec)
    want = force_training(lambda *t: reference(*t, phi), tensors, a, span, spec)
    names = ("y", "forces", "x", "weight", "bias", "w_down", "b_down", "w_up", "b_up")
    for name, u, v in zip(names, got, want):
        err = ((u - v).abs().max() / v.abs().max()).item()  # sums of terms of both signs: relative to the largest
        assert err <= 1e-12, (name, err)


# with and without 0e outputs (additive terms), and with no gated output (as MACE's scalar linears)
@pytest.mark.parametrize("irr_out", [IRR_OUT, "3x1o+1x0o", "3x0e+1x0e"])
@pytest.mark.parametrize("backend,device", CASES)
def test_gradcheck_and_gradgradcheck(backend, device, irr_out):
    _skip_unless(backend, device)
    tensors, a, span, spec = make("1x1o+2x0e+1x0o", irr_out, n=3, rank=2, seed=1, device=device)
    assert span == (3, 2)  # the 0e columns after an l = 1 block
    run = fused(backend, "exp")
    assert_gradchecks(lambda *t: run(*t, a, span, spec), tensors, device, interpreted_triton=backend == "triton")


@pytest.mark.parametrize("backend,device", CASES)
def test_partial_needs(backend, device, monkeypatch):
    """dE/dx alone (inference forces) runs the gate net's backward without its weight gradients and
    no weight-gradient kernel; the adapter weights alone (x without a gradient) give the reference's
    gradients."""
    _skip_unless(backend, device)
    import mmea_kernels.ops.gate_net.function as gnf
    tensors, a, span, spec = make(n=9, seed=2, device=device)
    run = fused(backend, "exp")
    calls = []
    real = gnf._kernels

    def spied(be):
        fwd, bwd = real(be)
        return fwd, lambda *args: calls.append(args[-2:]) or bwd(*args)
    monkeypatch.setattr(gnf, "_kernels", spied)
    monkeypatch.setattr(adapter, "_gate_net_kernels", spied)
    x = tensors[0]
    (gx,) = torch.autograd.grad((run(*tensors, a, span, spec) ** 2).sum(), x)
    (rx,) = torch.autograd.grad((reference(*tensors, a, span, spec, "exp") ** 2).sum(), x)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    assert calls == [(True, False)]  # need_x, need_w
    frozen_x = x.detach()
    params = tensors[3:]
    got = torch.autograd.grad(run(frozen_x, *tensors[1:], a, span, spec).sum(), params)
    want = torch.autograd.grad(reference(frozen_x, *tensors[1:], a, span, spec, "exp").sum(), params)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    assert calls[1:] == [(False, True)]


def _node_names(y):
    names, stack, seen = [], [y.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        stack.extend(g for g, _ in f.next_functions)
    return names


def test_mmea_linear_builds_one_node_where_a_graph_is_built():
    """The adapted layer on the C++ path: with trainable gates one custom node (no split, gate-net or
    saved-output nodes) and the unfused path's values, input gradient and force-training gradients;
    without a graph no node; with a frozen gate net on features without a gradient (a graph only for
    a trainable base weight) the fused linear's own node, not this one."""
    _skip_unless("cpp", "cpu")
    lin = o3.Linear(IRR_IN, IRR_OUT).double()
    plain = MMEALinear(lin, rank=3, backend="torch")
    randomise(plain)
    ad = MMEALinear(lin, rank=3, backend="cpp")
    ad.load_state_dict(plain.state_dict())
    for p in lin.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, lin.irreps_in.dim, dtype=F64, requires_grad=True)
    y = ad(x)
    custom = [n for n in _node_names(y) if not n.endswith(("ViewBackward0", "AccumulateGrad", "TBackward0"))]
    assert custom == ["_AdapterFnBackward"], custom
    params = [p for n, p in ad.named_parameters() if p.requires_grad]
    got = force_training(lambda t, *_: ad(t), [x] + params)
    want = force_training(lambda t, *_: plain(t), [x] + [p for p in plain.parameters() if p.requires_grad])
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-11, atol=1e-11)
    with torch.no_grad():
        assert ad(x).grad_fn is None
    ad.requires_grad_(False)  # frozen gates on constant features; a graph only for the base weight
    lin.weight.requires_grad_(True)
    names = _node_names(ad(x.detach()))
    assert "_GatedLinearFnBackward" in names and "_AdapterFnBackward" not in names, names


def test_two_dimensional_input_has_no_view_nodes():
    """Rows given as a 2-D tensor go into the node as they are: the output's grad_fn is the node
    itself (no reshape views and their backward nodes around it, which cost host time per call at
    MD sizes); other shapes come back in their own shape."""
    _skip_unless("cpp", "cpu")
    ad = MMEALinear(o3.Linear(IRR_IN, IRR_OUT).double(), rank=3, backend="cpp")
    x = torch.randn(5, ad.base.irreps_in.dim, dtype=F64, requires_grad=True)
    y = ad(x)
    assert type(y.grad_fn).__name__ == "_AdapterFnBackward" and y.shape == (5, ad.base.irreps_out.dim)
    y3 = ad(x.reshape(5, 1, -1))
    assert y3.shape == (5, 1, ad.base.irreps_out.dim)
    torch.testing.assert_close(y3.reshape(5, -1), y, rtol=0, atol=0)


def test_swapped_and_parametrized_weights_are_read_on_every_call():
    """The one-node path reads its operands from the modules on every call (no cached tensors):
    ``torch.func.functional_call`` with other adapter and base weights gives what loading those
    weights gives, and a parametrization of an adapter weight (a property, not an entry of the
    module's parameter dict) is applied."""
    _skip_unless("cpp", "cpu")
    from torch.nn.utils import parametrize

    lin = o3.Linear(IRR_IN, IRR_OUT).double()
    ad = MMEALinear(lin, rank=3, backend="cpp")
    randomise(ad)
    x = torch.randn(4, lin.irreps_in.dim, dtype=F64, requires_grad=True)
    ad(x)  # the plan is made and cached
    gen = torch.Generator().manual_seed(7)
    other = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in ad.named_parameters()}
    got = torch.func.functional_call(ad, other, (x,))
    ref = MMEALinear(o3.Linear(IRR_IN, IRR_OUT).double(), rank=3, backend="torch")
    ref.load_state_dict(other, strict=False)
    torch.testing.assert_close(got, ref(x), rtol=1e-12, atol=1e-12)
    assert type(got.grad_fn).__name__ == "_AdapterFnBackward"

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2.0 * w

    ref = MMEALinear(lin, rank=3, backend="torch")
    ref.load_state_dict(ad.state_dict())
    with torch.no_grad():
        ref.mmea_up.weight.mul_(2.0)
    parametrize.register_parametrization(ad.mmea_up, "weight", Doubled())
    y = ad(x)
    assert type(y.grad_fn).__name__ == "_AdapterFnBackward"
    torch.testing.assert_close(y, ref(x), rtol=1e-12, atol=1e-12)
