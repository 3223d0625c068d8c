"""The kernels at extreme and non-finite values, against torch's own functions (a review of numerical
robustness): the C++ exp under the MMEA gate and FusedGate's sigmoid/silu was clamped to the normal
range, so a gate exp(γ) stuck at exp(88) ≈ 1.7e38 in float32 (finite and wrong where the exact gate
is 9.5e37 or overflows), sigmoid(-1e4) was 1e-38 instead of 0 and silu(-inf) was -inf instead of
NaN; the torch backend's seg_dot backward turned an inf in a 0e column into NaN gradients where the
gradient is exactly 0; the C++ shared seg_dot summed its 64-row partials in float32 (error growing
with N)."""
import os

import pytest
import torch
from e3nn import nn as enn
from e3nn import o3

import mmea_kernels as mk
from mmea_kernels import IrrepsLayout, seg_dot

from helpers import CPP_DEVICES  # noqa: F401  (the cpp backend: skipped where it is not built)


def _need_cpp():
    from mmea_kernels.ops.gated_linear import cpp_status

    ok, why = cpp_status("cpu")
    if not ok:
        pytest.skip(why)


def _same_nonfinite(a, b):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)) and torch.equal(torch.isneginf(a), torch.isneginf(b))


def _same_nonfinite_and_close(a, b, rtol, atol=0.0):
    _same_nonfinite(a, b)
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=atol)


GAMMAS = {torch.float32: [-200.0, -104.0, -103.5, -100.0, -88.0, -87.5, 0.5, 88.0, 88.5, 88.7, 88.8, 95.0],
          torch.float64: [-800.0, -746.0, -745.0, -720.0, -709.0, 0.5, 709.0, 709.7, 709.9, 800.0]}


def _adapter(dtype):
    lin = o3.Linear("4x0e+2x1o", "2x0e+3x1o+1x2e").to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)))
    return mk.MMEALinear(lin, rank=2), torch.randn(5, lin.irreps_in.dim, dtype=dtype,
                                                    generator=torch.Generator().manual_seed(0))


def _set_logits(ad, g):
    with torch.no_grad():  # W_up = 0: every gate logit is the bias
        ad.mmea_up.weight.zero_()
        ad.mmea_up.bias.zero_()
        ad.mmea_up.bias[2:] = g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_gate_net_overflows_and_underflows_as_torch_exp_does(dtype):
    """The gates of the C++ gate net equal torch.exp of the logits at both ends: inf above log(max),
    denormals, then 0 below (float32: 88.7 -> 3.3e38 finite, 88.8 -> inf, -103.5 -> denormal)."""
    _need_cpp()
    ad, x = _adapter(dtype)
    tiny = torch.finfo(dtype).tiny
    for g in GAMMAS[dtype]:
        _set_logits(ad, g)
        with torch.no_grad():
            _, gates = ad.gate_parameters(x, fused_net="cpp")
        want = torch.exp(torch.full_like(gates, g))
        _same_nonfinite_and_close(gates, want, rtol=1e-5 if abs(want[0, 0]) >= tiny else 0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adapter_output_with_huge_and_tiny_gates_equals_the_torch_path(dtype):
    """The whole fused C++ layer against the unfused torch path at gates far from the float limits
    and past them: the same infs and NaNs (0 · inf on an output with no path from the input),
    forward and input gradient."""
    _need_cpp()
    fused, x = _adapter(dtype)
    ref = mk.MMEALinear(fused.base, rank=2, backend="torch")
    assert fused.fused_kernel(x) == "cpp"
    for g in ([-200.0, -100.0, 0.5, 80.0, 95.0] if dtype == torch.float32 else [-800.0, -700.0, 0.5, 700.0, 800.0]):
        _set_logits(fused, g)
        ref.load_state_dict(fused.state_dict())
        outs = []
        for ad in (fused, ref):
            xi = x.clone().requires_grad_()
            y = ad(xi)
            (gx,) = torch.autograd.grad(y.nan_to_num(0.0, 1.0, -1.0).sum(), xi)
            outs.append((y.detach(), gx))
        # Both paths sum the same terms in different orders: a sum of n terms may be off by about
        # n·eps·Σ|term| however small the result (cancellation), so the bound is taken from the
        # terms' magnitudes, not from the result alone (an rtol alone failed 12 of 300 weight draws).
        y_scale, gx_scale = _term_magnitudes(fused.base, x, g, torch.isfinite(outs[1][0]))
        _same_nonfinite_within(outs[0][0], outs[1][0], y_scale, rtol=1e-5)
        _same_nonfinite_within(outs[0][1], outs[1][1], gx_scale, rtol=1e-4)


def _term_magnitudes(lin, x, g, finite_y):
    """Σ|term| of every output element and of every input-gradient element, in float64: the base
    layer as a matrix (each entry one weight times its path norm; e3nn's Linear adds no two paths
    into one element), the gates exp(g) on the non-scalar columns (W_up = 0), 1 on the 0e ones;
    the gradient sums only over the outputs that nan_to_num lets through (the finite ones)."""
    with torch.no_grad():
        dense = lin(torch.eye(lin.irreps_in.dim, dtype=x.dtype)).double().abs()  # [in, out]
    n0 = lin.irreps_out.count("0e")
    gate = torch.ones(lin.irreps_out.dim, dtype=torch.float64)
    gate[n0:] = torch.exp(torch.tensor(g, dtype=torch.float64))
    y_scale = (x.double().abs() @ dense) * gate
    gx_scale = (finite_y.double() * gate) @ dense.T
    return y_scale, gx_scale


def _same_nonfinite_within(a, b, scale, rtol):
    """a equals b where b is not finite; elsewhere |a - b| <= rtol·|b| + 16·eps·scale + tiny."""
    _same_nonfinite(a, b)
    fin = torch.isfinite(b)
    info = torch.finfo(a.dtype)
    err = (a[fin].double() - b[fin].double()).abs()
    bound = rtol * b[fin].double().abs() + 16 * info.eps * scale[fin] + info.tiny  # tiny: denormals
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err - bound))
        raise AssertionError(f"|a - b| = {err[worst]:.3g} > {bound[worst]:.3g} at finite element {worst}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_gate_activations_at_extreme_and_non_finite_inputs_equal_e3nn(dtype):
    _need_cpp()
    values = [-1e4, -800.0, -746.0, -710.0, -104.0, -90.0, -88.0, 0.0, 20.0, 88.7, 88.8, 100.0, 709.8, 1e4,
              float("inf"), float("-inf"), float("nan")]
    v = torch.tensor(values, dtype=dtype)
    for act in (torch.sigmoid, torch.nn.functional.silu):
        gate = enn.Gate("1x0e", [act], "1x0e", [act], "1x1o")
        fg = mk.FusedGate.from_module(gate, backend="cpp")
        inp = torch.stack([v, v.flip(0), torch.ones_like(v), torch.ones_like(v), torch.ones_like(v)], 1)
        with torch.no_grad():
            _same_nonfinite_and_close(fg(inp), gate(inp), rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_seg_dot_gradients_of_0e_columns_are_zero_even_next_to_inf(backend):
    """seg_dot's gradients are gate_mul with the 0e columns zeroed: exactly 0 there, also when the
    other operand holds an inf or NaN in that column (0 · inf would be NaN; the Triton kernel
    multiplied by 0 until a GPU-readiness review)."""
    if backend == "cpp":
        _need_cpp()
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton kernels on CPU tensors need TRITON_INTERPRET=1")
    L = IrrepsLayout.of("2x0e+1x1o", "mul_ir")
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        a[0, 0], a[1, 1] = float("inf"), float("nan")
    b.requires_grad_()
    s = seg_dot(a, b, L, backend=backend)
    (gb,) = torch.autograd.grad(s.sum(), b, create_graph=True)
    assert torch.equal(gb[:, :2], torch.zeros(3, 2, dtype=torch.float64))
    torch.testing.assert_close(gb[2, 2:], a[2, 2:].detach(), rtol=0, atol=0)


def test_shared_seg_dot_in_float32_stays_at_round_off_for_millions_of_rows():
    """The sum over 4M rows of positive products: within 2 float32 ulps of the float64 sum, as torch's
    pairwise sum (the 64-row partials were added in float32, ~5 ulps here and ~30 at 16M rows)."""
    _need_cpp()
    L = IrrepsLayout.of("1x0e+1x1o", "mul_ir")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4_000_000, 4, generator=g), torch.rand(4_000_000, 4, generator=g)
    ref = (a[:, 1:].double() * b[:, 1:].double()).sum()
    got = seg_dot(a, b, L, shared=True, backend="cpp")
    assert abs(float(got) - float(ref)) / float(ref) < 2 * torch.finfo(torch.float32).eps
