"""Parity tests of the compiled C++ backend (``mmea_kernels._C``, csrc/gate_ops.cpp) against the
torch backend: random layouts (hypothesis), reduced precision, non-contiguous and large inputs
(several OpenMP chunks), determinism of the shared reduction, input checks of the extension ops,
and the reason given when the extension is missing.

Everything except :func:`test_available_reports_missing_extension` needs the extension and is
skipped, with the reason, when it is not built (``pip install --no-build-isolation -e .``).
"""
import sys
import warnings

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mmea_kernels  # noqa: E402
from mmea_kernels import IrrepsLayout, gate_mul, seg_dot  # noqa: E402
from mmea_kernels.ops import backend_status, resolve_backend  # noqa: E402
from mmea_kernels.ops.gate import cpp as cpp_backend, reference as torch_backend  # noqa: E402
from mmea_kernels.ops.backends import clear_backend_cache  # noqa: E402
from mmea_kernels.ops.tables import layout_tables  # noqa: E402

from helpers import CPP_DEVICES, TOL, gate_case_strategies, gate_inputs, irreps_string  # noqa: E402

CPU = torch.device("cpu")
EXT_OK, EXT_WHY = cpp_backend.available(CPU)
needs_ext = pytest.mark.skipif(not EXT_OK, reason=f"cpp backend unavailable: {EXT_WHY}")


def skip_unless_kernels(device):
    """The extension's kernels for ``device``: the CPU ones, or the CUDA ones where built."""
    ok, why = cpp_backend.available(torch.device(device))
    if not ok:
        pytest.skip(why)

IRREPS = "2x0e+2x1o+1x0o+1x2e+1x1e"


# ---------------------------------------------------------------------------- random layouts
@needs_ext
@pytest.mark.parametrize("device", CPP_DEVICES)
@settings(max_examples=80, deadline=None)
@given(**gate_case_strategies(st.integers(0, 4), max_n=50), keep=st.booleans())
def test_parity_with_torch_backend(device, blocks, layout, n, shared, keep, dtype, seed):
    skip_unless_kernels(device)
    irreps = irreps_string(blocks)
    L = IrrepsLayout.of(irreps, layout)
    t = layout_tables(L, device)
    x, b, g = (v.to(device) for v in gate_inputs(L, n, shared, seed, dtype))

    y = cpp_backend.gate_mul(x, g, t, keep)
    y_ref = torch_backend.gate_mul(x, g, t, keep)
    assert y.shape == y_ref.shape and y.dtype == dtype
    # one rounded product per element in both backends: bitwise equal (0.0 == -0.0)
    assert torch.equal(y, y_ref), (irreps, layout, (y - y_ref).abs().max())

    s = cpp_backend.seg_dot(x, b, t, shared)
    s_ref = torch_backend.seg_dot(x, b, t, shared)
    assert s.shape == s_ref.shape and s.dtype == dtype
    # float32: sums of up to 50 rows x 7 columns in another order, hence atol 1e-4
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s, s_ref, **tol)


@needs_ext
@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("shared", [False, True])
def test_reduced_precision_accumulates_in_fp32(dtype, layout, shared, device):
    skip_unless_kernels(device)
    L = IrrepsLayout.of("3x0e+4x1o+2x2e+1x3o+2x0o", layout)
    t = layout_tables(L, device)
    x, b, g = (v.to(device) for v in gate_inputs(L, 37, shared, 3, dtype))
    for keep in (True, False):
        y = cpp_backend.gate_mul(x, g, t, keep)
        assert y.dtype == dtype
        # both compute in fp32 and round once
        torch.testing.assert_close(y, torch_backend.gate_mul(x, g, t, keep), rtol=0, atol=0)
    s = cpp_backend.seg_dot(x, b, t, shared)
    assert s.dtype == dtype
    ref = torch_backend.seg_dot(x.double(), b.double(), t, shared)
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(s.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())


@needs_ext
def test_ungated_columns_zeroed_exactly():
    L = IrrepsLayout.of("2x0e+1x1o", "mul_ir")
    t = layout_tables(L, CPU)
    x = torch.tensor([[-1.0, float("inf"), 2.0, -3.0, 4.0]])
    y = cpp_backend.gate_mul(x, torch.tensor([[2.0]]), t, False)
    assert torch.equal(y, torch.tensor([[0.0, 0.0, 4.0, -6.0, 8.0]]))
    assert not torch.signbit(y[0, 0])  # a true 0, not x * 0
    assert torch.equal(cpp_backend.gate_mul(x, torch.tensor([2.0]), t, False), y)


# ---------------------------------------------------------------------------- large / strided
@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_large_noncontiguous_inputs(layout, two_threads):
    """N = 3000 spans many OpenMP row chunks (and shared chunks of 64 rows, with a ragged last one)."""
    L = IrrepsLayout.of("16x0e+16x1o+8x2e+4x3o+3x0o", layout)
    t = layout_tables(L, CPU)
    gen = torch.Generator().manual_seed(5)
    n = 3000
    x = torch.randn(L.dim, n, generator=gen, dtype=torch.float64).t()  # [n, D], column-major
    b = torch.randn(n, 2 * L.dim, generator=gen, dtype=torch.float64)[:, ::2]  # [n, D], strided
    assert not x.is_contiguous() and not b.is_contiguous()
    g = torch.randn(L.num_gates, n, generator=gen, dtype=torch.float64).t()
    gs = torch.randn(2 * L.num_gates, generator=gen, dtype=torch.float64)[::2]
    for gates in (g, gs):
        for keep in (True, False):
            assert torch.equal(cpp_backend.gate_mul(x, gates, t, keep),
                               torch_backend.gate_mul(x.contiguous(), gates.contiguous(), t, keep))
    for shared in (False, True):
        torch.testing.assert_close(cpp_backend.seg_dot(x, b, t, shared),
                                   torch_backend.seg_dot(x.contiguous(), b.contiguous(), t, shared),
                                   rtol=1e-12, atol=1e-10)
    # float32 through the public API (autograd wrapper included)
    xf, bf = x.float(), b.float().requires_grad_()
    torch.testing.assert_close(seg_dot(xf, bf, L, shared=True, backend="cpp"),
                               seg_dot(xf, bf, L, shared=True, backend="torch"), rtol=1e-4, atol=1e-2)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_seg_dot_is_deterministic(dtype, two_threads):
    L = IrrepsLayout.of("8x0e+32x1o+16x2e+8x3o", "mul_ir")
    t = layout_tables(L, CPU)
    a, b, _ = gate_inputs(L, 4099, True, 11, dtype)
    first = cpp_backend.seg_dot(a, b, t, True)
    for _ in range(3):
        assert torch.equal(cpp_backend.seg_dot(a, b, t, True), first)
    # fixed chunks: the same bits whatever the thread count
    torch.set_num_threads(1)
    assert torch.equal(cpp_backend.seg_dot(a, b, t, True), first)


@needs_ext
def test_per_row_results_do_not_depend_on_threads(two_threads):
    L = IrrepsLayout.of("8x0e+32x1o+16x2e+8x3o", "ir_mul")
    t = layout_tables(L, CPU)
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(2500, L.dim, generator=gen), torch.randn(2500, L.dim, generator=gen)
    g = torch.randn(2500, L.num_gates, generator=gen)
    y2, s2 = cpp_backend.gate_mul(a, g, t, True), cpp_backend.seg_dot(a, b, t, False)
    torch.set_num_threads(1)
    assert torch.equal(cpp_backend.gate_mul(a, g, t, True), y2)
    assert torch.equal(cpp_backend.seg_dot(a, b, t, False), s2)


# ---------------------------------------------------------------------------- op checks
@needs_ext
def test_op_input_checks():
    L = IrrepsLayout.of("2x0e+2x1o", "mul_ir")
    t = layout_tables(L, CPU)
    ops = torch.ops.mmea_kernels_ext
    x, g = torch.randn(3, L.dim), torch.randn(3, L.num_gates)
    with pytest.raises(RuntimeError, match=r"gate_mul: gate_of_column must be an int32 tensor .*got dtype Long"):
        ops.gate_mul(x, g, t.gate_of_column.long(), True)
    with pytest.raises(RuntimeError, match=r"seg_dot: gate_of_column must be an int32 tensor"):
        ops.seg_dot(x, x, t.gate_of_column.long(), t.gate_cols_padded, False)
    with pytest.raises(RuntimeError, match=r"seg_dot: gate_cols_padded must be an int32 tensor"):
        ops.seg_dot(x, x, t.gate_of_column, t.gate_cols_padded.long(), False)
    with pytest.raises(RuntimeError, match=r"gate_of_column has 7 entries but x has 8 columns"):
        ops.gate_mul(x, g, t.gate_of_column[:7], True)
    bad = t.gate_of_column.clone()
    bad[5] = 2
    with pytest.raises(RuntimeError, match=r"gate_of_column\[5\] = 2 is out of range"):
        ops.gate_mul(x, g, bad, True)
    with pytest.raises(RuntimeError, match=r"gates have dtype Double but x has dtype Float"):
        ops.gate_mul(x, g.double(), t.gate_of_column, True)
    with pytest.raises(RuntimeError, match=r"gates must be \[N, G\] \(per row\) or \[G\] \(shared\) with N = 3"):
        ops.gate_mul(x, torch.randn(4, 2), t.gate_of_column, True)
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[N, D\]"):
        ops.gate_mul(x[0], g[0], t.gate_of_column, True)
    with pytest.raises(RuntimeError, match=r"must be a floating-point tensor"):
        ops.gate_mul(x.long(), g.long(), t.gate_of_column, True)
    with pytest.raises(RuntimeError, match=r"a has shape \[3, 8\] but b has shape \[2, 8\]"):
        ops.seg_dot(x, x[:2], t.gate_of_column, t.gate_cols_padded, True)


@needs_ext
def test_fake_implementations():
    """The ops carry fake (meta) kernels, so torch.compile / FakeTensor tracing sees their shapes."""
    L = IrrepsLayout.of(IRREPS, "ir_mul")
    t = layout_tables(L, CPU)
    x, g = torch.randn(5, L.dim), torch.randn(5, L.num_gates)
    torch.library.opcheck(torch.ops.mmea_kernels_ext.gate_mul.default, (x, g, t.gate_of_column, True))
    torch.library.opcheck(torch.ops.mmea_kernels_ext.gate_mul.default, (x, g[0], t.gate_of_column, False))
    for shared in (False, True):
        torch.library.opcheck(torch.ops.mmea_kernels_ext.seg_dot.default,
                              (x, x, t.gate_of_column, t.gate_cols_padded, shared))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fgoc, fcols = mode.from_tensor(t.gate_of_column), mode.from_tensor(t.gate_cols_padded)
        assert torch.ops.mmea_kernels_ext.seg_dot(fx, fx, fgoc, fcols, True).shape == (L.num_gates,)
        assert torch.ops.mmea_kernels_ext.seg_dot(fx, fx, fgoc, fcols, False).shape == (5, L.num_gates)


@needs_ext
def test_cuda_tensors_need_the_cuda_kernels():
    ok, why = cpp_backend.available(torch.device("cuda"))
    if getattr(cpp_backend._EXT, "WITH_CUDA", 0):
        assert ok
    else:
        assert not ok and "built without its CUDA kernels" in why
    ok, why = cpp_backend.available(torch.device("meta"))
    assert not ok and "meta" in why


# ---------------------------------------------------------------------------- missing extension
def test_available_reports_missing_extension(monkeypatch):
    """Without the compiled extension the backend says why and how to build it; auto falls back."""
    monkeypatch.delattr(mmea_kernels, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "mmea_kernels._C", None)  # makes `from .. import _C` fail
    ext, err = cpp_backend._import_ext()
    assert ext is None and isinstance(err, ImportError)
    monkeypatch.setattr(cpp_backend, "_EXT", None)
    monkeypatch.setattr(cpp_backend, "_EXT_ERROR", err)
    ok, why = cpp_backend.available(CPU)
    assert not ok
    assert "mmea_kernels._C is not built or failed to import" in why
    assert str(err) in why and type(err).__name__ in why
    assert "pip install --no-build-isolation -e ." in why
    assert backend_status("cpp", "cpu") == (False, why)
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    clear_backend_cache()  # resolutions are cached per process; this test uninstalls the extension
    try:
        with pytest.warns(RuntimeWarning, match=r"cpp backend is not available for cpu tensors .*torch backend"):
            assert resolve_backend(None, "cpu").name == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, then quiet
            assert resolve_backend("auto", "cpu").name == "torch"
        _rest_of_missing_extension_checks(monkeypatch)
    finally:
        clear_backend_cache()


def _rest_of_missing_extension_checks(monkeypatch):
    L = IrrepsLayout.of("2x0e+2x1o", "mul_ir")
    with pytest.raises(RuntimeError, match=r"backend='cpp' is not available for cpu tensors: the C\+\+ extension"):
        gate_mul(torch.randn(3, 8), torch.randn(3, 2), L, backend="cpp")


@needs_ext
def test_ext_op_status_names_a_missing_op_and_its_source():
    """An extension built before a kernel file was added: the status names the kernels and the source
    to rebuild; ops that exist report available."""
    ok, why = cpp_backend.ext_op_status("no_such_op", "imaginary", "csrc/imaginary.cpp")
    assert not ok and "predates the imaginary kernels (csrc/imaginary.cpp)" in why and "rebuild" in why
    assert cpp_backend.ext_op_status("gate_mul", "gate", "csrc/gate_ops.cpp") == (True, "")
