"""Independent references for the tests (naive per-column loops in float64), the devices the
kernel tests run on, the tolerance per dtype (TOL), the builders and random inputs several test
files share, and the repository root (REPO) for the tests that run its scripts."""
import contextlib
import os
import pathlib

import pytest
import torch

from mmea_kernels.layout import IrrepsLayout, parse_irreps

REPO = pathlib.Path(__file__).resolve().parents[1]  # tests/helpers.py -> the repository


def naive_gate_of_column(irreps: str, layout: str):
    """Column -> gate, written from the definition (not from IrrepsLayout)."""
    out = []
    gate = 0
    for mul, l, p in parse_irreps(irreps):
        d = 2 * l + 1
        block = [None] * (mul * d)
        for k in range(mul):
            for m in range(d):
                col = k * d + m if layout == "mul_ir" else m * mul + k
                block[col] = -1 if (l == 0 and p == 1) else gate + k
        out += block
        if not (l == 0 and p == 1):
            gate += mul
    return out, gate


def naive_gate_mul(x, gates, irreps, layout, keep_ungated=True):
    owner, G = naive_gate_of_column(irreps, layout)
    y = torch.empty_like(x, dtype=torch.float64)
    for c, g in enumerate(owner):
        if g < 0:
            y[..., c] = x[..., c].double() if keep_ungated else 0.0
        else:
            gg = gates[g] if gates.dim() == 1 else gates[..., g]
            y[..., c] = x[..., c].double() * gg.double()
    return y


def naive_seg_dot(a, b, irreps, layout, shared=False):
    owner, G = naive_gate_of_column(irreps, layout)
    out = torch.zeros(a.shape[:-1] + (G,), dtype=torch.float64)
    for c, g in enumerate(owner):
        if g >= 0:
            out[..., g] += a[..., c].double() * b[..., c].double()
    return out.reshape(-1, G).sum(0) if shared else out


def random_orthogonal(seed: int, reflect: bool, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = -q
    return q


def naive_mmea(ad, y, x, irreps_in: str, irreps_out: str, layout_in: str = "mul_ir", layout_out: str = "mul_ir",
               phi: str = "exp"):
    """y' from the method's equations, column by column: z = SiLU(W_down x0 + b_down),
    γ = W_up z + b_up; 0e output columns get + γ_add, the others × φ(γ_gate)."""
    in_owner, _ = naive_gate_of_column(irreps_in, layout_in)
    out_owner, _ = naive_gate_of_column(irreps_out, layout_out)
    x0 = x[:, [c for c, g in enumerate(in_owner) if g < 0]]
    z = torch.nn.functional.silu(x0 @ ad.mmea_down.weight.T + ad.mmea_down.bias)
    gamma = z @ ad.mmea_up.weight.T + ad.mmea_up.bias
    n_add = sum(1 for g in out_owner if g < 0)
    cols, j = [], 0
    for c, g in enumerate(out_owner):
        if g < 0:
            cols.append(y[:, c] + gamma[:, j])
            j += 1
        else:
            lg = gamma[:, n_add + g]
            cols.append(y[:, c] * (torch.exp(lg) if phi == "exp" else 1 + lg))
    return torch.stack(cols, dim=1)


# ---------------------------------------------------------------------------- devices
# The kernel tests run once per device: "cpu" runs the Triton kernels through the interpreter
# (TRITON_INTERPRET=1, set by conftest unless MMEA_TEST_CUDA=1), "cuda" on a GPU where one exists.
CUDA_AVAILABLE = torch.cuda.is_available()
_NO_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device on this machine")
TRITON_DEVICES = [
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="triton kernels on CPU tensors need TRITON_INTERPRET=1 (unset for the CUDA run)")),
    pytest.param("cuda", id="cuda", marks=_NO_CUDA),
]
CPP_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_NO_CUDA)]


def assert_gradchecks(fn, inputs, device, interpreted_triton: bool = True):
    """gradcheck and gradgradcheck of ``fn`` at ``inputs``. Where triton kernels run through the
    interpreter (CPU tensors), both run in fast mode: each compares a random projection ``vᵀ J u`` of
    the analytical Jacobian with the numerical one instead of every column, about a twentieth of the
    kernel launches (the interpreter takes ms per launch), and a wrong derivative still fails; full
    checks on CUDA and for the cpp and torch kernels (``interpreted_triton=False``)."""
    fast = interpreted_triton and torch.device(device).type == "cpu"
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


# ---------------------------------------------------------------------------- tolerances
# A result against an independent reference (naive loops, the unfused path, the other backend),
# computed in ``dtype``: float64 agrees to round-off; float32 to ~1e-5; bf16/fp16 accumulate in
# fp32 and round the result once. A test with a tighter or looser bound says why where it uses it.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-3),
}
# Energies and forces of a whole model (float64) computed two ways (converted, exported, merged,
# compiled): many layers of round-off, relative to the largest value.
MODEL_RTOL = 1e-10


def max_rel(a, b):
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_rel(a, b, what="", rtol=MODEL_RTOL):
    rel = max_rel(a.detach(), b.detach())
    assert rel <= rtol, f"{what}: relative difference {rel:.2e} > {rtol:g}"


# ---------------------------------------------------------------------------- shared builders
IN = "3x0e+2x0e+2x1o+1x2e+1x0o"  # the bare-layer tests: two 0e blocks feed the gate net, 0o, l = 2
OUT = "4x0e+3x1o+2x2e+2x0o+1x1e"


def make_linear(irreps_in=IN, irreps_out=OUT, seed=0, **kw):
    """A float64 e3nn ``o3.Linear`` with its weights drawn from ``seed``."""
    from e3nn import o3

    torch.manual_seed(seed)
    return o3.Linear(o3.Irreps(irreps_in), o3.Irreps(irreps_out), **kw).double()


def randomise(module, std=0.5, seed=1):
    """Every parameter of an adapter except its base layer's: N(0, std²) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if not n.startswith("base."):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def adapted_copy(base, method, seed=0, std=0.02):
    """A copy of ``base`` with ``method``'s adapters injected and every trainable parameter moved by
    N(0, std²) from ``seed`` (so the adapters change the model)."""
    import copy

    import mmea_kernels as mk

    m = copy.deepcopy(base)
    mk.inject_adapters(m, method=method)
    return perturb_trainable(m, seed, std)


@torch.no_grad()
def perturb_trainable(model, seed=0, std=0.02):
    """``model`` with every trainable parameter moved by N(0, std²) from ``seed`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@torch.no_grad()
def randomise_adapters(model, std, seed):
    """Every adapter parameter of an adapted model, module by module: N(0, std²) from ``seed``
    (drawn in float64), so that the adapters change the model."""
    from mmea_kernels import adapted_modules

    gen = torch.Generator().manual_seed(seed)
    for m in adapted_modules(model).values():
        for p in m.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
    return model


@contextlib.contextmanager
def default_dtype(dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_mace64(seed=0, **overrides):
    """A tiny mace-torch MACE built with float64 as default dtype (so its constants, e.g. the
    symmetric-contraction U matrices, are exact in float64) and cast to float64."""
    from mmea_kernels.integrations.mace import build_mace

    with default_dtype(torch.float64):
        torch.manual_seed(seed)
        return build_mace("tiny", **overrides).double()


# ---------------------------------------------------------------------------- random gate inputs
def irreps_string(blocks):
    """[(mul, l, "e"/"o"), ...] -> "2x0e+1x1o"."""
    return "+".join(f"{m}x{l}{p}" for m, l, p in blocks)


def gate_inputs(L, n, shared, seed, dtype=torch.float64):
    """x and b ([n, D]) and the gates ([G] shared, else [n, G]) of layout ``L``: float64 normals
    from ``seed`` in that order, cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L.dim, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(n, L.dim, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(*((L.num_gates,) if shared else (n, L.num_gates)), generator=gen, dtype=torch.float64)
    return x, b, g.to(dtype)


def gate_case_strategies(mul, max_n):
    """The hypothesis strategies of a random gate-op case: irreps blocks (multiplicities from ``mul``,
    l <= 3, both parities), layout, rows 0..max_n, shared gates, float32/float64 and a seed."""
    from hypothesis import strategies as st

    block = st.tuples(mul, st.integers(0, 3), st.sampled_from(["e", "o"]))
    return dict(blocks=st.lists(block, min_size=1, max_size=5), layout=st.sampled_from(["mul_ir", "ir_mul"]),
                n=st.integers(0, max_n), shared=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
                seed=st.integers(0, 2**31 - 1))


def run_rmd17_bench(script: str, mode: str, rmd17, tmp_path, timeout: int = 1200, extra=()):
    """Run ``bench/<script>`` in ``mode`` on the rMD17 splits at ``rmd17``, one thread per process, work
    and results under ``tmp_path``, with ``extra`` arguments; asserts it succeeded and returns the
    results folder."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MMEA_RMD17_DIR=str(rmd17))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--mode", mode, "--work",
                           str(tmp_path / "work"), "--results", str(tmp_path / "res"), *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "res"

def load_bench(name: str):
    """``bench/<name>.py`` as a module (loaded once per name)."""
    import importlib.util
    import sys

    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[key] = mod
    return sys.modules[key]


# ---------------------------------------------------------------------------- fused linear + gate
# Cases and builders of the fused linear + gate tests (tests/ops/test_gated_linear.py: triton;
# tests/ops/test_cpp_gated_linear.py: the C++ kernels).
LAMMPS_SPLIT_IN_TWO = "2 by 1 by 1 MPI processor grid"  # LAMMPS' log line for molecules_in_a_row on 2 processes


def molecules_in_a_row(molecules):
    """The LAMMPS 2-process checks' box: 3 molecules (randomly rotated) 6.5 Å apart in a row, in a
    19.5 × 6.5 × 6.5 Å box, which LAMMPS splits 2 × 1 × 1 on 2 processes (LAMMPS_SPLIT_IN_TWO) at
    x = 9.75 Å, through the middle molecule (asserted): bonded atoms on different processes, each the
    other's ghost. With 2 or 4 molecules each process owns whole molecules, and a file's errors in its
    ghost atoms' numbers showed 1-5 × the bound instead of 200-400 ×."""
    assert len(molecules) == 3 and len({len(m) for m in molecules}) == 1
    box = load_bench("lammps_sevenn").molecular_box(list(molecules), (3, 1, 1), 6.5, seed=7)
    n = len(molecules[0])
    middle = box.positions[n:2 * n, 0]
    assert middle.min() < 9.75 < middle.max()
    return box


GL_FIXED = [
    # unsimplified irreps, several instructions into one output block, biases
    ("2x0e+2x0e+2x1o", "3x0e+2x1o", "mul_ir", "row", "row", True),
    ("2x0e+2x0e+2x1o", "3x0e+2x1o", "ir_mul", "shared", "shared", True),
    # 0o and 1e blocks, odd multiplicities, an output block no instruction feeds (1x2e)
    ("3x0o+1x1e+1x0e+3x1e", "1x0o+3x1e+1x2e+5x0e", "ir_mul", "row", None, False),
    # outputs without a 0e block (additive has 0 channels)
    ("1x0e+3x1o+1x2e", "3x1o+1x2e+1x0o", "mul_ir", "row", "row", False),
    # multiplicities above one tile (> 16 channels), no gate
    ("20x0e+17x1o", "18x0e+19x1o", "ir_mul", None, "row", True),
]

GL_GRAD_CASES = [
    # (irreps_in, irreps_out, layout, shared gates/additive)
    ("2x0e+1x0e+1x1o", "2x0e+2x1o+1x0o", "mul_ir", False),
    ("2x0e+1x0e+1x1o", "2x0e+2x1o+1x0o", "ir_mul", True),
]


def grad_inputs(irr_in, irr_out, layout, shared, n=2, seed=7, device="cpu"):
    """(spec, [x, weight, bias, gates, additive] as float64 leaves that require grad)."""
    from mmea_kernels.linear_spec import LinearSpec

    lin, x, gates, add = make_inputs(irr_in, irr_out, n, torch.float64, "shared" if shared else "row",
                                     "shared" if shared else "row", True, seed, device)
    spec = LinearSpec.from_e3nn(lin, layout)
    leaves = [t.detach().clone().requires_grad_() for t in (x, lin.weight, lin.bias, gates, add)]
    return spec, leaves


def to_ir_mul_index(irreps: str):
    """``idx`` with ``x_ir_mul = x_mul_ir[..., idx]`` (written from the layout definitions)."""
    idx, off = [], 0
    for mul, l, _ in parse_irreps(irreps):
        d = 2 * l + 1
        idx += [off + u * d + m for m in range(d) for u in range(mul)]
        off += mul * d
    return torch.tensor(idx, dtype=torch.long)


def explicit_gate(y, gates, additive, irreps_out):
    """``y`` (mul_ir) with every gated column scaled and the additive put on the 0e columns."""
    owner, G = naive_gate_of_column(irreps_out, "mul_ir")
    out = y.clone()
    s = 0
    for c, g in enumerate(owner):
        if g >= 0:
            if gates is not None:
                out[..., c] = out[..., c] * (gates[g] if gates.dim() == 1 else gates[..., g])
        else:
            if additive is not None:
                out[..., c] = out[..., c] + (additive[s] if additive.dim() == 1 else additive[..., s])
            s += 1
    return out


def counts(irreps: str):
    owner, G = naive_gate_of_column(irreps, "mul_ir")
    return G, sum(1 for g in owner if g < 0)


def make_inputs(irr_in, irr_out, n, dtype, gate_mode, add_mode, bias, seed, device="cpu"):
    """An ``o3.Linear`` (random bias) and x, gates, additive of ``n`` rows ("row", "shared" or None)."""
    from e3nn import o3

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = o3.Linear(irr_in, irr_out, biases=bias).to(dtype)
    if lin.bias.numel() > 0:
        with torch.no_grad():
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen, dtype=dtype))
    G, S = counts(irr_out)
    x = torch.randn(n, o3.Irreps(irr_in).dim, generator=gen, dtype=dtype)
    gates = {None: None, "row": lambda: torch.rand(n, G, generator=gen, dtype=dtype) + 0.5,
             "shared": lambda: torch.rand(G, generator=gen, dtype=dtype) + 0.5}[gate_mode]
    gates = gates() if callable(gates) else gates
    add = {None: None, "row": lambda: torch.randn(n, S, generator=gen, dtype=dtype),
           "shared": lambda: torch.randn(S, generator=gen, dtype=dtype)}[add_mode]
    add = add() if callable(add) else add
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return lin.to(device), to(x), to(gates), to(add)


def check_parity(irr_in, irr_out, layout, n, dtype, gate_mode, add_mode, bias, seed, device="cpu",
                 backends=("triton", "torch")):
    """Every backend against o3.Linear + the explicit gate: max error <= TOL[dtype]'s rtol x max(|ref|, 1)."""
    from mmea_kernels.linear_spec import LinearSpec
    from mmea_kernels.ops.gated_linear import gated_linear

    lin, x, gates, add = make_inputs(irr_in, irr_out, n, dtype, gate_mode, add_mode, bias, seed, device)
    with torch.no_grad():
        ref = explicit_gate(lin(x), gates, add, irr_out)
    spec = LinearSpec.from_e3nn(lin, layout)
    b = lin.bias if lin.bias.numel() > 0 else None
    i_in, i_out = to_ir_mul_index(irr_in).to(device), to_ir_mul_index(irr_out).to(device)
    x_l = x if layout == "mul_ir" else x[:, i_in].contiguous()
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    rtol = TOL[dtype]["rtol"]
    for backend in backends:
        with torch.no_grad():
            y = gated_linear(x_l, lin.weight, b, gates, add, spec, backend=backend)
            y_again = gated_linear(x_l, lin.weight, b, gates, add, spec, backend=backend)
        assert torch.equal(y, y_again)  # every element written (fresh, uninitialised outputs agree)
        for yy in (y,):
            if layout == "ir_mul":
                back = torch.empty_like(yy)
                back[:, i_out] = yy
                yy = back
            assert yy.shape == ref.shape and yy.dtype == dtype
            assert not torch.isnan(yy).any(), f"{backend}: unwritten output elements"
            err = (yy - ref).abs().max().item() if ref.numel() else 0.0
            assert err <= rtol * scale, f"{backend} {layout}: error {err:.3e} (scale {scale:.3e})"


def linked_file(tmp_path, name: str, content: str = "old", mode: int = 0o640):
    """``(real, link)``: ``tmp_path/store/name`` holding ``content`` with ``mode``, and a symlink to it
    at ``tmp_path/name`` (an output kept elsewhere, linked from the job directory)."""
    import os

    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    real, link = store / name, tmp_path / name
    real.write_text(content)
    os.chmod(real, mode)
    link.symlink_to(real)
    return real, link


def interrupted_in_third_traj_frame(monkeypatch, run) -> list:
    """``run()`` with Ctrl-C (a real SIGINT, Python's default handler) sent while ASE writes the third
    frame of a ``.traj`` file, after that frame's first array; asserts that ``run`` ends in
    KeyboardInterrupt. Returns ``[1]`` once the signal was sent."""
    import signal

    import ase.io.ulm as ulm
    from ase.io.trajectory import TrajectoryWriter

    fill, write, frames, sent = ulm.Writer.fill, TrajectoryWriter.write, [], []

    def counted(self, *a, **k):
        frames.append(1)
        return write(self, *a, **k)

    def fill_and_interrupt(self, a):
        if len(frames) == 3 and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return fill(self, a)

    monkeypatch.setattr(TrajectoryWriter, "write", counted)
    monkeypatch.setattr(ulm.Writer, "fill", fill_and_interrupt)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        signal.signal(signal.SIGINT, old)
    return sent
