"""torch.compile sees the gate ops as single custom ops: registration checks (opcheck), no graph
breaks in an adapted linear or an adapted MACE, compiled results equal eager ones."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import mmea_kernels as mk
from mmea_kernels import IrrepsLayout, MMEALinear
from mmea_kernels.ops.gate.function import layout_key

from helpers import MODEL_RTOL, REPO

HERE = pathlib.Path(__file__).resolve().parent  # this file's folder, for the fresh interpreter's import


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("shared", [False, True])
def test_opcheck_custom_ops(layout, shared):
    L = IrrepsLayout.of("2x0e+2x1o+1x2e+1x0o", layout)
    x = torch.randn(4, L.dim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, L.dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*((L.num_gates,) if shared else (4, L.num_gates)), dtype=torch.float64, requires_grad=True)
    key = layout_key(L)
    torch.library.opcheck(torch.ops.mmea_kernels.gate_mul, (x, g, key, True, "torch"))
    torch.library.opcheck(torch.ops.mmea_kernels.seg_dot, (x, b, key, shared, "torch"))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_eager_calls_skip_the_custom_ops_and_match_them(backend):
    """Outside torch.compile, gate_mul, seg_dot and FusedGate run their kernels without the custom
    ops' dispatch (a profiler shows no mmea_kernels:: op), with the values, gradients and second
    derivatives of the custom ops called directly (float64)."""
    from e3nn import o3  # noqa: F401 - FusedGate's irreps
    from mmea_kernels import gate_mul, seg_dot
    from mmea_kernels.nn import FusedGate
    from mmea_kernels.ops import backend_status
    if not backend_status(backend, "cpu")[0]:
        pytest.skip(backend_status(backend, "cpu")[1])
    torch.manual_seed(0)
    L = IrrepsLayout.of("2x0e+2x1o+1x2e+1x0o", "ir_mul")
    key = layout_key(L)
    x = torch.randn(5, L.dim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, L.dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, L.num_gates, dtype=torch.float64, requires_grad=True)
    fg = FusedGate("3x0e", [torch.tanh], "2x0e", [torch.sigmoid], "1x1o+1x2e", backend=backend).double()
    xf = torch.randn(5, fg.irreps_in.dim, dtype=torch.float64, requires_grad=True)

    def run(eager):
        if eager:
            y1, y2, y3 = gate_mul(x, g, L, backend=backend), seg_dot(x, b, L, backend=backend), fg(xf)
        else:
            y1 = torch.ops.mmea_kernels.gate_mul(x, g, key, True, backend)
            y2 = torch.ops.mmea_kernels.seg_dot(x, b, key, False, backend)
            y3 = torch.ops.mmea_kernels.fused_gate(xf, fg._key, backend)
        loss = (y1.sin().sum() + (y2 * y2).sum() + y3.cos().sum())
        first = torch.autograd.grad(loss, (x, b, g, xf), create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in first), (x, b, g, xf))
        return [y1, y2, y3, *first, *second]

    with torch.profiler.profile() as prof:
        got = run(eager=True)
    assert not [e.name for e in prof.events() if e.name.startswith("mmea_kernels::")]
    with torch.profiler.profile() as prof:
        want = run(eager=False)
    assert any(e.name.startswith("mmea_kernels::") for e in prof.events())  # the reference did use them
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)


def _need_kernels(backend):
    from mmea_kernels.ops import backend_status
    from mmea_kernels.ops.gated_linear import cpp_status
    ok, why = cpp_status("cpu") if backend == "cpp" else backend_status("triton", "cpu")
    if not ok:
        pytest.skip(why)


def test_traced_tells_fake_and_functional_tensors_from_plain_ones():
    """``traced`` picks the custom ops (tracing) or the kernels (eager): plain tensors are not traced,
    fake tensors and functional wrappers are (with or without requires_grad), as inside compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmea_kernels.ops._utils import traced
    plain = torch.randn(3, 2)
    assert not traced(plain) and not traced(plain.requires_grad_(True)) and not traced(plain[:, :1])
    with FakeTensorMode() as mode:
        fake = torch.empty(3, 2)
    assert traced(fake) and traced(mode.from_tensor(torch.randn(2, requires_grad=True)))
    seen = []
    torch.func.functionalize(lambda t: seen.append(traced(t)) or t * 2)(torch.randn(2))
    assert seen == [False]  # functionalized real tensors hold data: the kernels can run on them
    assert torch.compile(lambda t: torch.full((1,), float(traced(t))), backend="eager", fullgraph=True)(plain) == 1


@pytest.mark.parametrize("shared", [False, True])
def test_opcheck_fused_linear_ops(shared):
    """The fused linear's custom ops (what torch.compile traces): schema, fake implementations and
    registered autograd (torch.library.opcheck), with prologue and epilogue gates, bias, additive;
    the saved-output form (y and the pre-gate output u) too."""
    from helpers import grad_inputs
    _need_kernels("cpp")
    spec, (x, w, b, g, a) = grad_inputs("2x0e+1x0e+1x1o", "2x0e+2x1o+1x0o", "mul_ir", shared, n=3)
    g_pre = torch.rand(*((spec.in_layout.num_gates,) if shared else (3, spec.in_layout.num_gates)),
                       dtype=torch.float64, requires_grad=True)
    key = spec.key_text
    torch.library.opcheck(torch.ops.mmea_kernels.gated_linear, (x, w, b, g_pre, g, a, key, "cpp"))
    torch.library.opcheck(torch.ops.mmea_kernels.gated_linear_u, (x, w, b, g, a, key, "cpp"))
    dy = torch.randn(3, spec.dim_out, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mmea_kernels.gated_linear_wgrad, (x, dy, g_pre, g, key, "cpp"))


@pytest.mark.parametrize("backend,compiler", [("cpp", "aot_eager"), ("triton", "aot_eager"), ("cpp", "inductor")])
def test_compiled_adapted_linear_runs_the_fused_op(backend, compiler):
    """Under torch.compile an MMEALinear on the fused path is one custom op (mmea_kernels::gated_linear,
    the gate net as torch ops): no graph break, and with forces-style create_graph inside the
    compiled function, values, input gradient and the outer gradients to the input and the adapter
    weights equal the unfused torch path's (float64). The public gated_linear compiles to the op
    too, with its weight gradient (mmea_kernels::gated_linear_wgrad). Inductor (torch.compile's
    default, which generates and compiles C++ around the custom ops) is run here, on one layer: the
    whole-MACE test below uses aot_eager (inductor took 87-118 s there on the 2-core machine)."""
    from e3nn import o3

    from helpers import grad_inputs, make_linear, randomise
    from mmea_kernels.ops.gated_linear import gated_linear
    _need_kernels(backend)
    plain = MMEALinear(make_linear(), rank=3, backend="torch")
    randomise(plain)
    fused = MMEALinear(make_linear(), rank=3, backend=backend)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(6, o3.Irreps(fused.in_layout.irreps_str).dim, dtype=torch.float64, requires_grad=True)

    def forces_like(ad):
        def f(x):
            y = ad(x)
            (gx,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
            return y, gx
        return f

    def outer(ad, f):
        y, gx = f(x)
        params = [p for n, p in ad.named_parameters() if not n.startswith("base.")]
        return [y, gx, *torch.autograd.grad((gx * gx).sum() + y.sum(), [x] + params)]

    torch._dynamo.reset()
    prev = torch._dynamo.config.trace_autograd_ops
    torch._dynamo.allow_in_graph(torch.autograd.grad)  # mace-torch's compile path does the same
    torch._dynamo.config.trace_autograd_ops = True
    try:
        compiled = torch.compile(forces_like(fused), backend=compiler, fullgraph=True)
        with torch.profiler.profile() as prof:
            got = outer(fused, compiled)
        want = outer(plain, forces_like(plain))
        spec, (xs, w, b, g, a) = grad_inputs("2x0e+1x0e+1x1o", "2x0e+2x1o+1x0o", "mul_ir", False, n=3)
        lin = torch.compile(lambda *t: gated_linear(*t, spec, backend=backend), backend=compiler, fullgraph=True)
        with torch.profiler.profile() as prof_lin:
            y = lin(xs, w, b, g, a)
            got_lin = [y, *torch.autograd.grad((y * y).sum(), (xs, w, b, g, a))]
        y = gated_linear(xs, w, b, g, a, spec, backend="torch")
        want_lin = [y, *torch.autograd.grad((y * y).sum(), (xs, w, b, g, a))]
    finally:
        torch._dynamo.disallow_in_graph(torch.autograd.grad)
        torch._dynamo.config.trace_autograd_ops = prev
        torch._dynamo.reset()
    # the gates depend on x, so the forward saves the pre-gate output u (as eager); backward: the op
    assert {"mmea_kernels::gated_linear_u", "mmea_kernels::gated_linear"} <= {e.name for e in prof.events()}
    assert {"mmea_kernels::gated_linear_u", "mmea_kernels::gated_linear_wgrad"} <= {e.name for e in prof_lin.events()}
    for a_, w_ in zip(got + got_lin, want + want_lin):
        torch.testing.assert_close(a_, w_, rtol=1e-10, atol=1e-10)


def test_layers_compiled_one_by_one_share_compiled_code():
    """Regional compilation (each layer compiled on its own): which fused kernels run is decided from
    constants (backend, device type, dtype, the spec's key), not from the layer object, so four
    layers of one shape reuse one compiled code (a recompile per layer would reach dynamo's limit and
    fall back to eager); each runs the fused op and equals its eager output."""
    from helpers import make_linear, randomise
    _need_kernels("cpp")
    layers = [MMEALinear(make_linear(seed=s), rank=3, backend="cpp") for s in range(4)]
    x = torch.randn(5, layers[0].in_layout.dim, dtype=torch.float64)
    torch._dynamo.reset()
    # config.patch, not monkeypatch: with torch 2.11 (the device machine's), monkeypatch's undo
    # leaves the config module without the attribute, and every later compile fails on it
    try:
        with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
            for layer in layers:
                randomise(layer)
                with torch.profiler.profile() as prof:
                    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
                # trainable gates: the saved-output form of the op
                assert "mmea_kernels::gated_linear_u" in {e.name for e in prof.events()}
                torch.testing.assert_close(y, layer(x), rtol=1e-12, atol=1e-12)
    finally:
        torch._dynamo.reset()


def test_adapted_linear_has_no_graph_break():
    from e3nn import o3
    torch.manual_seed(0)
    ad = MMEALinear(o3.Linear("8x0e+8x1o+4x2e", "8x0e+8x1o+4x2e"))
    x = torch.randn(10, ad.in_layout.dim)
    explanation = torch._dynamo.explain(ad)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_adapted_mace_compiles_without_graph_breaks():
    """Run in a fresh interpreter: tracing e3nn with dynamo changes global e3nn state (later
    SphericalHarmonics hold ScriptFunctions, which breaks deepcopy of models in other tests)."""
    pytest.importorskip("mace.tools.compile")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))
    path = [str(HERE), str(REPO / "tests")]  # this file and helpers.py
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {path!r}; "
                           "import test_compile as t; t.check_compiled_mace()"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "COMPILED-MACE-OK" in proc.stdout


def check_compiled_mace():
    import mace.tools.compile as mace_compile

    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch, build_mace

    torch.manual_seed(0)
    with mace_compile.disable_e3nn_codegen():
        model = build_mace("tiny").double()
    mk.inject_adapters(model)
    with torch.no_grad():  # gates far from 1 so the adapters matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    mace_compile.configure_autograd_for_compile()

    def batch():
        b = atoms_to_batch(toy_molecules("ethanol", 2, seed=5), [1, 6, 8], 5.0, dtype=torch.float64)
        b["positions"].requires_grad_(True)
        b["node_attrs"].requires_grad_(True)
        return b

    # training=True (forces with create_graph) is mace-torch's own compile path; fullgraph=True
    # makes any graph break an error (one trace, not a dynamo.explain pass and then another).
    # aot_eager: dynamo and AOTAutograd trace the whole model through the ops' fake implementations
    # and registered autograd as inductor would; inductor's own code generation around the custom
    # ops is tested on one layer (test_compiled_adapted_linear_runs_the_fused_op), for a fraction of
    # the 87-118 s it takes on this model on the 2-core machine
    eager = model(batch(), training=True, compute_force=True)
    with torch.profiler.profile() as prof:
        compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)(
            batch(), training=True, compute_force=True)
    # on CPU with the extension built, the adapted linears run the fused linear's custom op
    from mmea_kernels.ops.gated_linear import cpp_status
    assert ("mmea_kernels::gated_linear" in {e.name for e in prof.events()}) == cpp_status("cpu")[0]
    with mk.disable_adapters(model):
        base = model(batch(), training=True, compute_force=True)
    assert (eager["energy"] - base["energy"]).abs().max() > 1e-3  # the adapters are in the compiled graph
    torch.testing.assert_close(compiled["energy"], eager["energy"], rtol=MODEL_RTOL, atol=MODEL_RTOL)
    torch.testing.assert_close(compiled["forces"], eager["forces"], rtol=MODEL_RTOL, atol=MODEL_RTOL)
    print("COMPILED-MACE-OK")


def test_a_spec_first_read_inside_torch_compile_compiles_fullgraph():
    """A layout and spec never used before, first read inside ``torch.compile(..., fullgraph=True)``:
    Python 3.11's ``functools.cached_property`` took an RLock (dynamo cannot trace it), and a
    lock-free lazy property failed dynamo's own guard; the cached values are now computed when the
    spec is built (found when one test of this file ran alone)."""
    from mmea_kernels.linear_spec import LinearSpec
    from mmea_kernels.ops.gated_linear import gated_linear

    spec = LinearSpec.of("3x0e+1x2o+2x1e", "1x0e+3x2o+1x1e", [(0, 0, 3, 1, 1.0), (1, 1, 1, 3, 1.0), (2, 2, 2, 1, 1.0)])
    x = torch.randn(4, spec.dim_in, dtype=torch.float64)
    w = torch.randn(spec.weight_numel, dtype=torch.float64)
    g = torch.rand(4, 4, dtype=torch.float64) + 0.5  # 3x2o + 1x1e: 4 gates (no property read out here)
    a = torch.randn(4, 1, dtype=torch.float64)
    _need_kernels("cpp")
    torch._dynamo.reset()
    try:
        f = torch.compile(lambda *t: gated_linear(*t, spec, backend="cpp"), backend="aot_eager", fullgraph=True)
        y = f(x, w, None, g, a)
    finally:
        torch._dynamo.reset()
    # the compiled op is the eager cpp op bit for bit; the torch backend sums in another order (BLAS)
    torch.testing.assert_close(y, gated_linear(x, w, None, g, a, spec, backend="cpp"), rtol=0, atol=0)
    torch.testing.assert_close(y, gated_linear(x, w, None, g, a, spec, backend="torch"), rtol=1e-13, atol=1e-13)
