"""Fused equivariant linear + MMEA gate (``mmea_kernels.ops.gated_linear``): parity with
``e3nn.o3.Linear`` followed by an explicit gate (built from the irreps definition, not from
IrrepsLayout), both layouts, both backends; poisoned output buffers; gradcheck and gradgradcheck
of the triton path (the closed autograd) in x, weight, bias, gates and additive.

The kernel tests run once per device (the ``device`` fixture / ``helpers.TRITON_DEVICES``): on
CPU tensors through the Triton interpreter (conftest sets TRITON_INTERPRET=1 first) and on CUDA
where a GPU exists (``MMEA_TEST_CUDA=1``).
"""
import os

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from e3nn import o3  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmea_kernels.layout import IrrepsLayout  # noqa: E402
from mmea_kernels.ops.gated_linear import (_core, gated_linear, gated_linear_reference,  # noqa: E402
                                           triton_status)
from mmea_kernels.linear_spec import LinearSpec  # noqa: E402
from mmea_kernels.ops import gate_mul  # noqa: E402

from helpers import (CUDA_AVAILABLE, GL_FIXED, GL_GRAD_CASES, REPO, TOL, TRITON_DEVICES,  # noqa: E402
                     assert_gradchecks, check_parity, grad_inputs, irreps_string, make_inputs)

if not CUDA_AVAILABLE:
    _ok, _why = triton_status("cpu")
    if not _ok:
        pytest.skip(_why, allow_module_level=True)

BACKENDS = ("triton", "torch")


# ---------------------------------------------------------------------------- spec
def test_spec_from_e3nn_and_cache():
    lin = o3.Linear("2x0e+2x0e+2x1o", "3x0e+1x1o+1x0o", biases=True)
    spec = LinearSpec.from_e3nn(lin)
    assert spec is LinearSpec.from_e3nn(o3.Linear("2x0e+2x0e+2x1o", "3x0e+1x1o+1x0o", biases=True))
    assert spec.weight_numel == lin.weight_numel == 2 * 3 + 2 * 3 + 2 * 1
    assert spec.bias_numel == lin.bias_numel == 3
    assert [(i.i_in, i.i_out, i.weight_offset) for i in spec.instructions] == [(0, 0, 0), (1, 0, 6), (2, 1, 12)]
    assert all(abs(i.path_weight - 4 ** -0.5) < 1e-15 for i in spec.instructions[:2])
    assert spec == LinearSpec.e3nn_default("2x0e+2x0e+2x1o", "3x0e+1x1o+1x0o", biases=True)
    t = spec.transposed
    assert (t.dim_in, t.dim_out, t.weight_numel, t.bias_numel) == (spec.dim_out, spec.dim_in, spec.weight_numel, 0)
    assert t is spec.transposed
    assert spec.with_layout("ir_mul").layout == "ir_mul"
    with pytest.raises(ValueError):
        LinearSpec("1x0e", "1x1o", [(0, 0, 1, 1, 1.0)])
    with pytest.raises(ValueError):
        LinearSpec("1x1o", "1x1o", [(0, 0, 1, 1, 1.0)], biases=[True])


# ---------------------------------------------------------------------------- parity
FIXED = GL_FIXED


@pytest.mark.parametrize("irr_in,irr_out,layout,gate_mode,add_mode,bias", FIXED)
def test_parity_fixed_float64(irr_in, irr_out, layout, gate_mode, add_mode, bias, device):
    check_parity(irr_in, irr_out, layout, 21, torch.float64, gate_mode, add_mode, bias, 0, device)


@pytest.mark.parametrize("irr_in,irr_out,layout,gate_mode,add_mode,bias", FIXED[:2] + FIXED[4:])
def test_parity_fixed_float32(irr_in, irr_out, layout, gate_mode, add_mode, bias, device):
    check_parity(irr_in, irr_out, layout, 9, torch.float32, gate_mode, add_mode, bias, 1, device)


block_st = st.tuples(st.sampled_from([0, 1, 2, 3, 5]), st.integers(0, 2), st.sampled_from(["e", "o"]))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@settings(max_examples=30, deadline=None)
@given(
    blocks_in=st.lists(block_st, min_size=1, max_size=4),
    blocks_out=st.lists(block_st, min_size=1, max_size=4),
    layout=st.sampled_from(["mul_ir", "ir_mul"]),
    n=st.integers(1, 19),
    gate_mode=st.sampled_from([None, "row", "shared"]),
    add_mode=st.sampled_from([None, "row", "shared"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(blocks_in=[(2, 0, "e"), (2, 0, "e"), (2, 1, "o")], blocks_out=[(1, 1, "o"), (3, 0, "e"), (1, 0, "o")],
         layout="ir_mul", n=5, gate_mode="shared", add_mode="row", bias=True, seed=3)
@example(blocks_in=[(0, 1, "o"), (1, 1, "e"), (3, 0, "o")], blocks_out=[(3, 1, "e"), (0, 0, "e"), (1, 0, "o")],
         layout="mul_ir", n=1, gate_mode="row", add_mode="shared", bias=True, seed=4)
def test_parity_random_irreps(device, blocks_in, blocks_out, layout, n, gate_mode, add_mode, bias, seed):
    if sum(m for m, _, _ in blocks_in) == 0 or sum(m for m, _, _ in blocks_out) == 0:
        blocks_in, blocks_out = blocks_in + [(1, 0, "e")], blocks_out + [(1, 0, "e")]
    if not any(m > 0 and l == 0 and p == "e" for m, l, p in blocks_in):
        bias = False  # e3nn's Linear cannot build a bias-only output block (its codegen fails)
    check_parity(irreps_string(blocks_in), irreps_string(blocks_out), layout, n, torch.float64, gate_mode, add_mode,
                 bias, seed, device)


needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs the triton kernels on CPU tensors (TRITON_INTERPRET=1)")


@needs_interpreter
def test_leading_dims_and_noncontiguous_input():
    lin, x, gates, add = make_inputs("2x0e+1x1o", "1x0e+2x1o", 6, torch.float64, "row", "row", False, 5)
    spec = LinearSpec.from_e3nn(lin)
    wide = torch.randn(6, 2 * x.shape[1], dtype=torch.float64)
    wide[:, ::2] = x
    xs = wide[:, ::2]  # non-contiguous view
    y = gated_linear(xs.reshape(2, 3, -1), lin.weight, None, gates.reshape(2, 3, -1), add.reshape(2, 3, -1), spec,
                     backend="triton")
    ref = gated_linear_reference(x, lin.weight, None, gates, add, spec)
    assert y.shape == (2, 3, spec.dim_out)
    torch.testing.assert_close(y.reshape(6, -1), ref, rtol=1e-13, atol=1e-13)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_irreps_larger_than_the_gpu_row_tile(dtype, monkeypatch):
    """l = 16 (33 components) in float64 and l = 32 (65) in float32, with the GPU's row tile
    (interpreter on, its tile sizes off): the forward once wrote none of those columns (rows per
    program 0; found in review), the output and the input gradient equal the reference."""
    from mmea_kernels.ops.gated_linear import triton_kernels as tk

    l = 16 if dtype == torch.float64 else 32
    assert 2 * l + 1 > tk.GPU_TILES[dtype]["block_m"]
    monkeypatch.setattr(tk, "interpreting", lambda device: False)
    lin, x, gates, add = make_inputs(f"2x0e+1x{l}e", f"2x0e+1x{l}e", 3, torch.float64, "row", "row", False, 3)
    spec = LinearSpec.from_e3nn(lin)
    x, w, gates, add = (t.to(dtype) for t in (x, lin.weight.detach(), gates, add))
    x.requires_grad_()
    y = gated_linear(x, w, None, gates, add, spec, backend="triton")
    xr = x.detach().double().requires_grad_()
    ref = gated_linear_reference(xr, w.double(), None, gates.double(), add.double(), spec)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), ref, **tol)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy.to(dtype))[0].double(), torch.autograd.grad(ref, xr, dy)[0],
                               **tol)


@pytest.mark.parametrize("backend", ["triton", "torch", "cpp", "cpp-bf16"])
def test_weight_and_bias_as_strided_views(backend):
    """A weight or bias that is a strided view (every other element of a longer tensor) gives what
    its contiguous copy gives, on every backend (the reference and the Triton launcher once read
    them by storage offset: errors of 2.5-4.7; the bf16 CPU case runs the reference)."""
    from mmea_kernels.ops.gated_linear import kernel_backend

    dtype = torch.bfloat16 if backend == "cpp-bf16" else torch.float64
    backend = backend.replace("-bf16", "")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the triton kernels on CPU tensors (TRITON_INTERPRET=1)")
    if backend == "cpp" and kernel_backend("cpp", torch.zeros(1)) != "cpp":
        pytest.skip("the C++ extension is not built")
    lin, x, gates, add = make_inputs("3x0e+2x1o", "2x0e+2x1o", 5, torch.float64, "row", "row", True, 7)
    spec = LinearSpec.from_e3nn(lin)
    x, gates, add = (t.to(dtype) for t in (x, gates, add))
    w_long = torch.randn(2 * spec.weight_numel, dtype=dtype)
    b_long = torch.randn(2 * spec.bias_numel, dtype=dtype)
    w, b = w_long[::2], b_long[1::2]
    assert not w.is_contiguous() and not b.is_contiguous()
    y = gated_linear(x, w, b, gates, add, spec, backend=backend)
    ref = gated_linear(x, w.contiguous(), b.contiguous(), gates, add, spec, backend="torch")
    torch.testing.assert_close(y, ref, rtol=0, atol=0 if dtype == torch.float64 and backend == "torch" else 1e-12)


# ---------------------------------------------------------------------------- autograd
GRAD_CASES = GL_GRAD_CASES


@pytest.mark.parametrize("irr_in,irr_out,layout,shared", GRAD_CASES)
def test_gradcheck_gradgradcheck_triton(irr_in, irr_out, layout, shared, device):
    spec, (x, w, b, g, a) = grad_inputs(irr_in, irr_out, layout, shared, device=device)

    def f(x, w, b, g, a):
        return gated_linear(x, w, b, g, a, spec, backend="triton")

    assert_gradchecks(f, (x, w, b, g, a), device)


def test_gradients_match_torch_reference(device):
    spec, leaves = grad_inputs("2x0e+1x0e+2x1o+1x2e", "3x0e+2x1o+1x2e+1x1e", "ir_mul", False, n=4, seed=11,
                                device=device)
    outs = []
    for backend in BACKENDS:
        y = gated_linear(*leaves, spec, backend=backend)
        g1 = torch.autograd.grad(y.sin().sum(), leaves, create_graph=True)
        g2 = torch.autograd.grad(sum((t * t).sum() for t in g1), leaves)  # force-training pattern
        outs.append(g1 + g2)
    for p, q in zip(*outs):
        torch.testing.assert_close(p, q, **TOL[torch.float64])


def test_core_pre_and_post_gates_gradgradcheck(device):
    """The generalised op (prologue + epilogue gates) that the backward is made of."""
    spec = LinearSpec.e3nn_default("1x0e+2x1o", "1x0e+1x1o+1x0o")
    gen = torch.Generator().manual_seed(2)
    n = 2
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_()  # noqa: E731
    x, w = mk(n, spec.dim_in), mk(spec.weight_numel)
    gp, gq = mk(n, spec.in_layout.num_gates), mk(spec.out_layout.num_gates)

    def f(x, w, gp, gq):
        return _core(x, w, None, gp, gq, None, spec)

    assert_gradchecks(f, (x, w, gp, gq), device)


def test_frozen_weight_force_training_pattern(device):
    """MMEA on a frozen base: forces = -dE/dx with create_graph, then the loss on the forces
    back to the gates and additive (the weight never gets a gradient)."""
    spec, (x, w, b, g, a) = grad_inputs("2x0e+1x1o+1x2e", "1x0e+2x1o+1x2e", "ir_mul", False, n=3, device=device)
    w.requires_grad_(False)
    b.requires_grad_(False)
    res = []
    for backend in BACKENDS:
        y = gated_linear(x, w, b, g, a, spec, backend=backend)
        (fx,) = torch.autograd.grad(y.tanh().sum(), (x,), create_graph=True)
        res.append((fx,) + torch.autograd.grad((fx * fx).sum(), (g, a)))
    for p, q in zip(*res):
        torch.testing.assert_close(p, q, **TOL[torch.float64])


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol, device):
    spec, leaves = grad_inputs("4x0e+3x1o+2x2e", "5x0e+2x1o+2x2e", "ir_mul", False, n=7, seed=3, device=device)
    ref = gated_linear_reference(*leaves, spec)
    gref = torch.autograd.grad(ref.square().sum(), leaves)
    half = [t.detach().to(dtype).requires_grad_() for t in leaves]
    y = gated_linear(*half, spec, backend="triton")
    assert y.dtype == dtype
    gh = torch.autograd.grad(y.float().square().sum(), half)
    for p, q in zip((y,) + gh, (ref,) + gref):
        err = (p.double() - q).abs().max() / q.abs().max().clamp_min(1.0)
        assert err < tol, err


# ---------------------------------------------------------------------------- launch configuration
def test_launch_grids_are_one_dimensional_for_5m_rows():
    """CUDA caps grid dimensions 1 and 2 at 65,535: every launch of 5M rows must fit (the old 2-D
    grid put row blocks in dimension 1 and failed above ~4.2M rows)."""
    from mmea_kernels.ops._utils import check_grid
    from mmea_kernels.ops.gated_linear.triton_kernels import block_m, fwd_launch, wgrad_launch
    from mmea_kernels.ops.tables import layout_tables
    from mmea_kernels.ops.gate.triton import _gate_mul_blocks, _seg_dot_blocks

    n = 5_000_000
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        bm = block_m(n, 7, dtype, interpret=False)
        groups, grid = fwd_launch(n, 8, 7, bm)
        assert len(grid) == 1 and grid[0] == groups * 8
        assert groups * (bm // 7) >= n > (groups - 1) * (bm // 7)  # every row covered, no group wasted
        splits, rows_per_split, grid = wgrad_launch(n, 40, 64, 132, interpret=False)
        assert len(grid) == 1 and grid[0] == 40 * splits
        assert splits * rows_per_split >= n and rows_per_split % 64 == 0
        assert 8 * 132 <= grid[0] < 8 * 132 + 40  # about 8 programs per SM
    L = IrrepsLayout.of("128x0e+128x1o+128x2e+128x3o", "mul_ir")
    bn, bd, _ = _gate_mul_blocks(n, L.dim, False)
    assert -(-L.dim // bd) <= 65535  # rows go in grid dimension 0 (limit 2**31 - 1)
    bn, bg, _ = _seg_dot_blocks(n, L.num_gates, layout_tables(L, "cpu").gate_width, False)
    assert -(-L.num_gates // bg) <= 65535
    with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
        check_grid((10, 70000), "gate_mul")


def test_views_whose_column_offsets_pass_int32_are_made_contiguous_before_a_launch(monkeypatch):
    """The triton kernels offset columns in 32 bits: a transposed [N, D] view whose last column lies
    2**31 elements or more past the first is copied to row-major before a launch (a GPU would read
    it out of place; the interpreter computes in 64 bits and cannot show it). Meta tensors: no
    memory needed."""
    from mmea_kernels.ops._utils import cols32
    from mmea_kernels.ops.gate import triton as gt

    big = torch.empty_strided((3, 4), (1, 2**30), device="meta")  # (4 - 1) * 2**30 > 2**31 - 1
    fine = torch.empty_strided((3, 2), (1, 2**30), device="meta")  # (2 - 1) * 2**30 fits
    assert cols32(big).stride() == (4, 1) and cols32(fine) is fine
    assert cols32(None) is None and cols32(torch.empty(5, device="meta")).dim() == 1
    from mmea_kernels.ops.tables import layout_tables

    seen = []  # the launchers call it on their operands
    monkeypatch.setattr(gt, "cols32", lambda t: seen.append(t) or t)
    x = torch.randn(2, 4)
    t = layout_tables(IrrepsLayout.of("1x0e+1x1o", "mul_ir"), "cpu")
    gt.seg_dot(x, x, t, shared=False)
    gt.gate_mul(x, torch.ones(2, 1), t, keep_ungated=True)
    assert len(seen) == 4


def test_spec_key_and_tables_are_cached(monkeypatch):
    """The launch path asks for the spec's key and tables on every call: both are built once, and
    the tile sizes are not recomputed per launch."""
    from mmea_kernels.ops.gated_linear import triton_kernels
    from mmea_kernels.ops.gated_linear.triton_kernels import tables
    from mmea_kernels.ops.gated_linear.tables import G_IR_DIM
    spec = LinearSpec.e3nn_default("8x0e+4x1o", "8x0e+4x1o+2x2e")
    assert spec.key is spec.key and hash(spec) == hash(spec.key)
    sizes = []
    tile_sizes = triton_kernels.tile_sizes
    monkeypatch.setattr(triton_kernels, "tile_sizes", lambda *a: sizes.append(a) or tile_sizes(*a))
    t = tables(spec, torch.device("cpu"))
    assert tables(spec, torch.device("cpu")) is t and len(sizes) == 1
    t64 = tables(spec, torch.device("cpu"), torch.float64)  # per dtype (the GPU tiles differ by dtype)
    assert tables(spec, torch.device("cpu"), torch.float64) is t64 and len(sizes) == 2
    assert t.max_ir_dim == 5 and t.num_tasks == 3  # one task per output block; the unfed 2e is written as 0
    ir_dims = t.wtasks[:, G_IR_DIM].tolist()  # heaviest weight-gradient tasks first
    assert ir_dims == sorted(ir_dims, reverse=True)


def test_fp32_dot_precision_setting(monkeypatch):
    from mmea_kernels.ops.gated_linear import fp32_precision
    monkeypatch.delenv("MMEA_FP32_DOT", raising=False)
    assert fp32_precision() == "tf32x3"
    monkeypatch.setenv("MMEA_FP32_DOT", "IEEE")
    assert fp32_precision() == "ieee"
    monkeypatch.setenv("MMEA_FP32_DOT", "fp16")
    with pytest.raises(ValueError, match="MMEA_FP32_DOT='fp16'"):
        fp32_precision()


# ---------------------------------------------------------------------------- errors
@needs_interpreter
def test_bad_inputs():
    lin = o3.Linear("1x0e+1x1o", "1x0e+1x1o").double()
    spec = LinearSpec.from_e3nn(lin)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="last dimension"):
        gated_linear(x[:, :3], lin.weight, None, None, None, spec)
    with pytest.raises(ValueError, match="weight"):
        gated_linear(x, lin.weight[:1], None, None, None, spec)
    with pytest.raises(TypeError, match="dtype"):
        gated_linear(x.float(), lin.weight, None, None, None, spec)
    with pytest.raises(ValueError, match="gates"):
        gated_linear(x, lin.weight, None, torch.ones(3, 2, dtype=torch.float64), None, spec)
    with pytest.raises(ValueError, match="bias"):
        gated_linear(x, lin.weight, torch.ones(1, dtype=torch.float64), None, None, spec)
    with pytest.raises(ValueError, match="unknown backend"):
        gated_linear(x, lin.weight, None, None, None, spec, backend="cuda")


@needs_interpreter
def test_forces_pass_skips_gate_and_weight_gradients(monkeypatch):
    """dE/dx with trainable gates and weight: only the input gradient is computed (no recomputed
    linear, seg_dot or weight-gradient kernel); the full backward still matches the reference."""
    from mmea_kernels.ops.gated_linear import function
    calls = {"core": 0, "wgrad": 0}
    real_core, real_wgrad = function._core, function.triton_wgrad
    monkeypatch.setattr(function, "_core", lambda *a: calls.__setitem__("core", calls["core"] + 1) or real_core(*a))
    monkeypatch.setattr(function, "triton_wgrad",
                        lambda *a: calls.__setitem__("wgrad", calls["wgrad"] + 1) or real_wgrad(*a))
    spec, (x, w, b, g, a) = grad_inputs("2x0e+1x1o+1x2e", "1x0e+2x1o+1x2e", "mul_ir", False, n=3)
    gl = g.detach().clone().requires_grad_()
    y = gated_linear(x, w, b, gl.exp(), a, spec, backend="triton")
    calls.update(core=0, wgrad=0)
    (fx,) = torch.autograd.grad(y.tanh().sum(), x, retain_graph=True)
    assert calls == {"core": 1, "wgrad": 0}  # one launch: L^T(G ⊙ dy)
    ref = gated_linear_reference(x, w, b, gl.exp(), a, spec)
    (fref,) = torch.autograd.grad(ref.tanh().sum(), x)
    torch.testing.assert_close(fx, fref, **TOL[torch.float64])
    gw, gg = torch.autograd.grad(y.tanh().sum(), (w, gl))
    rw, rg = torch.autograd.grad(gated_linear_reference(x, w, b, gl.exp(), a, spec).tanh().sum(), (w, gl))
    torch.testing.assert_close(gw, rw, **TOL[torch.float64])
    torch.testing.assert_close(gg, rg, **TOL[torch.float64])


def test_default_gpu_tiles_compile_for_sm90_without_spills():
    """Without a GPU: every Triton kernel of the package compiles for sm_90 (H100/H200), and at the
    default tiles the fused linear's kernels (fp32 tf32x3, bf16, fp64), the gate kernels, FusedGate's
    and the gate net's spill no registers (ptxas -v through bench/gpu/kernel_report.py, in a process
    without the interpreter; run with triton 3.6.0, the device machine's, 3.7.1 and 3.9.0)."""
    import re
    import subprocess
    import sys

    root = REPO
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(root / "bench" / "gpu" / "kernel_report.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    if "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("triton's NVIDIA backend (ptxas) is not available here")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [ln for ln in res.stdout.splitlines()
            if re.match(r"(gate_mul|seg_dot|gl_fwd|gl_wgrad|fused_gate|gate_net) ", ln)]
    # gate ops x 3 dtypes; (fwd, dx, wgrad with the output gate, wgrad with both gates) x (fp32 x 3 precisions,
    # bf16, fp64); FusedGate (fwd, bwd, dbwd) x (2 activation sets) x (fp32, fp64); the gate net (fwd, bwd) x
    # (fp32, fp64)
    assert len(rows) == 6 + 4 * 3 + 4 * 2 + 12 + 4
    for ln in rows:
        *_, regs, stores, loads, _smem = ln.split()
        if ln.startswith("gl_wgrad fp32") and " tf32x3 " not in ln:
            continue  # MMEA_FP32_DOT=ieee or tf32 (not the default): the weight gradient may spill up to 28 B
        assert int(regs) <= 255 and int(stores) == 0 and int(loads) == 0, ln


def test_spec_with_two_layouts_is_refused_by_the_fused_kernels():
    """A LinearSpec may read mul_ir and write ir_mul (a cuet.Linear can); the fused kernels need one
    layout and say so, instead of writing the output in the wrong order."""
    spec = LinearSpec.e3nn_default("2x0e+1x1o", "2x0e+1x1o")
    mixed = LinearSpec.of(spec.in_layout.irreps_str, spec.out_layout.irreps_str, spec.instructions, "mul_ir",
                          False, "ir_mul")
    assert (mixed.layout, mixed.layout_out) == ("mul_ir", "ir_mul") and mixed != spec
    x = torch.randn(3, spec.dim_in, dtype=torch.float64)
    w = torch.randn(spec.weight_numel, dtype=torch.float64)
    with pytest.raises(ValueError, match="need one layout for input and output"):
        gated_linear(x, w, None, None, None, mixed)


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_forward_with_pre_gate_output_and_saved_u(layout, device, monkeypatch):
    """triton_forward_u: y bitwise that of triton_forward and u = L_W(G_pre ⊙ x) (no gate, bias or
    additive; zeros on an output block no instruction feeds). The public call with gates that need a
    gradient runs it once and takes dG from the saved u (no recomputed linear in the backward)."""
    from mmea_kernels.ops.gated_linear import function
    from mmea_kernels.ops.gated_linear.triton_kernels import triton_forward, triton_forward_u

    # an unfed output block (1x1e) and a bias on the 0e output
    spec = LinearSpec.e3nn_default("2x0e+1x0e+2x1o+1x2e+1x0o", "3x0e+2x1o+1x2e+1x1e+2x0o", layout, biases=True)
    gen = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    n = 5
    x, w, b = rnd(n, spec.dim_in), rnd(spec.weight_numel), rnd(spec.bias_numel)
    gp, gq, a = rnd(n, spec.in_layout.num_gates), rnd(n, spec.out_layout.num_gates), rnd(n, spec.out_layout.num_scalars)
    y, u = triton_forward_u(x, w, b, gp, gq, a, spec)
    assert torch.equal(y, triton_forward(x, w, b, gp, gq, a, spec))
    u_ref = gated_linear_reference(gate_mul(x.cpu(), gp.cpu(), spec.in_layout), w.cpu(), None, None, None, spec)
    torch.testing.assert_close(u.cpu(), u_ref, **TOL[torch.float64])
    calls = {"fwd": 0, "fwd_u": 0}
    monkeypatch.setattr(function, "triton_forward",
                        lambda *t: calls.__setitem__("fwd", calls["fwd"] + 1) or triton_forward(*t))
    monkeypatch.setattr(function, "triton_forward_u",
                        lambda *t: calls.__setitem__("fwd_u", calls["fwd_u"] + 1) or triton_forward_u(*t))
    gq.requires_grad_(True)
    w.requires_grad_(True)
    yt = gated_linear(x, w, b, gq, a, spec, backend="triton")
    dg, dw = torch.autograd.grad(yt.sin().sum(), (gq, w))
    assert calls == {"fwd": 0, "fwd_u": 1}  # forward (+u); dG from the saved u; dW from its own kernel
    wr, gr = (t.detach().cpu().requires_grad_() for t in (w, gq))
    ref = gated_linear_reference(x.cpu(), wr, b.cpu(), gr, a.cpu(), spec)
    rg, rw = torch.autograd.grad(ref.sin().sum(), (gr, wr))
    torch.testing.assert_close(dg.cpu(), rg, **TOL[torch.float64])
    torch.testing.assert_close(dw.cpu(), rw, **TOL[torch.float64])
