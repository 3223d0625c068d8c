"""Fused linear + gate on the C++ kernels (``backend="cpp"``: csrc/gated_linear.cpp under the closed
autograd of ops/gated_linear/function.py): parity with ``o3.Linear`` + an explicit gate and with
``gated_linear_reference`` in values, gradients and second derivatives (float64, and float32 at its
tolerance), both layouts, per-row and shared gates, prologue gates; gradcheck and gradgradcheck;
channel tiles and row splits (the weight gradient the same for 1 and 2 threads); bad input; the
backend selection. Every test checks that the C++ kernels ran (the ``spy`` fixture).
``MMEALinear`` running this path by default on CPU is tested in tests/nn/test_modules.py and
tests/integrations/test_cueq.py.
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmea_kernels.linear_spec import LinearSpec
from mmea_kernels.ops import gate_mul
from mmea_kernels.ops.gated_linear import (_core, cpp_status, function, gated_linear, gated_linear_reference,
                                           kernel_backend)
from mmea_kernels.ops.gated_linear.cpp_kernels import cpp_forward, cpp_forward_u, cpp_tables, cpp_wgrad
from mmea_kernels.ops.gated_linear.tables import linear_tables

from helpers import GL_FIXED, GL_GRAD_CASES, TOL, check_parity, grad_inputs, irreps_string

_OK, _WHY = cpp_status("cpu")
if not _OK:
    pytest.skip(_WHY, allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64

# several instructions into one output block (2x0e, 1x0e -> 3x0e), odd parity (0o), an output block
# no instruction feeds (1x1e), l = 2, and a bias on the 0e output
IRR_IN, IRR_OUT = "2x0e+1x0e+2x1o+1x2e+1x0o", "3x0e+2x1o+1x2e+1x1e+2x0o"


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the C++ kernels (function.py looks them up per call); ``fwd_u``: the forward
    that also writes the pre-gate output."""
    calls = {"fwd": 0, "fwd_u": 0, "wgrad": 0}

    def fwd(*a):
        calls["fwd"] += 1
        return cpp_forward(*a)

    def fwd_u(*a):
        calls["fwd_u"] += 1
        return cpp_forward_u(*a)

    def wgrad(*a):
        calls["wgrad"] += 1
        return cpp_wgrad(*a)

    monkeypatch.setattr(function, "cpp_forward", fwd)
    monkeypatch.setattr(function, "cpp_forward_u", fwd_u)
    monkeypatch.setattr(function, "cpp_wgrad", wgrad)
    return calls


def core_reference(x, w, b, g_pre, g_post, add, spec):
    """``G_post ⊙ L_W(G_pre ⊙ x) + bias + additive`` in plain torch."""
    if g_pre is not None:
        x = gate_mul(x, g_pre, spec.in_layout, backend="torch")
    return gated_linear_reference(x, w, b, g_post, add, spec)


def core_inputs(layout, shared, pre, n=5, seed=0, dtype=F64, irr_in=IRR_IN, irr_out=IRR_OUT):
    spec = LinearSpec.e3nn_default(irr_in, irr_out, layout, biases=True)
    gen = torch.Generator().manual_seed(seed)

    def mk(*shape, pos=False):
        t = torch.rand(*shape, generator=gen, dtype=F64) + 0.5 if pos else torch.randn(*shape, generator=gen, dtype=F64)
        return t.to(dtype).requires_grad_()

    lead = () if shared else (n,)
    gi, go, s = spec.in_layout.num_gates, spec.out_layout.num_gates, spec.out_layout.num_scalars
    leaves = [mk(n, spec.dim_in), mk(spec.weight_numel), mk(spec.bias_numel),
              mk(*lead, gi, pos=True) if pre else None, mk(*lead, go, pos=True), mk(*lead, s)]
    return spec, leaves


def all_orders(fn, leaves):
    """(y, first gradients with create_graph, second derivatives of the force-training pattern)."""
    live = [t for t in leaves if t is not None]
    y = fn(*leaves)
    g1 = torch.autograd.grad(y.sin().sum(), live, create_graph=True)
    g2 = torch.autograd.grad(sum((t * t).sum() for t in g1), live)
    return (y,) + g1 + g2


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("irr_in,irr_out,layout,gate_mode,add_mode,bias", GL_FIXED)
def test_parity_fixed_float64(irr_in, irr_out, layout, gate_mode, add_mode, bias, spy):
    check_parity(irr_in, irr_out, layout, 21, F64, gate_mode, add_mode, bias, 0, backends=("cpp",))
    assert spy["fwd"] == 2


@pytest.mark.parametrize("irr_in,irr_out,layout,gate_mode,add_mode,bias", GL_FIXED)
def test_parity_fixed_float32(irr_in, irr_out, layout, gate_mode, add_mode, bias, spy):
    check_parity(irr_in, irr_out, layout, 9, torch.float32, gate_mode, add_mode, bias, 1, backends=("cpp",))
    assert spy["fwd"] == 2


block_st = st.tuples(st.sampled_from([0, 1, 2, 3, 5]), st.integers(0, 2), st.sampled_from(["e", "o"]))


@settings(max_examples=25, deadline=None)
@given(blocks_in=st.lists(block_st, min_size=1, max_size=4), blocks_out=st.lists(block_st, min_size=1, max_size=4),
       layout=st.sampled_from(["mul_ir", "ir_mul"]), n=st.integers(0, 19),
       gate_mode=st.sampled_from([None, "row", "shared"]), add_mode=st.sampled_from([None, "row", "shared"]),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(blocks_in=[(2, 0, "e"), (2, 0, "e"), (2, 1, "o")], blocks_out=[(1, 1, "o"), (3, 0, "e"), (1, 0, "o")],
         layout="ir_mul", n=5, gate_mode="shared", add_mode="row", bias=True, seed=3)
@example(blocks_in=[(3, 1, "o")], blocks_out=[(2, 1, "o")], layout="mul_ir", n=0, gate_mode="row", add_mode=None,
         bias=False, seed=4)
def test_parity_random_irreps(blocks_in, blocks_out, layout, n, gate_mode, add_mode, bias, seed):
    if sum(m for m, _, _ in blocks_in) == 0 or sum(m for m, _, _ in blocks_out) == 0:
        blocks_in, blocks_out = blocks_in + [(1, 0, "e")], blocks_out + [(1, 0, "e")]
    if not any(m > 0 and l == 0 and p == "e" for m, l, p in blocks_in):
        bias = False  # e3nn's Linear cannot build a bias-only output block
    check_parity(irreps_string(blocks_in), irreps_string(blocks_out), layout, n, F64, gate_mode, add_mode, bias,
                 seed, backends=("cpp",))


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared"])
@pytest.mark.parametrize("pre", [False, True], ids=["post", "pre+post"])
def test_core_all_orders_match_reference_float64(layout, shared, pre, spy):
    """Values, every first gradient and the second derivatives of the force-training pattern of the
    generalised op (prologue and epilogue gates, bias, additive) equal the plain-torch expression."""
    spec, leaves = core_inputs(layout, shared, pre, seed=3 + pre)
    got = all_orders(lambda *t: _core(*t, spec, "cpp"), leaves)
    ref = all_orders(lambda *t: core_reference(*t, spec), leaves)
    for p, q in zip(got, ref):
        torch.testing.assert_close(p, q, **TOL[F64])
    assert spy["fwd"] >= 4 and spy["wgrad"] >= 1  # forward, dx, recomputed pre-gate output, ...


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_core_float32_first_and_second_derivatives(layout, spy):
    """float32 against the float64 reference, relative to each result's scale."""
    spec, leaves = core_inputs(layout, False, True, n=6, seed=9)
    got = all_orders(lambda *t: _core(*t, spec, "cpp"),
                     [None if t is None else t.detach().float().requires_grad_() for t in leaves])
    ref = all_orders(lambda *t: core_reference(*t, spec), leaves)
    for p, q in zip(got, ref):
        assert p.dtype == torch.float32
        err = (p.double() - q).abs().max() / q.abs().max().clamp_min(1.0)
        assert err < 2 * TOL[torch.float32]["rtol"], err
    assert spy["fwd"] > 0 and spy["wgrad"] > 0


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared"])
@pytest.mark.parametrize("pre", [False, True], ids=["post", "pre+post"])
def test_mul_ir_blocks_of_every_order_up_to_4(dtype, shared, pre, spy):
    """mul_ir blocks of l = 1, 2, 3 (the kernels' specialised transposes, csrc/interleave.h: packing
    x, dy and the weight gradient's operands, storing y and the saved pre-gate output u) and l = 4
    (the generic loop): values, first gradients and second derivatives of the generalised op and of
    the public call (which saves u) against the float64 reference, in float64 and float32."""
    spec, leaves = core_inputs("mul_ir", shared, pre, n=6, seed=11, irr_in="3x0e+4x1o+3x2e+2x3o+2x4e",
                               irr_out="2x0e+3x1o+4x2e+3x3o+1x4e")
    cast = [None if t is None else t.detach().to(dtype).requires_grad_() for t in leaves]
    calls = [(lambda *t: _core(*t, spec, "cpp"), lambda *t: core_reference(*t, spec), cast, leaves)]
    if not pre:  # the public call: y and u from one forward kernel
        drop = lambda t: t[:3] + t[4:]  # noqa: E731 - no prologue gate
        calls.append((lambda *t: gated_linear(*t, spec, backend="cpp"),
                      lambda *t: core_reference(t[0], t[1], t[2], None, *t[3:], spec), drop(cast), drop(leaves)))
    for fn, ref_fn, args, ref_args in calls:
        for p, q in zip(all_orders(fn, args), all_orders(ref_fn, ref_args)):
            assert p.dtype == dtype
            err = ((p.double() - q).abs().max() / q.abs().max().clamp_min(1.0)).item()
            assert err <= (1e-12 if dtype == F64 else 2 * TOL[torch.float32]["rtol"]), err
    assert spy["wgrad"] > 0 and (pre or spy["fwd_u"] > 0)


@pytest.mark.parametrize("irr_in,irr_out,layout,shared", GL_GRAD_CASES)
def test_gradcheck_gradgradcheck(irr_in, irr_out, layout, shared, spy):
    spec, (x, w, b, g, a) = grad_inputs(irr_in, irr_out, layout, shared)

    def f(x, w, b, g, a):
        return gated_linear(x, w, b, g, a, spec, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, w, b, g, a))
    assert torch.autograd.gradgradcheck(f, (x, w, b, g, a))
    assert spy["fwd"] > 0 and spy["wgrad"] > 0


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_core_pre_and_post_gates_gradgradcheck(layout, spy):
    spec, (x, w, _, gp, gq, _) = core_inputs(layout, False, True, n=2, seed=5, irr_in="1x0e+2x1o+1x2e",
                                              irr_out="1x0e+1x1o+1x0o+1x2e")

    def f(x, w, gp, gq):
        return _core(x, w, None, gp, gq, None, spec, "cpp")

    assert torch.autograd.gradcheck(f, (x, w, gp, gq))
    assert torch.autograd.gradgradcheck(f, (x, w, gp, gq))
    assert spy["fwd"] > 0 and spy["wgrad"] > 0


# ---------------------------------------------------------------------------- kernel paths
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_channel_tiles_and_transposed_spec(layout):
    """The kernels also run tables with channel tiles smaller than a block (block_w = block_u = 2)
    and the transposed spec (W_i^T through swapped strides): same results as whole blocks and as
    the reference."""
    spec, (x, w, b, gp, gq, a) = core_inputs(layout, False, True, n=7, seed=2, irr_in="5x0e+3x1o+2x2e",
                                             irr_out="3x0e+5x1o+3x2e")
    x, w, b, gp, gq, a = (t.detach() for t in (x, w, b, gp, gq, a))
    ops = torch.ops.mmea_kernels_ext
    for s, (inp, gin, gout, add, bias) in ((spec, (x, gp, gq, a, b)),
                                          (spec.transposed, (torch.randn(7, spec.dim_out, dtype=F64), gq, gp, None,
                                                             None))):
        t = linear_tables(s, "cpu", 2, 2)
        y = ops.gated_linear_fwd(inp, w, bias, gin, gout, add, t.tasks, t.instructions, t.path_weights, s.dim_out, 2)
        torch.testing.assert_close(y, cpp_forward(inp, w, bias, gin, gout, add, s), **TOL[F64])
        torch.testing.assert_close(y, core_reference(inp, w, bias, gin, gout, add, s), **TOL[F64])
        dy = torch.randn_like(y)
        dw = ops.gated_linear_wgrad(inp, dy, gin, gout, t.wtasks, t.path_weights, s.weight_numel, 2, 2)
        wl = w.clone().requires_grad_()
        (ref,) = torch.autograd.grad((core_reference(inp, wl, None, gin, gout, None, s) * dy).sum(), wl)
        torch.testing.assert_close(dw, ref, **TOL[F64])
        torch.testing.assert_close(cpp_wgrad(inp, dy, gin, gout, s), ref, **TOL[F64])


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [0, 7])
def test_forward_with_pre_gate_output(layout, dtype, n):
    """gated_linear_fwd_u: y bitwise that of gated_linear_fwd, and u = L_W(G_pre ⊙ x) (no gate, bias or
    additive; zeros on an output block no instruction feeds), with whole blocks and channel tiles."""
    spec, leaves = core_inputs(layout, False, True, n=n, seed=8, dtype=dtype)
    x, w, b, gp, gq, a = (t.detach() for t in leaves)
    ops = torch.ops.mmea_kernels_ext
    u_ref = core_reference(x.double(), w.double(), None, gp.double(), None, None, spec)
    for bw in (2, cpp_tables(spec, "cpu").block_w):
        t = linear_tables(spec, "cpu", bw, bw)
        args = (t.tasks, t.instructions, t.path_weights, spec.dim_out, bw)
        y, u = ops.gated_linear_fwd_u(x, w, b, gp, gq, a, *args)
        assert torch.equal(y, ops.gated_linear_fwd(x, w, b, gp, gq, a, *args))
        assert u.shape == (n, spec.dim_out) and u.dtype == dtype
        torch.testing.assert_close(u.double(), u_ref, **TOL[dtype])
    y2, u2 = cpp_forward_u(x, w, b, gp, gq, a, spec)
    assert torch.equal(y2, cpp_forward(x, w, b, gp, gq, a, spec)) and torch.equal(u2, u)


def _row_splits_on(threads_list):
    spec, (x, w, b, _, gq, a) = core_inputs("mul_ir", False, False, n=2600, seed=4, irr_in="24x0e+16x1o+8x2e",
                                            irr_out="20x0e+16x1o+8x2e")
    dy = torch.randn(2600, spec.dim_out, dtype=F64)
    res = []
    prev = torch.get_num_threads()
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            y = _core(x, w, b, None, gq, a, spec, "cpp")
            res.append((y,) + torch.autograd.grad(y, (x, w, gq), dy))
    finally:
        torch.set_num_threads(prev)
    return spec, (x, w, b, gq, a, dy), res


def test_row_splits_and_threads():
    """More rows than one partial sum of the weight gradient (1024) and than one forward tile, on 1
    and 2 threads: the forward and the gradients equal the reference, and the weight gradient is the
    same for both thread counts to rounding here (each split's GEMMs are MKL's, whose bits in its
    default mode depend on the thread that calls it on some CPUs: 1 ulp on an AVX-512 Xeon)."""
    spec, (x, w, b, gq, a, dy), res = _row_splits_on((1, 2))
    y_ref = core_reference(x, w, b, None, gq, a, spec)
    ref = (y_ref,) + torch.autograd.grad(y_ref, (x, w, gq), dy)
    for one, two, r in zip(*res, ref):
        torch.testing.assert_close(one, r, **TOL[F64])
        torch.testing.assert_close(two, r, **TOL[F64])
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-14, atol=1e-13)  # weight gradient


def test_weight_gradient_bits_do_not_depend_on_the_thread_count_with_a_reproducible_blas():
    """The weight gradient's own order is fixed (1024-row splits summed in order, whatever thread
    takes a split): with MKL in its reproducible mode (MKL_CBWR=AUTO,STRICT, set before MKL starts,
    so in a fresh process) it is bitwise the same on 1, 2 and 3 threads."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "from test_cpp_gated_linear import _row_splits_on\n"
            "_, _, res = _row_splits_on((1, 2, 3))\n"
            "assert all(torch.equal(res[0][2], r[2]) for r in res[1:]), 'weight gradients differ'\n"
            "print('BITWISE-OK')")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", code, here, os.path.dirname(here)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, MKL_CBWR="AUTO,STRICT"))
    assert proc.returncode == 0 and "BITWISE-OK" in proc.stdout, proc.stderr[-2000:]


def test_noncontiguous_input_leading_dims_and_empty_batch(spy):
    spec, (x, w, b, _, g, a) = core_inputs("ir_mul", False, False, n=6, seed=6)
    x, w, b, g, a = (t.detach() for t in (x, w, b, g, a))
    wide = torch.zeros(6, 2 * spec.dim_in, dtype=F64)
    wide[:, ::2] = x
    y = gated_linear(wide[:, ::2].reshape(2, 3, -1), w, b, g.reshape(2, 3, -1), a.reshape(2, 3, -1), spec,
                     backend="cpp")
    assert y.shape == (2, 3, spec.dim_out)
    torch.testing.assert_close(y.reshape(6, -1), gated_linear_reference(x, w, b, g, a, spec), **TOL[F64])
    xe = torch.zeros(0, spec.dim_in, dtype=F64, requires_grad=True)
    we = w.clone().requires_grad_()
    ye = gated_linear(xe, we, b, g[:0], a[:0], spec, backend="cpp")
    assert ye.shape == (0, spec.dim_out)
    assert gated_linear(xe, w, b, g[:0], a[:0], spec, backend="torch").shape == (0, spec.dim_out)
    gx, gw = torch.autograd.grad(ye.sum(), (xe, we))
    assert gx.shape == xe.shape and torch.equal(gw, torch.zeros_like(w))
    assert spy["fwd"] >= 2


def test_mmea_linear_on_no_rows_of_a_column_strided_input(spy):
    """Zero rows of a column-strided view (torch calls an empty tensor contiguous and keeps its
    strides): the C++ gate net refused it while the torch path ran (found by fuzzing); now both
    give [0, D_out] and an empty input gradient."""
    from e3nn import o3

    from mmea_kernels import MMEALinear

    for fused in ("cpp", "torch"):
        ad = MMEALinear(o3.Linear("2x0e", "2x0e+1x1o").double(), rank=2, backend=fused)
        x = torch.randn(0, 4, dtype=F64)[:, ::2].requires_grad_()
        y = ad(x)
        assert y.shape == (0, 5), fused
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert gx.shape == (0, 2)


# ---------------------------------------------------------------------------- selection and errors
def test_backend_selection(monkeypatch, spy):
    """MMEA_BACKEND / backend= pick the fused kernels: cpp for float32/float64 CPU tensors; other
    dtypes (and "torch") run the reference composition."""
    x = torch.randn(3, 4, dtype=F64)
    monkeypatch.setenv("MMEA_BACKEND", "cpp")
    assert kernel_backend(None, x) == "cpp" and kernel_backend(None, x.float()) == "cpp"
    assert kernel_backend(None, x.half()) is None and kernel_backend("torch", x) is None
    spec = LinearSpec.e3nn_default("1x0e+1x1o", "1x0e+1x1o")
    w = torch.randn(spec.weight_numel, dtype=F64)
    x16, w16 = x.to(torch.bfloat16), w.to(torch.bfloat16)
    y16 = gated_linear(x16, w16, None, None, None, spec)
    assert spy["fwd"] == 0 and torch.equal(y16, gated_linear_reference(x16, w16, None, None, None, spec))
    torch.testing.assert_close(gated_linear(x, w, None, None, None, spec),
                               gated_linear_reference(x, w, None, None, None, spec), **TOL[F64])
    assert spy["fwd"] == 1


def test_forces_pass_runs_only_the_input_gradient(spy):
    """dE/dx with trainable gates and weight: one kernel call (L^T(G ⊙ dy)), no weight gradient."""
    spec, (x, w, b, g, a) = grad_inputs("2x0e+1x1o+1x2e", "1x0e+2x1o+1x2e", "mul_ir", False, n=3)
    y = gated_linear(x, w, b, g, a, spec, backend="cpp")
    assert spy == {"fwd": 0, "fwd_u": 1, "wgrad": 0}
    torch.autograd.grad(y.tanh().sum(), x)
    assert spy == {"fwd": 1, "fwd_u": 1, "wgrad": 0}


# ---------------------------------------------------------------------------- the saved pre-gate output
def top_inputs(layout, shared, bias, add, n=3, seed=11):
    spec = LinearSpec.e3nn_default("1x0e+2x1o+1x2e", "1x0e+1x1o+1x0o+1x2e", layout, biases=bias)
    gen = torch.Generator().manual_seed(seed)
    lead = () if shared else (n,)
    leaves = [torch.randn(n, spec.dim_in, generator=gen, dtype=F64), torch.randn(spec.weight_numel, generator=gen,
                                                                                   dtype=F64),
              torch.randn(spec.bias_numel, generator=gen, dtype=F64) if bias else None,
              torch.rand(*lead, spec.out_layout.num_gates, generator=gen, dtype=F64) + 0.5,
              torch.randn(*lead, spec.out_layout.num_scalars, generator=gen, dtype=F64) if add else None]
    return spec, [None if t is None else t.requires_grad_() for t in leaves]


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared"])
@pytest.mark.parametrize("bias,add", [(False, False), (True, True), (True, False)])
def test_saved_pre_gate_output_is_exact_to_every_order(layout, shared, bias, add, spy):
    """With a gate that needs a gradient the forward writes and saves u = L_W(x) (one kernel, no
    recompute in the backward); saved as an output of the node, u stays on the graph: gradcheck,
    gradgradcheck, and values, gradients and second derivatives equal to the reference."""
    spec, leaves = top_inputs(layout, shared, bias, add)
    live = [t for t in leaves if t is not None]

    def f(*ts):
        it = iter(ts)
        return gated_linear(*(None if t is None else next(it) for t in leaves), spec, backend="cpp")

    assert torch.autograd.gradcheck(f, live)
    assert torch.autograd.gradgradcheck(f, live)
    got = all_orders(lambda *t: gated_linear(*t, spec, backend="cpp"), leaves)
    ref = all_orders(lambda *t: gated_linear_reference(*t, spec), leaves)
    for p, q in zip(got, ref):
        torch.testing.assert_close(p, q, **TOL[F64])
    spy.update(fwd=0, fwd_u=0, wgrad=0)
    y = gated_linear(*leaves, spec, backend="cpp")
    torch.autograd.grad(y.sin().sum(), live)
    assert spy == {"fwd": 1, "fwd_u": 1, "wgrad": 1}  # forward (+u); dx; dW; dG from the saved u


def test_single_output_forward_when_no_gate_gradient_is_needed(spy):
    """Inference, frozen gates and no gates keep the forward that writes y only; so does an empty batch
    with trainable gates run the saved-output forward correctly."""
    spec, (x, w, b, g, a) = top_inputs("mul_ir", False, True, True)
    with torch.no_grad():
        gated_linear(x, w, b, g, a, spec, backend="cpp")
    gated_linear(x, w, b, g.detach(), a, spec, backend="cpp")
    gated_linear(x, w, b, None, a, spec, backend="cpp")
    assert spy == {"fwd": 3, "fwd_u": 0, "wgrad": 0}
    ye = gated_linear(x[:0], w, b, g[:0], a[:0], spec, backend="cpp")
    gx, gw, gg = torch.autograd.grad(ye.sum(), (x, w, g))
    assert spy["fwd_u"] == 1 and not gx.any() and not gw.any() and not gg.any()


def test_force_training_of_mmea_linear_matches_unfused(spy):
    """Force training through MMEALinear: E = Σ tanh(y)·y, F = -dE/dx (create_graph), loss Σ F² and
    its gradient to the gate-net parameters and the input, float64: the fused path with the saved
    pre-gate output equals backend="torch"."""
    from mmea_kernels import MMEALinear
    from helpers import make_linear, randomise
    plain = MMEALinear(make_linear(), rank=3, backend="torch")
    randomise(plain)
    fused = MMEALinear(make_linear(), rank=3, backend="cpp")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(6, plain.in_layout.dim, dtype=F64, requires_grad=True)

    def grads(ad):
        y = ad(x)
        (fx,) = torch.autograd.grad(-(y.tanh() * y).sum(), x, create_graph=True)
        params = [p for n, p in ad.named_parameters() if not n.startswith("base.")]
        return [y, fx] + list(torch.autograd.grad((fx ** 2).sum(), [x] + params))

    for p, q in zip(grads(fused), grads(plain)):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-11)
    assert spy["fwd_u"] == 1


def test_gate_net_input_gradient_joins_the_kernel_gradient_in_place(spy):
    """MMEALinear on the fused path: the gate net's 0e-input gradient is added into the kernel's input
    gradient (split_scalars), so the backward builds no zero-filled [N, D_in] gradient for the 0e
    slice (no aten::slice_backward of the 0e columns). dE/dx (inference with forces), a second
    consumer of x, leading dims, and force training (create_graph) equal backend="torch"."""
    from e3nn import o3

    from mmea_kernels import MMEALinear
    from helpers import randomise
    lin = o3.Linear("12x0e+4x1o", "6x0e+3x1o+2x2e").double()
    plain = MMEALinear(lin, rank=3, backend="torch")
    randomise(plain)
    fused = MMEALinear(lin, rank=3, backend="cpp")
    fused.load_state_dict(plain.state_dict())
    assert fused._scalar_span == (0, 12)
    x = torch.randn(2, 5, 24, dtype=F64, requires_grad=True)

    def energy(ad):
        return (ad(x) ** 2).sum() + (x ** 3).sum()  # x also feeds another op

    with torch.profiler.profile(record_shapes=True) as prof:
        (gf,) = torch.autograd.grad(energy(fused), x)
    assert spy["fwd"] >= 1
    sliced = [e.input_shapes[0] for e in prof.events() if e.name == "aten::slice_backward"]
    assert [10, 12] not in sliced, sliced  # the 0e input slice's gradient is not zero-filled
    (gp,) = torch.autograd.grad(energy(plain), x)
    torch.testing.assert_close(gf, gp, rtol=1e-12, atol=1e-12)
    # a backward that retains the graph and runs twice gives the same gradient both times
    e = energy(fused)
    g1 = torch.autograd.grad(e, x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(e, x)[0], g1, rtol=0, atol=0)

    def force_loss(ad):
        (fx,) = torch.autograd.grad(-energy(ad), x, create_graph=True)
        params = [p for n, p in ad.named_parameters() if not n.startswith("base.")]
        return [fx] + list(torch.autograd.grad((fx ** 2).sum(), [x] + params))

    for p, q in zip(force_loss(fused), force_loss(plain)):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-11)


def test_split_scalars_derivatives_and_errors():
    """split_scalars: (x, x[:, s:s+c]); gradcheck and gradgradcheck (the create_graph backward adds out
    of place), either output alone, and bad arguments named."""
    from mmea_kernels.ops.gated_linear import split_scalars
    x = torch.randn(4, 7, dtype=F64, requires_grad=True)
    c = torch.randn(4, 7, dtype=F64)

    def both(t):
        a, b = split_scalars(t, 2, 3)
        return (a * c).sin(), b.exp()

    assert torch.autograd.gradcheck(both, (x,))
    assert torch.autograd.gradgradcheck(both, (x,))
    for k in (0, 1):
        ref = ((x * c).sin(), x[:, 2:5].exp())[k]
        torch.testing.assert_close(torch.autograd.grad(both(x)[k].sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])
    with pytest.raises(ValueError, match=r"columns \[5, 9\) of a 2-D tensor, got shape \(4, 7\)"):
        split_scalars(x, 5, 4)
    with pytest.raises(ValueError, match="2-D"):
        split_scalars(x[0], 0, 1)


def test_bad_inputs_name_the_problem():
    spec = LinearSpec.e3nn_default("1x0e+1x1o", "2x0e+1x1o", biases=True)
    x = torch.randn(3, 4, dtype=F64)
    w = torch.randn(spec.weight_numel, dtype=F64)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has dtype torch.float64"):
        gated_linear(x, w.float(), None, None, None, spec, backend="cpp")
    with pytest.raises(ValueError, match=r"gates have shape \(3, 2\), expected \(3, 1\)"):
        gated_linear(x, w, None, torch.ones(3, 2, dtype=F64), None, spec, backend="cpp")
    with pytest.raises(ValueError, match="last dimension must be 4"):
        gated_linear(x[:, :3], w, None, None, None, spec, backend="cpp")
    ops = torch.ops.mmea_kernels_ext
    t = linear_tables(spec, "cpu", 2, 1)
    args = (t.tasks, t.instructions, t.path_weights, spec.dim_out, 2)
    with pytest.raises(RuntimeError, match="g_post has dtype Float but the features have dtype Double"):
        ops.gated_linear_fwd(x, w, None, None, torch.ones(3, 1), None, *args)
    with pytest.raises(RuntimeError, match=r"g_post must be \[N, \*\] \(per row\) or \[\*\] \(shared\) with N = 3"):
        ops.gated_linear_fwd(x, w, None, None, torch.ones(4, 1, dtype=F64), None, *args)
    with pytest.raises(RuntimeError, match="support float32 and float64, got Half"):
        ops.gated_linear_fwd(x.half(), w.half(), None, None, None, None, *args)
    with pytest.raises(RuntimeError, match="tasks must have 11 columns"):
        ops.gated_linear_fwd(x, w, None, None, None, None, t.tasks[:, :5], *args[1:])
    with pytest.raises(RuntimeError, match=r"weight block \[2, 3\) is outside \[0, 2\)"):
        ops.gated_linear_fwd(x, w[:2], None, None, None, None, *args)
    with pytest.raises(RuntimeError, match=r"output block \[2, 5\) is outside \[0, 4\)"):
        ops.gated_linear_fwd(x, w, None, None, None, None, t.tasks, t.instructions, t.path_weights, 4, 2)
    with pytest.raises(RuntimeError, match="b must have the dtype and row count of a"):
        ops.gated_linear_wgrad(x, torch.ones(2, spec.dim_out, dtype=F64), None, None, t.wtasks, t.path_weights,
                               spec.weight_numel, 1, 2)
