"""FusedGate: parity with e3nn's Gate and mace-torch's GatedEquivariantBlock (float64, 1e-12),
every fused activation, both layouts against a per-column reference, every backend (torch, cpp,
triton; the interpreter on CPU), gradcheck / gradgradcheck, bad input, replace_gates /
restore_gates (small e3nn model, SevenNet-0), torch.compile and TorchScript."""
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F

e3nn = pytest.importorskip("e3nn")
from e3nn import o3  # noqa: E402
from e3nn.nn import Gate  # noqa: E402

import mmea_kernels as mk  # noqa: E402
from mmea_kernels.nn.fused_gate import FusedGate, ScriptableFusedGate  # noqa: E402
from mmea_kernels.ops.fused_gate import fused_gate_backend_status, ssp  # noqa: E402

from helpers import REPO, TOL, assert_rel  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["torch", "cpp", "triton"]
F64 = TOL[torch.float64]  # every comparison here is float64


def _need(backend, device):
    ok, why = fused_gate_backend_status(backend, device)
    if not ok:
        pytest.skip(f"{backend} on {device}: {why}")


def _x(gate, n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, gate.irreps_in.dim, generator=gen, dtype=torch.float64)).to(device)


CASES = {
    "sevennet": ("128x0e", [F.silu], "64x0e+32x0e", [F.silu, F.silu], "64x1e+32x2e"),
    "odd": ("4x0o+3x0e", [torch.tanh, torch.sigmoid], "2x0o+3x0e", [torch.tanh, torch.abs], "2x1e+1x1o+2x2o"),
    "unsorted": ("2x0e+2x0o+1x0e", [F.silu, torch.abs, None], "3x0e", [torch.sigmoid], "1x2e+2x1o"),
    "scalars_only": ("6x0e", [F.softplus], "", [], ""),
    "no_scalars": ("", [], "2x0e", [ssp], "1x1e+1x3o"),
}


def _small(case):
    s, a_s, g, a_g, d = CASES[case]
    if case == "sevennet":
        return ("8x0e", a_s, "3x0e+2x0e", a_g, "3x1e+2x2e")
    return s, a_s, g, a_g, d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_e3nn_gate(case, backend, device):
    _need(backend, device)
    args = CASES[case] if backend != "triton" or device == "cuda" else _small(case)
    ref = Gate(*args).double().to(device)
    for fg in (FusedGate(*args, backend=backend), FusedGate.from_module(ref, backend=backend)):
        fg = fg.to(device)
        assert fg.fused
        for attr in ("irreps_in", "irreps_out", "irreps_scalars", "irreps_gates", "irreps_gated"):
            assert getattr(fg, attr) == getattr(ref, attr), attr
        assert fg.state_dict().keys() == ref.state_dict().keys()
        x = _x(ref, 37, device).requires_grad_(True)
        y0 = ref(x)
        y = fg(x)
        torch.testing.assert_close(y, y0, **F64)
        dy = torch.randn_like(y0)
        (g0,) = torch.autograd.grad(y0, x, dy)
        (g1,) = torch.autograd.grad(y, x, dy)
        torch.testing.assert_close(g1, g0, **F64)
        # leading dims are kept
        torch.testing.assert_close(fg(x.detach().reshape(37, 1, -1)), y0.detach().reshape(37, 1, -1), **F64)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_empty_irreps_give_what_e3nn_gives(backend):
    """A gate with no irreps at all (e3nn's Gate returns [..., 0]) used to fail on reshape(-1, 0)."""
    _need(backend, "cpu")
    ref = Gate("", [], "", [], "")
    fg = FusedGate.from_module(ref, backend=backend)
    for shape in [(3, 0), (0, 0), (2, 5, 0)]:
        x = torch.zeros(shape, dtype=torch.float64)
        assert fg(x).shape == ref(x).shape == shape


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_entries_of_multiplicity_zero_are_empty_blocks(backend):
    """Irreps.lmax fails on "0x0e" (e3nn's Gate: "max() arg is an empty sequence"): the checks read
    the entries instead, and the result is e3nn's Gate on the same irreps without those entries."""
    _need(backend, "cpu")
    args = ("0x0e+2x0o", [F.silu, torch.tanh], "2x0e+0x0o", [torch.sigmoid, torch.tanh], "1x1o+0x2e+1x2e")
    ref = Gate("2x0o", [torch.tanh], "2x0e", [torch.sigmoid], "1x1o+1x2e")
    x = _x(ref, 9, "cpu").requires_grad_(True)
    fg = FusedGate(*args, backend=backend)
    y, y0 = fg(x), ref(x)
    torch.testing.assert_close(y, y0, **F64)
    dy = torch.randn_like(y0)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y0, x, dy)[0], **F64)
    assert FusedGate("", [], "0x0e", [torch.sigmoid], "0x1o", backend=backend)(torch.zeros(3, 0)).shape == (3, 0)
    with pytest.raises(ValueError, match="Gate scalars must be scalars"):
        FusedGate("", [], "0x0e+1x1o", [torch.sigmoid, None], "1x1o", backend=backend)


ACTS = {"silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "abs": torch.abs, "identity": None,
        "softplus": F.softplus, "ssp": ssp, "SiLU()": torch.nn.SiLU()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
def test_every_fused_activation(act, backend, device):
    _need(backend, device)
    f = ACTS[act]
    args = ("3x0e", [f], "2x0e+1x0e", [f, f], "2x1o+1x2e")
    ref = Gate(*args).double().to(device)
    fg = FusedGate(*args, backend=backend).to(device)
    assert fg.fused
    x = _x(ref, 5, device, seed=1)
    x[0, :3] = torch.tensor([25.0, -30.0, 0.0])  # softplus threshold, large negative, abs at 0
    x.requires_grad_(True)
    torch.testing.assert_close(fg(x), ref(x), **F64)
    # first and second derivatives (with respect to x and to the incoming gradient) against e3nn
    dy = torch.randn(5, ref.irreps_out.dim, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn_like(x)
    derivs = []
    for m in (fg, ref):
        (g,) = torch.autograd.grad(m(x), x, dy, create_graph=True)
        derivs.append((g,) + torch.autograd.grad((g * w).sum(), (x, dy)))
    for a, b in zip(*derivs):
        torch.testing.assert_close(a, b, **F64)
    if backend == "triton" and device == "cpu":
        return  # numerical gradchecks under the interpreter cost ~10 s each; the comparison above covers it
    xs = _x(ref, 3, device, seed=2)
    if act == "abs":  # away from the kink at 0
        xs = xs + 0.3 * xs.sign()
    xs.requires_grad_(True)
    assert torch.autograd.gradcheck(fg, (xs,))
    assert torch.autograd.gradgradcheck(fg, (xs,))


def _naive_ir_mul(x, gate_args, layout):
    """y column by column from the definition (scalars and gates at the sorted input offsets)."""
    s, a_s, g, a_g, d = (o3.Irreps(v) if isinstance(v, str) else v for v in gate_args)
    cat = s + g + d
    srt, perm, _ = cat.sort()
    off = [sum(mi.dim for mi in srt[:j]) for j in range(len(srt))]
    start = [off[perm[i]] for i in range(len(cat))]
    out, gates = [], []
    for i, ((mul, _), f) in enumerate(zip(s, a_s)):
        c = e3nn.math.normalize2mom(f)
        for u in range(mul):
            out.append(c(x[:, start[i] + u]))
    for i, ((mul, _), f) in enumerate(zip(g, a_g)):
        c = e3nn.math.normalize2mom(f)
        for u in range(mul):
            gates.append(c(x[:, start[len(s) + i] + u]))
    k = 0
    for i, (mul, ir) in enumerate(d):
        base = start[len(s) + len(g) + i]
        block = [None] * (mul * ir.dim)
        for u in range(mul):
            for m in range(ir.dim):
                col = m * mul + u if layout == "ir_mul" else u * ir.dim + m
                block[col] = x[:, base + col] * gates[k + u]
        out += block
        k += mul
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_layouts_against_naive_reference(layout, backend, device):
    _need(backend, device)
    args = ("3x0e+1x0o", [F.silu, torch.tanh], "2x0e+3x0e", [torch.sigmoid, F.silu], "2x1o+3x2e")
    fg = FusedGate(*args, layout=layout, backend=backend).to(device)
    x = _x(fg, 6, device, seed=3).requires_grad_(True)
    y = fg(x)
    torch.testing.assert_close(y, _naive_ir_mul(x, args, layout), **F64)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0],
                               torch.autograd.grad(_naive_ir_mul(x, args, layout), x, dy)[0], **F64)
    if backend != "triton" or device == "cuda":
        assert torch.autograd.gradgradcheck(fg, (x[:2].detach().requires_grad_(True),))


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_mace_gated_equivariant_block(layout):
    """mace-torch 0.3.16 has mace.modules.gate.GatedEquivariantBlock (both layouts)."""
    gate_mod = pytest.importorskip("mace.modules.gate")
    args = ("4x0e", [F.silu], "3x0e+2x0e", [F.silu, F.silu], "3x1o+2x2e")
    ref = gate_mod.GatedEquivariantBlock(*args, layout=layout).double()
    fm = FusedGate.from_module(ref)
    fc = FusedGate(*args, layout=layout, compat="mace")
    assert fm.layout == fc.layout == layout and fm.fused
    assert fm.irreps_in == ref.irreps_in and fm.irreps_out == ref.irreps_out and not fm.state_dict()
    x = _x(ref, 9, "cpu").requires_grad_(True)
    for fg in (fm, fc):
        torch.testing.assert_close(fg(x), ref(x), **F64)
        dy = torch.randn(9, ref.irreps_out.dim, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(fg(x), x, dy)[0], torch.autograd.grad(ref(x), x, dy)[0], **F64)
    model = torch.nn.Sequential(torch.nn.Identity(), gate_mod.GatedEquivariantBlock(*args, layout=layout).double())
    rep = mk.replace_gates(model)
    assert len(rep) == 1 and isinstance(model[1], FusedGate)
    torch.testing.assert_close(model(x), ref(x), **F64)


def test_unknown_activation_runs_the_torch_path():
    args = ("3x0e", [F.gelu], "2x0e", [torch.sigmoid], "2x1e")
    ref = Gate(*args).double()
    fg = FusedGate(*args)
    assert not fg.fused and "not fused" in repr(fg)
    x = _x(ref, 4, "cpu").requires_grad_(True)
    torch.testing.assert_close(fg(x), ref(x), **F64)
    assert torch.autograd.gradgradcheck(fg, (x,))
    with pytest.raises(NotImplementedError, match="restore_gates"):
        torch.jit.script(torch.nn.Sequential(fg))


def test_bad_input():
    with pytest.raises(ValueError, match="Gate scalars must be scalars"):
        FusedGate("2x0e", [F.silu], "1x1o", [None], "1x1e")
    with pytest.raises(ValueError, match="Scalars must be scalars"):
        FusedGate("2x1e", [None], "1x0e", [F.silu], "1x1e")
    with pytest.raises(ValueError, match=r"2 irreps in irreps_gated, but a different number \(3\)"):
        FusedGate("2x0e", [F.silu], "3x0e", [F.silu], "2x1e")
    with pytest.raises(ValueError, match="act_gates has 1 activation"):
        FusedGate("2x0e", [F.silu], "1x0e+1x0o", [F.silu], "2x1e")
    with pytest.raises(ValueError, match="parity is violated"):
        FusedGate("2x0o", [F.silu], "1x0e", [F.silu], "1x1e")
    with pytest.raises(ValueError, match="layout"):
        FusedGate("2x0e", [F.silu], "1x0e", [F.silu], "1x1e", layout="xyz")
    for args in (("2x0e", [F.silu], "1x0e", [F.silu], "1x1e"), ("2x0o", [F.silu], "", [], "")):
        try:
            Gate(*args)
        except ValueError:
            with pytest.raises(ValueError):
                FusedGate(*args)
    fg = FusedGate("2x0e", [F.silu], "1x0e", [F.silu], "1x1e")
    with pytest.raises(ValueError, match="last dimension must be 6"):
        fg(torch.randn(3, 7))
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):  # at construction, not the first call
        FusedGate("2x0e", [F.silu], "1x0e", [F.silu], "1x1e", backend="cuda-magic")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mk.replace_gates("not a model")
    with pytest.raises(ValueError, match="FusedGate.from_module"):
        mk.replace_gates(Gate("2x0e", [F.silu], "1x0e", [F.silu], "1x1e"))


def test_model_without_gates_is_unchanged():
    model = torch.nn.Sequential(o3.Linear("2x0e", "2x0e"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = mk.replace_gates(model)
    assert len(rep) == 0 and "no e3nn Gate" in str(rep) and "unchanged" in str(rep)
    assert isinstance(model[0], o3.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "unchanged" in str(mk.restore_gates(model))


def _small_model():
    torch.manual_seed(0)
    g = Gate("8x0e", [F.silu], "4x0e", [torch.sigmoid], "4x1o")
    return torch.nn.Sequential(o3.Linear("6x0e+2x1o", g.irreps_in), g, o3.Linear(g.irreps_out, "2x0e+1x1o")).double()


def test_replace_and_restore_small_model():
    model = _small_model()
    orig = model[1]
    x = torch.randn(10, 12, dtype=torch.float64)
    y0 = model(x)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    rep = mk.replace_gates(model)
    assert len(rep) == 1 and "1" in str(rep) and isinstance(model[1], FusedGate)
    sd1 = model.state_dict()
    assert list(sd1) == list(sd0) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    torch.testing.assert_close(model(x), y0, **F64)
    model.load_state_dict(sd0)  # strict: same keys
    rep = mk.restore_gates(model)
    assert len(rep) == 1 and model[1] is orig
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_torch_compile_no_graph_break():
    model = _small_model()
    mk.replace_gates(model)
    x = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    expl = torch._dynamo.explain(model)(x)
    assert expl.graph_break_count == 0 and expl.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y0 = model(x)
    torch.testing.assert_close(y, y0, **F64)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x)
    (g0,) = torch.autograd.grad(y0.pow(2).sum(), x)
    torch.testing.assert_close(g, g0, **F64)


def test_custom_ops_opcheck():
    fg = FusedGate("3x0e", [F.silu], "2x0e", [torch.tanh], "1x1o+1x2e")
    x = torch.randn(4, fg.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    key = fg._spec.key()
    torch.library.opcheck(torch.ops.mmea_kernels.fused_gate.default, (x, key, ""))
    dy = torch.randn(4, fg.irreps_out.dim, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mmea_kernels.fused_gate_backward.default, (x, dy, key, ""))


def test_torchscript():
    torch.manual_seed(0)
    g = Gate("8x0e", [F.silu], "3x0e", [torch.sigmoid], "2x1o+1x2e")
    model = torch.nn.Sequential(torch.nn.Linear(12, g.irreps_in.dim), g, torch.nn.Linear(g.irreps_out.dim, 3)).double()
    x = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
    y0 = model(x)
    mk.replace_gates(model)
    # like mmea_kernels.integrations.export: script a copy (__prepare_scriptable__ edits the scripted tree in place)
    scripted = torch.jit.script(copy.deepcopy(model))
    assert isinstance(model[1], FusedGate)
    assert "mmea_kernels::" not in str(scripted.inlined_graph)  # aten ops only: no custom op in the file
    assert set(scripted.state_dict()) == set(model.state_dict())
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    scripted = torch.jit.load(buf)
    y = scripted(x)
    torch.testing.assert_close(y, y0, **F64)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g0,) = torch.autograd.grad(y0.sum(), x)
    torch.testing.assert_close(g, g0, **F64)
    assert isinstance(FusedGate("2x0e", [F.silu], "1x0e", [F.silu], "1x1e").__prepare_scriptable__(),
                      ScriptableFusedGate)


# ----------------------------------------------------------------------------------- SevenNet-0
@pytest.fixture(scope="module")
def sevennet_pair():
    pytest.importorskip("sevenn")
    pytest.importorskip("mace")
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.integrations.sevenn import load_sevennet

    plain = load_sevennet("7net-0", dtype=torch.float64, fused_gate=False)
    frames = toy_molecules("ethanol", 2)
    batch = atoms_to_batch(frames, plain.atomic_numbers.tolist(), float(plain.r_max), dtype=torch.float64)
    return plain, batch


def _ef(model, batch):
    out = model(dict(batch), training=False, compute_force=True)
    return out["energy"], out["forces"]


def test_sevennet_replace_gates(sevennet_pair):
    from mmea_kernels.integrations.sevenn import load_sevennet

    plain, batch = sevennet_pair
    e0, f0 = _ef(plain, batch)
    sd0 = {k: v.clone() for k, v in plain.state_dict().items()}
    gates = [n for n, m in plain.named_modules() if isinstance(m, Gate)]
    rep = mk.replace_gates(plain)
    try:
        assert [n for n, _ in rep.swapped] == gates and len(gates) == 5 and not rep.not_fused
        sd1 = plain.state_dict()
        assert list(sd1) == list(sd0) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
        e1, f1 = _ef(plain, batch)
        assert ((e1 - e0).abs() / e0.abs()).max() <= 1e-10
        assert_rel(f1, f0, "forces")
        # the loader's default is the fused gate
        fused = load_sevennet("7net-0", dtype=torch.float64)
        assert sum(isinstance(m, FusedGate) for m in fused.modules()) == 5
        e2, f2 = _ef(fused, batch)
        torch.testing.assert_close(e2, e1, rtol=1e-12, atol=0)
        torch.testing.assert_close(f2, f1, **F64)
        # SevenNet-0's swapped gates under TorchScript and torch.compile
        for name, gate in [(n, m) for n, m in plain.named_modules() if isinstance(m, FusedGate)][::4]:
            x = torch.randn(7, gate.irreps_in.dim, dtype=torch.float64)
            scripted = torch.jit.script(copy.deepcopy(gate))
            torch.testing.assert_close(scripted(x), gate(x), **F64)
            torch._dynamo.reset()
            assert torch._dynamo.explain(gate)(x).graph_break_count == 0, name
    finally:
        rep = mk.restore_gates(plain)
    assert len(rep) == 5 and sum(isinstance(m, Gate) for m in plain.modules()) == 5
    e3, f3 = _ef(plain, batch)
    assert torch.equal(e3, e0) and torch.equal(f3, f0)


def test_gate_speed_script_runs_small():
    """bench/gate_speed.py at a tiny size (the measured numbers come from its full run)."""
    import importlib.util

    path = REPO / "bench" / "gate_speed.py"
    spec = importlib.util.spec_from_file_location("gate_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.main(["--rounds", "2", "--n", "32", "--no-model", "--dtype", "float64", "--out", "-"])
    assert "| gate fwd+bwd float64 |" in text and "threads 1" in text


_PTX_CHECK = """
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from mmea_kernels.ops.fused_gate import triton as fgt
for dt, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
    common = {"cols_ptr": "*i64", "cst_ptr": "*fp64", "N": "i64", "DIN": "i64", "DOUT": "i64", "USED": "constexpr",
              "ACC": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    fwd = dict({"x_ptr": "*" + dt, "y_ptr": "*" + dt}, **common)
    bwd = dict({"x_ptr": "*" + dt, "dy_ptr": "*" + dt, "dx_ptr": "*" + dt, "mem_ptr": "*i64", "W": "constexpr"}, **common)
    dbwd = {"x_ptr": "*" + dt, "dy_ptr": "*" + dt, "v_ptr": "*" + dt, "gx_ptr": "*" + dt, "gdy_ptr": "*" + dt,
            "fcols_ptr": "*i64", "fcst_ptr": "*fp64", "bcols_ptr": "*i64", "bcst_ptr": "*fp64", "mem_ptr": "*i64",
            "N": "i64", "DIN": "i64", "DOUT": "i64", "USED": "constexpr", "ACC": "constexpr", "W": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    for fn, sig, cx in ((fgt._fwd_kernel, fwd, {"BLOCK_N": 32, "BLOCK_D": 128}),
                        (fgt._bwd_kernel, bwd, {"W": 8, "BLOCK_N": 4, "BLOCK_D": 64}),
                        (fgt._dbwd_kernel, dbwd, {"W": 8, "BLOCK_N": 4, "BLOCK_D": 64})):
        sig = {k: sig[k] for k in fn.arg_names}
        cx.update(USED=0b1111111, ACC=acc)
        k = triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        assert "cubin" in k.asm and len(k.asm["ptx"]) > 1000
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    """Without a GPU: the Triton kernels (forward, backward, double backward; every activation, fp32
    and fp64) compile to PTX and a cubin for sm_90 (H100/H200), as they would on the device; run in a
    process without TRITON_INTERPRET."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("triton's NVIDIA backend (ptxas) is not available here")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


def test_cpp_parallel_rows_match():
    """The C++ kernels' OpenMP path (inputs above its serial threshold) gives the serial numbers."""
    _need("cpp", "cpu")
    ref = Gate(*CASES["sevennet"]).double()
    fg = FusedGate.from_module(ref, backend="cpp")
    x = _x(ref, 300, "cpu", seed=5).requires_grad_(True)
    dy = torch.randn(300, ref.irreps_out.dim, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = fg(x)
        (g,) = torch.autograd.grad(y, x, dy)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, ref(x), **F64)
    torch.testing.assert_close(g, torch.autograd.grad(ref(x), x, dy)[0], **F64)
