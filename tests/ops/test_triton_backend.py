"""Parity tests of the triton backend against the torch backend and a naive float64 reference.

Runs once per device (``helpers.TRITON_DEVICES``): on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest before triton decorates any kernel) and on CUDA where a
GPU exists (``MMEA_TEST_CUDA=1``).
"""
import os

import contextlib  # noqa: E402
import math  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmea_kernels.layout import IrrepsLayout  # noqa: E402
from mmea_kernels.ops.gate import reference as torch_backend, triton as triton_backend  # noqa: E402
from mmea_kernels.ops.tables import layout_tables  # noqa: E402

from helpers import (CUDA_AVAILABLE, TOL, TRITON_DEVICES, gate_case_strategies, gate_inputs,  # noqa: E402
                     irreps_string)

if os.environ.get("TRITON_INTERPRET") != "1" and not CUDA_AVAILABLE:
    pytest.skip("the triton backend runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1",
                allow_module_level=True)

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------- naive reference
def naive_gate_of_column(blocks, layout):
    """Column -> gate map straight from the (mul, l, parity) list, independent of layout.py."""
    out = []
    gate = 0
    for mul, l, par in blocks:
        d = 2 * l + 1
        if l == 0 and par == "e":
            out += [-1] * (mul * d)
            continue
        cols = [None] * (mul * d)
        for k in range(mul):
            for m in range(d):
                local = k * d + m if layout == "mul_ir" else m * mul + k
                cols[local] = gate + k
        out += cols
        gate += mul
    return out, gate


def naive_gate_mul(x, gates, gate_of, keep_ungated):
    xs = x.double().tolist()
    shared = gates.dim() == 1
    gs = gates.double().tolist()
    y = []
    for n, row in enumerate(xs):
        yr = []
        for c, v in enumerate(row):
            g = gate_of[c]
            if g < 0:
                yr.append(v if keep_ungated else 0.0)
            else:
                yr.append(v * (gs[g] if shared else gs[n][g]))
        y.append(yr)
    return torch.tensor(y, dtype=torch.float64).reshape(x.shape)


def naive_seg_dot(a, b, gate_of, num_gates, shared):
    A = a.double().tolist()
    B = b.double().tolist()
    res = [[0.0] * num_gates for _ in A]
    for n in range(len(A)):
        for c, g in enumerate(gate_of):
            if g >= 0:
                res[n][g] += A[n][c] * B[n][c]
    out = torch.tensor(res, dtype=torch.float64).reshape(len(A), num_gates)
    return out.sum(0) if shared else out


# ---------------------------------------------------------------------------- helpers
def parse_blocks(text):
    out = []
    for term in text.split("+"):
        mul, ir = term.split("x")
        out.append((int(mul), int(ir[:-1]), ir[-1]))
    return out


def assert_close(got, ref, dtype, what):
    assert not torch.isnan(got).any(), f"{what}: NaN left in output"
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def small_blocks(enabled):
    """Force tiny tiles so that the small test shapes span several row/column/gate blocks."""
    if not enabled:
        yield
        return
    with mock.patch.object(triton_backend, "_gate_mul_blocks", lambda n, d, interp: (4, 8, 1)), \
            mock.patch.object(triton_backend, "_seg_dot_blocks", lambda n, g, w, interp: (4, 2, 1)):
        yield


def run_case(blocks, layout, n, dtype, shared, keep_ungated, seed, tiny_blocks, device="cpu"):
    text = irreps_string(blocks)
    L = IrrepsLayout.of(text, layout)
    t = layout_tables(L, device)
    gate_of, G = naive_gate_of_column(blocks, layout)
    assert list(L.gate_of_column) == gate_of and L.num_gates == G
    D = L.dim
    x, b, gates = (v.to(device) for v in gate_inputs(L, n, shared, seed, dtype))

    with small_blocks(tiny_blocks):
        # gate_mul, twice into fresh (uninitialised) outputs: every element is written
        y = triton_backend.gate_mul(x, gates, t, keep_ungated)
        y2 = triton_backend.gate_mul(x, gates, t, keep_ungated)
        ref_t = torch_backend.gate_mul(x, gates, t, keep_ungated)
        ref_n = naive_gate_mul(x.cpu(), gates.cpu(), gate_of, keep_ungated)
        assert y.shape == y2.shape == (n, D) and y.dtype == y2.dtype == dtype
        assert_close(y, ref_t, dtype, f"gate_mul vs torch {text} {layout}")
        assert_close(y, ref_n, dtype, f"gate_mul vs naive {text} {layout}")
        assert torch.equal(y, y2)
        if dtype in (torch.float32, torch.float64):  # one multiply, one rounding: bit-exact
            assert torch.equal(y, ref_t)

        # seg_dot
        shape = (G,) if shared else (n, G)
        s = triton_backend.seg_dot(x, b, t, shared)
        s2 = triton_backend.seg_dot(x, b, t, shared)
        ref_t = torch_backend.seg_dot(x, b, t, shared)
        ref_n = naive_seg_dot(x.cpu(), b.cpu(), gate_of, G, shared)
        assert s.shape == s2.shape == shape and s.dtype == s2.dtype == dtype
        assert_close(s, ref_t, dtype, f"seg_dot vs torch {text} {layout} shared={shared}")
        assert_close(s, ref_n, dtype, f"seg_dot vs naive {text} {layout} shared={shared}")
        assert torch.equal(s, s2)  # deterministic


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("device", TRITON_DEVICES)
@settings(max_examples=30, deadline=None)
@given(**gate_case_strategies(st.sampled_from([0, 1, 2, 3, 5]), max_n=37), keep_ungated=st.booleans(),
       tiny_blocks=st.booleans())
@example(blocks=[(2, 0, "e"), (3, 0, "o"), (1, 1, "e"), (1, 1, "e"), (2, 3, "o")], layout="ir_mul", n=37,
         dtype=torch.float32, shared=False, keep_ungated=False, seed=0, tiny_blocks=True)
@example(blocks=[(5, 1, "o"), (3, 0, "e"), (5, 1, "o"), (0, 2, "e")], layout="mul_ir", n=13,
         dtype=torch.float64, shared=True, keep_ungated=True, seed=1, tiny_blocks=False)
@example(blocks=[(3, 0, "e")], layout="mul_ir", n=5, dtype=torch.float32, shared=True,
         keep_ungated=True, seed=2, tiny_blocks=False)  # no gate at all
@example(blocks=[(0, 1, "o"), (0, 0, "e")], layout="ir_mul", n=3, dtype=torch.float32, shared=False,
         keep_ungated=False, seed=3, tiny_blocks=False)  # D == 0
@example(blocks=[(2, 2, "o"), (1, 0, "e")], layout="ir_mul", n=0, dtype=torch.float64, shared=True,
         keep_ungated=True, seed=4, tiny_blocks=True)  # N == 0, shared -> zeros
def test_parity_random_layouts(device, blocks, layout, n, dtype, shared, keep_ungated, seed, tiny_blocks):
    run_case(blocks, layout, n, dtype, shared, keep_ungated, seed, tiny_blocks, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("shared", [False, True])
def test_low_precision(dtype, layout, shared, device):
    """fp32 accumulation: within ~1e-2 relative of the float64 reference."""
    run_case(parse_blocks("3x0e+2x0o+2x1e+3x1o+1x2e+2x3o"), layout, 23, dtype, shared,
             keep_ungated=True, seed=11, tiny_blocks=False, device=device)
    run_case(parse_blocks("1x0e+4x1o+2x2o"), layout, 17, dtype, shared,
             keep_ungated=False, seed=12, tiny_blocks=True, device=device)


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_multi_block_default_sizes(layout, device):
    """Shapes large enough for several row, column and gate blocks with the default block sizes."""
    blocks = parse_blocks("5x0e+40x1o+20x2e+8x3o+3x0o")  # D = 284, G = 71
    for shared in (False, True):
        run_case(blocks, layout, 150, torch.float32, shared, keep_ungated=shared, seed=5, tiny_blocks=False,
                 device=device)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the GPU tiles through the interpreter")
def test_gpu_tiles_through_the_interpreter(monkeypatch):
    """The tiles the GPU gets (4 x 512 for gate_mul, 8 x 64 for seg_dot, from the H200 sweep) on CPU
    tensors: several row blocks, a partial column block, a partial gate block, both layouts."""
    monkeypatch.setattr(triton_backend, "interpreting", lambda device: False)
    assert triton_backend._gate_mul_blocks(150, 284, False) == (4, 512, 4)
    # 512 columns, or 256 where that leaves fewer idle columns in the last block
    assert [triton_backend._gate_mul_blocks(32000, d, False)[:2] for d in (512, 640, 1152, 2048, 3)] == \
        [(4, 512), (8, 256), (8, 256), (4, 512), (512, 4)]
    assert triton_backend._seg_dot_blocks(150, 71, 7, False) == (8, 64, 4)
    blocks = parse_blocks("5x0e+40x1o+20x2e+8x3o+3x0o")  # D = 284, G = 71
    for layout in ("mul_ir", "ir_mul"):
        for shared in (False, True):
            run_case(blocks, layout, 37, torch.float64, shared, keep_ungated=not shared, seed=7, tiny_blocks=False)


def test_bf16_seg_dot_accumulates_in_fp32(device):
    """Many small terms: a bf16 accumulator would lose them, fp32 accumulation does not."""
    L = IrrepsLayout.of("1x3o", "mul_ir")
    t = layout_tables(L, device)
    a = torch.full((40, 7), 1.0, dtype=torch.bfloat16, device=device)
    a[:, 0] = 256.0
    b = torch.ones_like(a)
    s = triton_backend.seg_dot(a, b, t, shared=False)
    assert torch.all(s.float() == 262.0)  # 256 + 6, exactly representable in bf16
    s = triton_backend.seg_dot(a, b, t, shared=True)
    assert math.isclose(s.float().item(), 40 * 262.0, rel_tol=1e-2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter mode")
def test_available():
    ok, why = triton_backend.available(CPU)
    assert ok and why == ""
    assert triton_backend.name == "triton"
    ok, why = triton_backend.available(torch.device("meta"))
    assert not ok and "CUDA" in why
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        ok, why = triton_backend.available(CPU)
        assert not ok and "TRITON_INTERPRET" in why
