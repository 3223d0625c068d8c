"""Adapters on cuEquivariance layers (``cuequivariance_torch.Linear``), natively in the ``ir_mul``
layout, and adapted mace-torch MACE models converted between e3nn and cuEquivariance.

Bare layers: MMEA equals its equations written out column by column in ``ir_mul`` order, ELoRA equals
``W_i + (α/r)·A_i B_i`` per descriptor path and merges exactly; identity at init; O(3) equivariance
with random adapter weights; gradcheck and gradgradcheck; errors for the variants that cannot be
supported. MACE: an adapted e3nn MACE and its cuEquivariance conversion (mace-torch's own
``convert_e3nn_cueq``) with the same adapter weights give the same energies and forces (float64).
Runs on CPU with cuequivariance-torch's PyTorch fallback (no cuequivariance-ops).
"""
import copy

import pytest
import torch

cue = pytest.importorskip("cuequivariance")
cuet = pytest.importorskip("cuequivariance_torch")

from e3nn import o3  # noqa: E402

from helpers import (IN, OUT, TOL, assert_rel, build_mace64, default_dtype, max_rel, naive_mmea,  # noqa: E402
                     random_orthogonal, randomise, randomise_adapters)
from mmea_kernels import (ELoRALinear, MMEALinear, adapted_modules, adapter_state_dict,  # noqa: E402
                          disable_adapters, inject_adapters, load_adapter_state_dict, merge_and_unload, unload)
from mmea_kernels.layout import parse_irreps  # noqa: E402
from mmea_kernels.nn import is_equivariant_linear  # noqa: E402
from mmea_kernels.linear_spec import LinearSpec  # noqa: E402

LAYOUTS = {  # id -> (layout_in, layout_out)
    "ir_mul": ("ir_mul", "ir_mul"),
    "mul_ir": ("mul_ir", "mul_ir"),
    "mul_ir->ir_mul": ("mul_ir", "ir_mul"),
}
pytestmark = pytest.mark.usefixtures("one_thread")  # keep_default_dtype is autouse (conftest)


def make_cuet(irreps_in=IN, irreps_out=OUT, layouts=("ir_mul", "ir_mul"), seed=0, **kw):
    torch.manual_seed(seed)
    lin, lout = (getattr(cue, name) for name in layouts)
    return cuet.Linear(cue.Irreps("O3", irreps_in), cue.Irreps("O3", irreps_out), layout_in=lin, layout_out=lout,
                       dtype=torch.float64, **kw)


def dim(irreps):
    return sum(m * (2 * l + 1) for m, l, _ in parse_irreps(irreps))


def columns(irreps, layout):
    """(mul, l, p, cols) of every block, cols[k][m] the column of (multiplicity k, component m),
    written from the definition of the two layouts."""
    out, off = [], 0
    for mul, l, p in parse_irreps(irreps):
        d = 2 * l + 1
        cols = [[off + (k * d + m if layout == "mul_ir" else m * mul + k) for m in range(d)] for k in range(mul)]
        out.append((mul, l, p, cols))
        off += mul * d
    return out


def linear_by_hand(weight, x, layout_in, layout_out, irreps_in=IN, irreps_out=OUT):
    """cuEquivariance's linear written out: for every (input block, output block) pair of equal irreps,
    in input-major order, a row-major [mul_in, mul_out] block of the flat weight, normalised by
    1/sqrt(Σ mul_in into that output block)."""
    bin_, bout = columns(irreps_in, layout_in), columns(irreps_out, layout_out)
    y = torch.zeros(x.shape[0], dim(irreps_out), dtype=x.dtype)
    fan = {j: sum(a[0] for a in bin_ if (a[1], a[2]) == (b[1], b[2])) for j, b in enumerate(bout)}
    off = 0
    for a in bin_:
        for j, b in enumerate(bout):
            if (a[1], a[2]) != (b[1], b[2]):
                continue
            W = weight[off:off + a[0] * b[0]].reshape(a[0], b[0])
            off += a[0] * b[0]
            for m in range(2 * a[1] + 1):
                xin = x[:, [a[3][k][m] for k in range(a[0])]]  # [N, mul_in]
                cols = [b[3][w][m] for w in range(b[0])]
                y[:, cols] += (xin @ W) / fan[j] ** 0.5
    assert off == weight.numel()
    return y


def mmea_by_hand(ad, y, x, layout_in, layout_out, phi="exp"):
    """y' from the method's equations, column by column, in the given layouts."""
    return naive_mmea(ad, y, x, IN, OUT, layout_in, layout_out, phi)


def rep_matrix(irreps, layout, R):
    """The O(3) representation of ``irreps`` at ``R`` in the given column order (``ir_mul``: each
    block is D_l(R) ⊗ 1_mul, ``mul_ir``: 1_mul ⊗ D_l(R))."""
    blocks = []
    for mul, l, p in parse_irreps(irreps):
        D = o3.Irrep(l, p).D_from_matrix(R)
        eye = torch.eye(mul, dtype=R.dtype)
        blocks.append(torch.kron(D, eye) if layout == "ir_mul" else torch.kron(eye, D))
    return torch.block_diag(*blocks)


# ----------------------------------------------------------------------------- the layer itself
def test_recognised_with_irreps_layouts_and_paths():
    lin = make_cuet(layouts=("mul_ir", "ir_mul"))
    assert is_equivariant_linear(lin)
    spec = LinearSpec.from_module(lin)
    assert (spec.in_layout.irreps_str, spec.out_layout.irreps_str, spec.layout, spec.layout_out) == \
        (IN, OUT, "mul_ir", "ir_mul")
    assert (LinearSpec.from_module(make_cuet()).layout, LinearSpec.from_module(make_cuet()).layout_out) == \
        ("ir_mul", "ir_mul")
    assert not is_equivariant_linear(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="adapters wrap e3nn o3.Linear"):
        LinearSpec.from_module(torch.nn.Linear(3, 3))
    paths = spec.instructions
    assert [(p.i_in, p.i_out, p.mul_in, p.mul_out, p.weight_offset) for p in paths] == [
        (0, 0, 3, 4, 0), (1, 0, 2, 4, 12), (2, 1, 2, 3, 20), (3, 2, 1, 2, 26), (4, 3, 1, 2, 28)]
    assert [round(p.path_weight, 12) for p in paths] == [round(5 ** -0.5, 12)] * 2 + [round(2 ** -0.5, 12), 1.0, 1.0]
    # the same blocks, in the same order, as e3nn's instructions
    e3 = o3.Linear(o3.Irreps(IN), o3.Irreps(OUT))
    assert [(p.i_in, p.i_out, p.mul_in, p.mul_out) for p in LinearSpec.from_module(e3).instructions] == \
        [(p.i_in, p.i_out, p.mul_in, p.mul_out) for p in paths]


@pytest.mark.parametrize("layouts", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_cuet_linear_is_the_blockwise_linear_and_equals_e3nn(layouts):
    """What the adapters rely on: the weight blocks of a cuet.Linear as written out above, and the
    same map as an e3nn o3.Linear with the same flat weight (features permuted mul_ir <-> ir_mul)."""
    lin = make_cuet(layouts=layouts)
    x = torch.randn(5, dim(IN), dtype=torch.float64)
    w = lin.weight.detach().reshape(-1)
    torch.testing.assert_close(lin(x), linear_by_hand(w, x, *layouts), rtol=1e-13, atol=1e-13)
    e3 = o3.Linear(o3.Irreps(IN), o3.Irreps(OUT)).double()
    with torch.no_grad():
        e3.weight.copy_(w)
    # the layer's column of each (block, k, m), listed in e3nn's mul_ir order
    src_in = [cols[k][m] for _, l, _, cols in columns(IN, layouts[0]) for k in range(len(cols)) for m in range(2 * l + 1)]
    src_out = [cols[k][m] for _, l, _, cols in columns(OUT, layouts[1]) for k in range(len(cols)) for m in range(2 * l + 1)]
    torch.testing.assert_close(lin(x)[:, src_out], e3(x[:, src_in]), rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- MMEA
@pytest.mark.parametrize("phi", ["exp", "residual"])
@pytest.mark.parametrize("layouts", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_mmea_matches_equations(layouts, phi):
    lin = make_cuet(layouts=layouts)
    ad = MMEALinear(lin, rank=5, phi=phi, backend="torch")
    assert ad.base is lin and ad.base_kind == "cuet"
    assert ad.in_layout.layout == layouts[0] and ad.out_layout.layout == layouts[1]
    assert ad.mmea_down.in_features == 5 and ad.num_additive == 4 and ad.num_gates == 3 + 2 + 2 + 1
    x = torch.randn(6, dim(IN), dtype=torch.float64)
    torch.testing.assert_close(ad(x), lin(x), rtol=0, atol=0)  # identity at init, bit for bit
    randomise(ad)
    y = lin(x)
    torch.testing.assert_close(ad(x), mmea_by_hand(ad, y, x, *layouts, phi=phi), rtol=1e-13, atol=1e-13)
    assert (ad(x) - y).abs().max() > 1e-2


def test_mmea_ir_mul_gate_columns_explicitly():
    """In ir_mul the gate of (block b, multiplicity k) multiplies the columns offset_b + m*mul_b + k."""
    lin = make_cuet()
    ad = MMEALinear(lin, rank=3, backend="torch")
    randomise(ad)
    x = torch.randn(4, dim(IN), dtype=torch.float64)
    y, yp = lin(x), ad(x)
    add, gates = ad.gate_parameters(x)
    # OUT = 4x0e (cols 0..3) + 3x1o (cols 4..12, ir_mul: col 4 + 3m + k) + 2x2e (13..22) + 2x0o + 1x1e
    torch.testing.assert_close(yp[:, 0:4], y[:, 0:4] + add)
    for k in range(3):
        cols = [4 + 3 * m + k for m in range(3)]
        torch.testing.assert_close(yp[:, cols], y[:, cols] * gates[:, k:k + 1])
    for k in range(2):
        cols = [13 + 2 * m + k for m in range(5)]
        torch.testing.assert_close(yp[:, cols], y[:, cols] * gates[:, 3 + k:4 + k])


def test_mmea_gradients_and_double_backward_against_hand_version():
    layouts = LAYOUTS["ir_mul"]
    lin = make_cuet(layouts=layouts)
    ad = MMEALinear(lin, rank=4, backend="torch")
    randomise(ad)
    x = torch.randn(5, dim(IN), dtype=torch.float64, requires_grad=True)
    params = ad.adapter_parameters()

    def grads(fn):
        (gx,) = torch.autograd.grad((fn(x) ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), [x] + params)

    for a, b in zip(grads(ad), grads(lambda x: mmea_by_hand(ad, lin(x), x, *layouts))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def _small_cuet(layouts=("ir_mul", "ir_mul")):
    return make_cuet("2x0e+1x1o+1x0o", "1x0e+2x1o+1x2e+1x0o", layouts=layouts, seed=3)


@pytest.mark.parametrize("cls", [MMEALinear, ELoRALinear])
def test_gradcheck_and_gradgradcheck(cls):
    lin = _small_cuet()
    ad = cls(lin, rank=2, **({"backend": "torch"} if cls is MMEALinear else {}))
    randomise(ad, std=0.3)
    params = ad.adapter_parameters()
    x = torch.randn(3, lin.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in ad.named_parameters() if not n.startswith("base.")]

    def f(x, *ps):
        return torch.func.functional_call(ad, dict(zip(names, ps)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", [MMEALinear, ELoRALinear])
@pytest.mark.parametrize("layouts", [LAYOUTS["ir_mul"], LAYOUTS["mul_ir->ir_mul"]], ids=["ir_mul", "mixed"])
def test_equivariant_with_random_weights(cls, layouts):
    lin = make_cuet(layouts=layouts)
    ad = cls(lin, rank=3)
    randomise(ad)
    x = torch.randn(7, dim(IN), dtype=torch.float64)
    y = ad(x)
    assert (y - lin(x)).abs().max() > 1e-2
    for seed, reflect in [(0, False), (1, True), (2, False), (3, True)]:
        R = random_orthogonal(seed, reflect)
        Din, Dout = rep_matrix(IN, layouts[0], R), rep_matrix(OUT, layouts[1], R)
        torch.testing.assert_close(ad(x @ Din.T), y @ Dout.T, rtol=1e-10, atol=1e-10)


def test_mmea_with_external_weights():
    """shared_weights=False: the weight (one per row) is a forward argument; MMEA passes it on."""
    lin = make_cuet(shared_weights=False)
    ad = MMEALinear(lin, rank=3, backend="torch").double()  # no base parameter to take the dtype from
    randomise(ad)
    x = torch.randn(4, dim(IN), dtype=torch.float64)
    w = torch.randn(4, lin.weight_numel, dtype=torch.float64)
    y = lin(x, w)
    torch.testing.assert_close(ad(x, w), mmea_by_hand(ad, y, x, "ir_mul", "ir_mul"), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_mmea_fused_path_matches_unfused(backend):
    """backend='triton' (interpreter on CPU) and 'cpp' (the C++ kernels; auto's choice on CPU) run
    the fused linear+gate kernel on the cuet.Linear's descriptor paths in ir_mul: same values,
    gradients and second derivatives as the unfused path."""
    from mmea_kernels.ops.backends import backend_status
    from mmea_kernels.ops.gated_linear import cpp_status
    ok, why = backend_status("triton", "cpu") if backend == "triton" else cpp_status("cpu")
    if not ok:
        pytest.skip(why)
    lin = _small_cuet()
    fused, plain = MMEALinear(lin, rank=2, backend=backend), MMEALinear(lin, rank=2, backend="torch")
    randomise(fused, std=0.3)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, lin.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    spec, kernels, one_node = fused._fused(x, (), {})
    assert spec.layout == "ir_mul" and kernels == backend and one_node  # the whole adapter as one autograd node

    def run(ad):
        y = ad(x)
        (gx,) = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
        return [y] + list(torch.autograd.grad((gx ** 2).sum(), [x] + ad.adapter_parameters()))

    for a, b in zip(run(fused), run(plain)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_mmea_auto_path_choice_on_a_cuet_layer(monkeypatch):
    """MMEA_FUSED_LINEAR=auto on a cuet.Linear in ir_mul: the layer times its fused and unfused
    paths (the unfused one runs the cuet layer itself) and, whichever it keeps, gives the unfused
    torch path's values and input gradient."""
    from mmea_kernels.nn.path_choice import auto_choices
    from mmea_kernels.ops.gated_linear import cpp_status
    ok, why = cpp_status("cpu")
    if not ok:
        pytest.skip(why)
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "auto")
    lin = make_cuet()
    auto, plain = MMEALinear(lin, rank=2), MMEALinear(lin, rank=2, backend="torch")
    randomise(auto, std=0.3)
    plain.load_state_dict(auto.state_dict())
    x = torch.randn(30, lin.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    got, ref = auto(x), plain(x)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad((got ** 2).sum(), x)[0],
                               torch.autograd.grad((ref ** 2).sum(), x)[0], rtol=1e-11, atol=1e-11)
    (choice,) = auto_choices(auto)
    assert choice["rows"] == 30 and choice["grad"] and choice["unfused_us"] > 0 and choice["fused_us"] > 0


# ----------------------------------------------------------------------------- ELoRA
@pytest.mark.parametrize("layouts", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_elora_matches_blocks_and_merges_exactly(layouts):
    lin = make_cuet(layouts=layouts)
    w0 = lin.weight.detach().clone()
    ad = ELoRALinear(lin, rank=3, alpha=6.0)
    assert len(ad.elora_A) == 5 and [tuple(a.shape) for a in ad.elora_A] == [(3, 3), (2, 3), (2, 3), (1, 3), (1, 3)]
    x = torch.randn(5, dim(IN), dtype=torch.float64)
    y0 = lin(x)
    torch.testing.assert_close(ad(x), y0, rtol=0, atol=0)  # B = 0 at start
    randomise(ad)
    # ΔW per path written out: W_i + (α/r) A_i B_i on the [mul_in, mul_out] block of the flat weight
    blocks, off = [], 0
    for (m_in, m_out), A, B in zip([(3, 4), (2, 4), (2, 3), (1, 2), (1, 2)], ad.elora_A, ad.elora_B):
        blocks.append((w0[0, off:off + m_in * m_out].reshape(m_in, m_out) + 2.0 * A @ B).reshape(-1))
        off += m_in * m_out
    w = torch.cat(blocks).detach()
    y = ad(x)
    torch.testing.assert_close(y, linear_by_hand(w, x, *layouts), **TOL[torch.float64])
    ref = make_cuet(layouts=layouts)
    with torch.no_grad():
        ref.weight.copy_(w.reshape(1, -1))
    torch.testing.assert_close(y, ref(x), rtol=1e-13, atol=1e-13)
    assert (y - y0).abs().max() > 1e-2
    # the adapter's gradient reaches A and B, not the frozen base weight's value
    lin.weight.requires_grad_(False)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.elora_B)
    merged = ad.merge()
    assert merged is lin and lin.weight.shape == (1, lin.weight_numel)
    torch.testing.assert_close(merged(x), y, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lin.weight.detach(), w.reshape(1, -1), rtol=1e-15, atol=1e-15)


# ----------------------------------------------------------------------------- unsupported variants
def test_elora_rejects_external_weights():
    with pytest.raises(TypeError, match=r"internal weights: this one \(shared_weights=False, internal_weights=False\) "
                                        r"takes its weight as a forward argument"):
        ELoRALinear(make_cuet(shared_weights=False))
    with pytest.raises(TypeError, match="takes its weight as a forward argument"):
        ELoRALinear(make_cuet(internal_weights=False))


def test_elora_rejects_weight_classes():
    lin = make_cuet(weight_classes=2)
    with pytest.raises(TypeError, match="weight_classes=2 is not supported: its weight holds one matrix per class"):
        ELoRALinear(lin)
    # MMEA does not touch the weight: it runs, the class indices pass through
    ad = MMEALinear(lin, rank=2, backend="torch")
    randomise(ad)
    x = torch.randn(4, dim(IN), dtype=torch.float64)
    idx = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(ad(x, weight_indices=idx),
                               mmea_by_hand(ad, lin(x, weight_indices=idx), x, "ir_mul", "ir_mul"))


@pytest.mark.parametrize("cls", [MMEALinear, ELoRALinear])
def test_rejects_non_o3_groups(cls):
    lin = cuet.Linear(cue.Irreps("SO3", "2x0+1x1"), cue.Irreps("SO3", "1x0+1x1"), layout=cue.ir_mul)
    assert is_equivariant_linear(lin)
    with pytest.raises(TypeError, match=r"need O\(3\) irreps .* group SO3"):
        cls(lin)
    src = torch.nn.Sequential(o3.Linear("2x0e+1x1o", "1x0e+1x1o"))  # a saved state: the same reason, named
    inject_adapters(src, cls.method, rank=2)
    with pytest.raises(TypeError, match=r"module '0' cannot take the saved adapters: .*need O\(3\) irreps"):
        load_adapter_state_dict(torch.nn.Sequential(lin), adapter_state_dict(src))


@pytest.mark.parametrize("layer_dtype", [torch.float32, torch.float64])
def test_mmea_on_external_weights_takes_the_default_dtype_and_names_a_mismatch(layer_dtype):
    """A cuet.Linear that takes its weight at forward has no weight to take a dtype from, and its
    constant buffers are float64 whatever its dtype (the adapter was float64 on a float32 layer and
    failed with 'mat1 and mat2 must have the same dtype'): the adapter takes the default dtype, and
    an input of another dtype is named with the fix."""
    torch.manual_seed(0)
    lin = cuet.Linear(cue.Irreps("O3", IN), cue.Irreps("O3", OUT), layout=cue.ir_mul, dtype=layer_dtype,
                      shared_weights=False)
    x = torch.randn(4, dim(IN), dtype=layer_dtype)
    w = torch.randn(4, lin.weight_numel, dtype=layer_dtype)
    with default_dtype(torch.float32):
        ad = MMEALinear(lin, rank=3)
    assert ad.mmea_down.weight.dtype == torch.float32
    if layer_dtype == torch.float32:
        torch.testing.assert_close(ad(x, w), lin(x, w))  # identity at init
    else:
        with pytest.raises(TypeError, match=r"adapter's weights are torch.float32 .* input is torch.float64: .*"
                                            r"model.to\(torch.float64\)"):
            ad(x, w)
        ad.double()
        torch.testing.assert_close(ad(x, w), lin(x, w))


# ----------------------------------------------------------------------------- MACE: e3nn vs cuEquivariance
try:
    import ase  # noqa: F401
    import mace  # noqa: F401
    HAVE_MACE = True
except ImportError:
    HAVE_MACE = False
needs_mace = pytest.mark.skipif(not HAVE_MACE, reason="needs mace-torch and ase")

from mmea_kernels.integrations.cueq import convert_adapted_to_cueq, convert_adapted_to_e3nn  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch, energy_and_forces  # noqa: E402

Z, R_MAX = (1, 6, 8), 5.0
# every kind of linear of a MACE: one-hot embedding, scalar-only, l = 0..3, the unsimplified
# 10-block input of the second interaction, readouts. Correlation 2: the symmetric contraction does
# not touch the linears, and mace-torch's cuEquivariance build of correlation 3 takes ~40 s here.
FULL = dict(hidden_irreps="8x0e+8x1o", max_ell=3, correlation=2, num_interactions=2)


@pytest.fixture(scope="module")
def e3nn_base():
    return build_mace64(**FULL)


@pytest.fixture(scope="module")
def cueq_base(e3nn_base):
    """mace-torch's own conversion of the base model (ir_mul)."""
    from mace.cli.convert_e3nn_cueq import run

    with default_dtype(torch.float64):
        return run(copy.deepcopy(e3nn_base), device="cpu", layout="ir_mul")


@pytest.fixture(scope="module")
def batch():
    return atoms_to_batch(toy_molecules("ethanol", 3) + toy_molecules("toluene", 2, seed=1), Z, R_MAX,
                          dtype=torch.float64)


def evaluate(model, batch):
    e, f = energy_and_forces(model, batch)
    return e.detach(), f.detach()


METHODS = [pytest.param("mmea", {}, 0.1, id="mmea"), pytest.param("mmea", {"phi": "residual"}, 0.1, id="mmea-residual"),
           pytest.param("elora", {}, 0.5, id="elora")]


def adapted(base, method, opts, std, rank=4):
    model = copy.deepcopy(base)
    inject_adapters(model, method, rank=rank, **opts)
    # random, nonzero adapter weights (std: exp gates compound over layers)
    return randomise_adapters(model, std, seed=1234)


@needs_mace
@pytest.mark.parametrize("method,opts,std", METHODS)
def test_mace_e3nn_and_cueq_agree(e3nn_base, batch, method, opts, std):
    model = adapted(e3nn_base, method, opts, std)
    e, f = evaluate(model, batch)
    e_base, f_base = evaluate(e3nn_base, batch)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    assert max_rel(e, e_base) > 1e-3 and max_rel(f, f_base) > 1e-3  # the adapters change the model

    cq = convert_adapted_to_cueq(model)
    # the source model is unchanged: same adapters, same output, no tensor shared with the result
    assert adapted_modules(model) and all(isinstance(m.base, o3.Linear) for m in adapted_modules(model).values())
    e_again, f_again = evaluate(model, batch)
    assert torch.equal(e_again, e) and torch.equal(f_again, f)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ptrs for p in cq.parameters())
    second = model.get_submodule("interactions.1.linear")
    assert len(second.in_layout.blocks) == 10 and second.in_layout.num_scalars == 16
    assert {b.l for b in second.out_layout.blocks} == {0, 1, 2, 3}
    mods = adapted_modules(cq)
    assert list(mods) == list(adapted_modules(model)) and len(mods) == 10
    assert all(isinstance(m.base, cuet.Linear) and m.layout_name == "ir_mul" for m in mods.values())
    assert all(p.dtype == torch.float64 for p in cq.parameters())
    trainable = {n for n, p in cq.named_parameters() if p.requires_grad}
    assert trainable and all(".base." not in n for n in trainable)
    e_cq, f_cq = evaluate(cq, batch)
    assert_rel(e_cq, e, "energies")
    assert_rel(f_cq, f, "forces")
    with disable_adapters(cq):
        e0, f0 = evaluate(cq, batch)
    assert_rel(e0, e_base, "energies")
    assert_rel(f0, f_base, "forces")

    # and back: mace-torch's cueq -> e3nn conversion, adapters carried along
    back = convert_adapted_to_e3nn(cq)
    assert all(isinstance(m.base, o3.Linear) for m in adapted_modules(back).values())
    e_b, f_b = evaluate(back, batch)
    assert_rel(e_b, e, "energies")
    assert_rel(f_b, f, "forces")


@needs_mace
def test_mace_mul_ir_conversion_and_state_dict_route(e3nn_base, cueq_base, batch):
    """Adapter weights saved from the e3nn model load into a plain cuEquivariance conversion (either
    layout) and give the same model; the ir_mul gates really use ir_mul columns."""
    from mace.cli.convert_e3nn_cueq import run

    model = adapted(e3nn_base, "mmea", {}, 0.1)
    e, f = evaluate(model, batch)
    state = adapter_state_dict(model)
    for layout in ("ir_mul", "mul_ir"):
        if layout == "ir_mul":
            cq = copy.deepcopy(cueq_base)
        else:
            with default_dtype(torch.float64):
                cq = run(copy.deepcopy(e3nn_base), device="cpu", layout=layout)
        load_adapter_state_dict(cq, state)
        assert {m.layout_name for m in adapted_modules(cq).values()} == {layout}
        e_cq, f_cq = evaluate(cq, batch)
        assert_rel(e_cq, e, "energies")
        assert_rel(f_cq, f, "forces")
        if layout == "ir_mul":  # control: reading the ir_mul outputs as mul_ir changes the result
            from mmea_kernels import IrrepsLayout
            for m in adapted_modules(cq).values():  # on the unfused path, which reads out_layout
                m.out_layout = IrrepsLayout.of(m.out_layout.irreps_str, "mul_ir")
                m.backend = "torch"
            e_w, f_w = evaluate(cq, batch)
            assert max_rel(f_w, f) > 1e-6


@needs_mace
def test_mace_elora_merges_exactly_on_cueq(e3nn_base, batch):
    model = adapted(e3nn_base, "elora", {}, 0.5)
    cq = convert_adapted_to_cueq(model)
    e, f = evaluate(cq, batch)
    merged = merge_and_unload(cq)
    assert not adapted_modules(merged)
    e_m, f_m = evaluate(merged, batch)
    assert_rel(e_m, e, "energies")
    assert_rel(f_m, f, "forces")


@needs_mace
def test_inject_directly_into_cueq_mace_and_errors(e3nn_base, cueq_base, batch):
    cq = copy.deepcopy(cueq_base)
    e0, f0 = evaluate(cq, batch)
    rep = inject_adapters(cq, "mmea", rank=4)
    assert len(rep.modules) == 10 and rep.modules[0].name == "node_embedding.linear"
    e1, f1 = evaluate(cq, batch)
    # identity at init (to round-off: the fused C++ linear sums in another order than cuet's own path)
    assert (e1 - e0).abs().max() <= 1e-12 and (f1 - f0).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="already has cuequivariance_torch Linear layers"):
        convert_adapted_to_cueq(cq)
    unload(cq)
    with pytest.raises(ValueError, match="model has no adapters"):
        convert_adapted_to_e3nn(cq)
    with pytest.raises(ValueError, match="has no cuequivariance_torch Linear layer"):
        convert_adapted_to_e3nn(adapted(e3nn_base, "mmea", {}, 0.1))
    with pytest.raises(TypeError, match="expected a mace-torch MACE model"):
        convert_adapted_to_cueq(torch.nn.Sequential(MMEALinear(o3.Linear("2x0e", "2x0e"))))
    from mmea_kernels.train.methods import apply_method

    paper = copy.deepcopy(e3nn_base)
    apply_method(paper, "mmea-paper", rank=2, seed=0)  # low-rank parametrizations: a KeyError deep in mace before
    with pytest.raises(ValueError, match="parametrized weights .* fold them into their weights first"):
        convert_adapted_to_cueq(paper)
    merged = adapted(e3nn_base, "elora", {}, 0.1)  # refused before mace-torch converts, as what they are
    for m in adapted_modules(merged).values():
        m.merge()
    with pytest.raises(ValueError, match=r"cannot convert: ELoRA adapters on node_embedding\.linear \(10 in all\) are "
                                         "merged"):
        convert_adapted_to_cueq(merged)
    tp = copy.deepcopy(e3nn_base)
    apply_method(tp, "mmea-tp", rank=2, seed=0)
    with pytest.raises(ValueError, match=r"cannot convert: mmea-tp gates on tensor products \(interactions\.0"):
        convert_adapted_to_cueq(tp)


@needs_mace
def test_elora_state_with_other_blocks_is_refused(e3nn_base, cueq_base):
    model = adapted(e3nn_base, "elora", {}, 0.5)
    state = adapter_state_dict(model)
    name = "interactions.1.linear"
    assert state["targets"][name]["paths"][:2] == [[0, 0], [1, 0]]
    state["targets"][name]["paths"][0], state["targets"][name]["paths"][1] = [1, 0], [0, 0]
    cq = copy.deepcopy(cueq_base)
    with pytest.raises(ValueError, match=r"module 'interactions.1.linear': saved ELoRA blocks \(i_in, i_out\)"):
        load_adapter_state_dict(cq, state)
