"""Randomized differential test of the Triton kernels: backend="triton" vs backend="torch" (the
reference), float64/float32 (bf16 where the Triton path takes it: values and first derivatives against
the float64 reference, tolerance from the torch backend's own bf16 error and from the reference's
change under a bf16-sized perturbation of its inputs), values and first/second
derivatives, inputs made column-strided, offset or transposed inside the differentiated function,
random subsets of the inputs requiring a gradient, a third of the cases on 16-wide tiles (TINY: the
kernels' channel/row/column tile loops at small sizes) and some with a block of 17-40 channels.
Reuses bench/fuzz_cpp.py's helpers. Families: gate (gate_mul, gate_mul_2d, seg_dot; per-row and shared
gates), gated_linear (public op with gates/additive none/row/shared, bias, both layouts: the saved-u
(HAS_U) and single-output forms; ``_core`` with prologue + epilogue gates; ``triton_forward_u``),
fused_gate (nn.FusedGate), gate_net (rank > 32 and bf16 must raise a clear error), mmea (MMEALinear:
one-node adapter, prepared path, MMEA_FUSED_LINEAR=0/auto, frozen adapters, no grad, 3-D input,
static gates). A Triton-side exception where the reference runs is a CRASH (both raise: a skip).
``--device cpu`` (default) sets TRITON_INTERPRET=1 before anything is imported; ``cuda``: a GPU. Usage:
  python bench/fuzz_triton.py [--device D] FAMILY SEED START SECONDS  (one family; CASE/FAIL/CRASH/SKIP/DONE lines)
  python bench/fuzz_triton.py [--device D] [SECONDS [FAMILIES]]       (each family, comma list, in subprocesses;
                                                                       summary_<family>.json in $FUZZ_OUT)"""
import contextlib, copy, importlib, json, os, random, subprocess, sys, tempfile, time, traceback, warnings
from unittest import mock


_K = sys.argv.index("--device") if "--device" in sys.argv else None
DEVICE = "cpu" if _K is None else (sys.argv[_K + 1] if _K + 1 < len(sys.argv) else "")
sys.argv[:] = sys.argv if _K is None else sys.argv[:_K] + sys.argv[_K + 2:]
if DEVICE not in ("cpu", "cuda"):
    raise SystemExit(f"--device must be cpu or cuda, got {DEVICE!r}")
if DEVICE == "cpu":  # before torch, triton or mmea_kernels is imported
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import fuzz_cpp as fc  # noqa: E402
from fuzz_cpp import ACT_E, ACT_O, _act, all_orders, cmp, draw_linear, irreps_str, mk, rand_blocks  # noqa: E402

BF16 = torch.bfloat16
NS = [0, 1, 2, 3, 5, 17, 63, 64, 65, 129]
_P = "mmea_kernels.ops."
_GL = [(_P + "gated_linear.triton_kernels", n, f) for n, f in (("tile_sizes", lambda *a: (16, 16)), (
    "block_m", lambda n, d, *a: max(16, 1 << (d - 1).bit_length())), ("block_n_wgrad", lambda *a: 16))]
_GN = [(_P + "gate_net.triton", "_blocks", lambda *a: (16, 16, 16, 1))]
_GT = [(_P + "gate.triton", n, lambda *a: (16, 16, 1)) for n in ("_gate_mul_blocks", "_seg_dot_blocks")]
TINY = {"gate": _GT, "gated_linear": _GL + _GT, "fused_gate": [(_P + "fused_gate.triton", "_blocks",
        lambda *a, **k: (16, 16, 1))], "gate_net": _GN, "mmea": _GL + _GN + _GT}  # module, name, tile sizes
STATE, DAMP = {"tiny": False}, {BF16: 2.0 ** -12}


Skip = type("Skip", (Exception,), {})  # a case not compared (its reason counted)


def draw_dtype(rng):
    r = rng.random()
    return torch.float64 if r < 0.6 else (torch.float32 if r < 0.85 else BF16)


def draw(rng, shape, dtype, pos=False, scale=1.0):
    """(a contiguous tensor on DEVICE, a stride mode for :func:`restride`)."""
    t, mode = mk(rng, shape, dtype, pos=pos)
    return (t.contiguous() * scale).to(DEVICE), mode


def restride(t, mode):
    """``t`` (2-D) as a column-strided / offset / transposed tensor with the same values; differentiable."""
    if t is None or t.dim() != 2 or mode in (None, "contig"):
        return t
    if mode == "colstride":
        return torch.stack([t, torch.zeros_like(t)], 2).reshape(t.shape[0], 2 * t.shape[1])[:, ::2]
    return torch.nn.functional.pad(t, (1, 2))[:, 1:t.shape[1] + 1] if mode == "offset" else t.t().contiguous().t()


def anchored(ys, leaves, damp):
    """``ys`` + 0·Σ leaves (every output on the graph of every leaf: an output that does not depend on the
    leaves, e.g. a linear without paths, gets zero derivatives of all orders on both sides, not a shorter list
    on one), times ``damp`` (bf16: 2^-12; fp32 outputs of 1e2-1e3: 2^-6): all_orders' sin(y) stays well conditioned."""
    z = sum(0 * t.sum() for t in leaves if t is not None and t.requires_grad)
    ys = ys if isinstance(ys, tuple) else (ys,)
    return tuple((y + z if torch.is_tensor(z) else y) * damp for y in ys)


def orders(f, ts, modes, req, grads, second, seed, damp=1.0):
    """Outputs of ``f`` (on leaves copied from ``ts``, restrided per ``modes``), then first derivatives of a
    random scalar and second derivatives (fuzz_cpp.all_orders) for the leaves that ``req`` marks."""
    lv = [None if t is None else t.detach().clone().requires_grad_(bool(grads and r)) for t, r in zip(ts, req)]
    cpu = (lambda ys: ys) if DEVICE == "cpu" else (lambda ys: tuple(y.cpu() for y in ys))  # noqa: E731 (all_orders:
    g = lambda *a: cpu(anchored(f(*[restride(t, m) for t, m in zip(a, modes)]), a, damp))  # noqa: E731 CPU weights)
    with torch.set_grad_enabled(grads):
        return all_orders(g, lv, second=second, seed=seed) if grads else list(g(*lv))


def names_of(outs, leaves, ts, req, grads, second):
    live = [n for n, t, r in zip(leaves, ts, req) if t is not None and r and grads]
    return outs + [f"d/d{n}" for n in live] + ([f"d2/d{n}" for n in live] if second else [])


def _rel_err(b, r):
    if b is None or r is None or r.numel() == 0:
        return 0.0
    return (b.detach().double() - r.detach()).abs().max().item() / max(r.abs().max().item(), 1e-30)


def bf16_tol(b, r, n=None):
    """4 x the larger of the torch backend's own bf16 error ``b`` and the float64 reference's change
    ``n`` under a relative perturbation of its inputs by up to 2^-8 (bf16's rounding), each relative
    to the largest reference value; at least 5e-2. ``n`` covers ill-conditioned outputs, sums of
    terms that cancel (a gate net's bias gradient 20x smaller than the sum of its terms' sizes), where
    the torch run can be lucky."""
    return max(5e-2, 4 * _rel_err(b, r), 4 * _rel_err(n, r))


def noisy(t, seed):
    """float64 ``t`` times (1 + u), u uniform in [-2^-8, 2^-8] (a bf16 rounding of every element)."""
    if t is None:
        return None
    u = torch.rand(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(t.device)
    return t.detach().double() * (1 + (2 * u - 1) * 2.0 ** -8)


def versus(ctx, ref_run, tri_run, names, dtype, bf_run=None, noise_run=None):
    """Reference first (an exception: skip), then CASE, then the Triton run (an exception: CRASH); the fails.
    bf16: ``bf_run``, the torch backend in bf16, and ``noise_run``, the float64 reference on inputs
    perturbed by :func:`noisy`, set the tolerance of each output (:func:`bf16_tol`)."""
    try:
        ref = ref_run()
    except Exception as e:  # noqa: BLE001
        raise e if isinstance(e, Skip) else Skip(f"reference raises {type(e).__name__}: {str(e)[:70]}")
    print("CASE " + json.dumps(dict(ctx, tiny=STATE["tiny"])), flush=True)
    got = tri_run()
    base, fails = (bf_run() if bf_run is not None and dtype == BF16 else []), []
    noise = noise_run() if noise_run is not None and dtype == BF16 else []
    if len(got) != len(ref):
        fails.append(dict(ctx, what="number of outputs and derivatives", got=len(got), ref=len(ref)))
    for k, (nm, a, r) in enumerate(zip(names, got, ref)):
        fc.RTOL[BF16] = bf16_tol(base[k] if k < len(base) else None, r, noise[k] if k < len(noise) else None)
        if dtype == BF16 and a is not None:
            fails += [dict(ctx, what=nm, err=f"dtype {a.dtype}, expected bfloat16")] if a.dtype != BF16 else []
            a = a.double()
        cmp(nm, a, r, dtype, fails, ctx)
    return fails


def ref_inputs(ts, dtype):
    """The reference's inputs: the same values, in float64 for bf16 cases."""
    return [None if t is None else (t.double() if dtype == BF16 else t) for t in ts]


def noisy_inputs(ts, seed):
    """The float64 reference's inputs perturbed by :func:`noisy` (for bf16 cases' ``noise_run``)."""
    return [noisy(t, seed + k) for k, t in enumerate(ts)]


# ----------------------------------------------------------------------------- families
def case_gate(rng, i):
    from mmea_kernels import IrrepsLayout, gate_mul, seg_dot
    from mmea_kernels.ops.gate.function import gate_mul_2d
    dtype = draw_dtype(rng)
    irr, lay = widen(rng, irreps_str(rand_blocks(rng))), rng.choice(["mul_ir", "ir_mul"])
    L = IrrepsLayout.of(irr, lay)
    N, D, G = rng.choice(NS), L.dim, L.num_gates
    shared, keep = rng.random() < 0.4, rng.random() < 0.6
    (x, mx), (b, mb) = draw(rng, (N, D), dtype), draw(rng, (N, D), dtype)
    g, mg = draw(rng, (G,) if shared else (N, G), dtype)
    req, grads = [rng.random() < 0.85 for _ in range(3)], rng.random() < 0.75
    second = grads and dtype != BF16 and rng.random() < 0.8
    ctx = dict(family="gate", i=i, irreps=irr, layout=lay, N=N, dtype=str(dtype), shared=shared, keep=keep,
               modes=[mx, mb, mg], req=req, grads=grads, second=second)

    def run(be, ts):
        def f(x, b, g):
            return (gate_mul(x, g, L, backend=be), gate_mul_2d(x, g, L, keep, be),
                    seg_dot(x, b, L, shared=False, backend=be), seg_dot(x, b, L, shared=True, backend=be))
        return lambda: orders(f, ts, [mx, mb, mg], req, grads, second, i, DAMP.get(dtype, 1.0))
    names = names_of(["gate_mul", "gate_mul_2d", "seg_dot", "seg_dot_shared"], "xbg", [x, b, g], req, grads,
                     second)
    return versus(ctx, run("torch", ref_inputs([x, b, g], dtype)), run("triton", [x, b, g]), names, dtype,
                  run("torch", [x, b, g]), run("torch", noisy_inputs([x, b, g], i)))


def widen(rng, irr):
    """``irr``, sometimes with a block of 17-40 channels appended (several 16-wide channel tiles)."""
    return irr + f"+{rng.randint(17, 40)}x{rng.randint(0, 2)}{rng.choice('eo')}" if rng.random() < 0.2 else irr


def gl_inputs(rng, spec, lin, dtype, N, gmode, amode, pmode):
    """(x, w, bias, gates, additive, prologue gates) and the stride modes of the 2-D ones."""
    def opt(mode, n, pos=False):
        if mode is None:
            return None, "contig"
        return draw(rng, (n,) if mode == "shared" else (N, n), dtype, pos=pos)
    x, mx = draw(rng, (N, spec.dim_in), dtype)
    w = lin.weight.detach().to(dtype).to(DEVICE).clone()
    w = w + 0.3 * draw(rng, tuple(w.shape), dtype)[0] if rng.random() < 0.5 else w
    bias = draw(rng, (lin.bias.numel(),), dtype)[0] if lin.bias.numel() > 0 and rng.random() < 0.85 else None
    (g, mg), (a, ma) = opt(gmode, spec.out_layout.num_gates, True), opt(amode, spec.out_layout.num_scalars)
    gp, mp = opt(pmode, spec.in_layout.num_gates, True)
    return [x, w, bias, g, a, gp], [mx, None, None, mg, ma, mp]


def case_gl(rng, i):
    from e3nn import o3
    from mmea_kernels.linear_spec import LinearSpec
    from mmea_kernels.ops.gate import gate_mul
    from mmea_kernels.ops.gated_linear import gated_linear
    from mmea_kernels.ops.gated_linear.function import _core
    from mmea_kernels.ops.gated_linear.reference import gated_linear_reference as glref
    from mmea_kernels.ops.gated_linear.triton_kernels import triton_forward_u
    _, irr_in, irr_out, biases = draw_linear(rng)
    irr_in, irr_out = widen(rng, irr_in), widen(rng, irr_out)
    dtype, lay, N = draw_dtype(rng), rng.choice(["mul_ir", "ir_mul"]), rng.choice(NS)
    form = rng.choice(["public", "public", "public", "core", "u"])  # u: triton_forward_u, no autograd
    gmode, amode = rng.choice([None, "row", "shared"]), rng.choice([None, "row", "shared"])
    pmode = rng.choice([None, "row", "shared"]) if form != "public" else None
    try:
        torch.manual_seed(rng.randint(0, 2**31))
        lin = o3.Linear(o3.Irreps(irr_in), o3.Irreps(irr_out), biases=biases).double()
    except Exception as e:  # noqa  (e3nn's own construction; e.g. biases without a 0e input)
        raise Skip(f"e3nn o3.Linear: {type(e).__name__}: {str(e)[:60]}")
    spec = LinearSpec.from_e3nn(lin, lay)
    ts, modes = gl_inputs(rng, spec, lin, dtype, N, gmode, amode, pmode)
    req = [rng.random() < p for p in (0.85, 0.7, 0.6, 0.7, 0.6, 0.7)]
    grads = form != "u" and rng.random() < 0.85
    second = grads and dtype != BF16 and rng.random() < 0.7
    ctx = dict(family="gated_linear", i=i, irreps_in=irr_in, irreps_out=irr_out, biases=biases, layout=lay, N=N,
               dtype=str(dtype), form=form, gates=gmode, additive=amode, pre_gates=pmode, bias_given=ts[2] is not None,
               modes=modes, req=req, grads=grads, second=second, dim_in=spec.dim_in, dim_out=spec.dim_out)

    def pre(x, gp):
        return x if gp is None else gate_mul(x, gp, spec.in_layout, backend="torch")

    def fn(tri):
        if form == "public":
            return lambda x, w, b, g, a, gp: gated_linear(x, w, b, g, a, spec, backend="triton" if tri else "torch")
        if form == "core":
            return (lambda x, w, b, g, a, gp: _core(x, w, b, gp, g, a, spec, "triton")) if tri else \
                (lambda x, w, b, g, a, gp: glref(pre(x, gp), w, b, g, a, spec))
        if tri:
            return lambda x, w, b, g, a, gp: triton_forward_u(x, w, b, gp, g, a, spec)
        return lambda x, w, b, g, a, gp: (glref(pre(x, gp), w, b, g, a, spec), glref(pre(x, gp), w, None, None, None,
                                                                                   spec))

    names = names_of(["y", "u"] if form == "u" else ["y"], ["x", "w", "bias", "gates", "add", "pre_gates"], ts, req,
                     grads, second)
    run = lambda tri, xs: lambda: orders(fn(tri), xs, modes, req, grads, second, i, DAMP.get(dtype, 1.0))  # noqa: E731
    return versus(ctx, run(False, ref_inputs(ts, dtype)), run(True, ts), names, dtype, run(False, ts),
                  run(False, noisy_inputs(ts, i)))


def fg_args(rng):
    """(FusedGate arguments, their description) of a random e3nn-style gate."""
    from mmea_kernels.ops.fused_gate.spec import ssp
    sc, gated, gates = fc.draw_gate_irreps(rng)
    act_e = ACT_E + ["ssp"]
    act_s = [rng.choice(act_e if p == "e" else ACT_O) for _, _, p in sc]
    act_g = [rng.choice(act_e[:-2] + ["ssp"] if p == "e" else ACT_O[:-1]) for _, _, p in gates]
    fa = lambda a: ssp if a == "ssp" else _act(a)  # noqa: E731
    args = (irreps_str(sc) or "", [fa(a) for a in act_s], irreps_str(gates) or "", [fa(a) for a in act_g],
            irreps_str(gated))
    return args, dict(scalars=irreps_str(sc), act_scalars=act_s, gates=irreps_str(gates), act_gates=act_g,
                      gated=irreps_str(gated))


def case_fg(rng, i):
    from mmea_kernels.nn import FusedGate
    dtype = draw_dtype(rng)
    args, desc = fg_args(rng)
    lay, N, scale = rng.choice(["mul_ir", "ir_mul"]), rng.choice(NS), rng.choice([0.5, 2.0, 2.0, 12.0])
    try:
        ft = FusedGate(*args, layout=lay, backend="triton")
        fr = FusedGate(*args, layout=lay, backend="torch")
    except Exception as e:  # noqa
        raise Skip(f"FusedGate: {type(e).__name__}: {str(e)[:80]}")
    x, mx = draw(rng, (N, ft.irreps_in.dim), dtype, scale=scale)
    grads = rng.random() < 0.8
    second = grads and dtype != BF16 and rng.random() < 0.8
    ctx = dict(family="fused_gate", i=i, layout=lay, N=N, dtype=str(dtype), x_scale=scale, x_mode=mx, grads=grads,
               second=second, fused=bool(ft.fused), dim=ft.irreps_in.dim, **desc)
    names = names_of(["y"], ["x"], [x], [True], grads, second)
    damp = 2.0 ** -6 if dtype == torch.float32 and scale > 2 else DAMP.get(dtype, 1.0)  # fp32: y up to 1e3
    run = lambda mod, xs: lambda: orders(mod, xs, [mx], [True], grads, second, i, damp)  # noqa: E731
    return versus(ctx, run(fr, ref_inputs([x], dtype)), run(ft, [x]), names, dtype, run(fr, [x]),
                  run(fr, noisy_inputs([x], i)))


def expect_error(ctx, run, *words):
    """A run that must raise a RuntimeError naming ``words``: [] when it does, else the fail."""
    print("CASE " + json.dumps(dict(ctx, tiny=STATE["tiny"])), flush=True)
    try:
        run()
    except RuntimeError as e:
        return [] if all(w in str(e) for w in words) else [dict(ctx, what="error message", err=str(e)[:200])]
    return [dict(ctx, what="no error", err=f"expected a RuntimeError naming {words}")]


def case_gn(rng, i):
    from mmea_kernels.ops.gate_net import gate_net
    dtype = draw_dtype(rng)
    N, S = rng.choice(NS), rng.choice([0, 1, 2, 3, 5, 9, 17, 40])
    R = rng.choice([1, 2, 3, 4, 5, 8, 16, 17, 31, 32]) if rng.random() < 0.9 else rng.randint(33, 40)
    A, G = rng.choice([0, 1, 2, 5, 9, 17]), rng.choice([0, 1, 3, 8, 20, 40])
    phi, outs = rng.choice(["exp", "residual"]), rng.choice(["both", "both", "add", "gates"])
    x0, mx = draw(rng, (N, S), dtype)
    ps = [draw(rng, (R, S), dtype, scale=1 / max(S, 1) ** 0.5)[0], draw(rng, (R,), dtype)[0],
          draw(rng, (A + G, R), dtype, scale=0.5 / R ** 0.5)[0], draw(rng, (A + G,), dtype, scale=0.5)[0]]
    req, grads = [rng.random() < 0.8 for _ in range(5)], rng.random() < 0.85
    second = grads and rng.random() < 0.6
    ctx = dict(family="gate_net", i=i, N=N, S=S, R=R, A=A, G=G, phi=phi, outs=outs, dtype=str(dtype), x_mode=mx,
               req=req, grads=grads, second=second)

    def fn(be):
        def f(x0, wd, bd, wu, bu):
            add, gates = gate_net(x0, wd, bd, wu, bu, A, phi, backend=be)
            return {"both": (add, gates), "add": add, "gates": gates}[outs]
        return f
    if dtype == BF16 or R > 32:
        return expect_error(ctx, lambda: fn("triton")(x0, *ps), *(["bfloat16"] if dtype == BF16 else ["32"]))
    names = names_of(["add", "gates"] if outs == "both" else [outs], ["x0", "w_down", "b_down", "w_up", "b_up"],
                     [x0] + ps, req, grads, second)
    damp = 2.0 ** -6 if dtype == torch.float32 and phi == "exp" else 1.0  # fp32: gates up to 1e2-1e3
    run = lambda be: lambda: orders(fn(be), [x0] + ps, [mx] + [None] * 4, req, grads, second, i, damp)  # noqa: E731
    return versus(ctx, run("torch"), run("triton"), names, dtype)


def mmea_run(mod, x, mode, lead3, grad, second, seed, path, damp):
    """[y, first derivatives of a random scalar (x and the parameters that require a gradient),
    second derivatives of |dx|²] under MMEA_FUSED_LINEAR=path; warnings of mmea_kernels as strings."""
    old, os.environ["MMEA_FUSED_LINEAR"] = os.environ.get("MMEA_FUSED_LINEAR"), path
    try:
        with warnings.catch_warnings(record=True) as ws, torch.set_grad_enabled(grad != "nograd"):
            warnings.simplefilter("always")
            xl = x.detach().clone().requires_grad_(grad in ("train", "frozen"))
            xin = restride(xl, mode)
            live = ([xl] if xl.requires_grad else []) + [p for p in mod.parameters() if p.requires_grad]
            y = anchored((mod(xin.unsqueeze(0) if lead3 else xin),), live, damp)[0]
            out = [y]
            if grad != "nograd" and live:
                gen = torch.Generator().manual_seed(seed)
                wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
                g = torch.autograd.grad((y.sin() * wy).sum(), live, create_graph=second, allow_unused=True)
                out += list(g)
                if second and xl.requires_grad and g[0] is not None and g[0].requires_grad:
                    out += list(torch.autograd.grad((g[0] * g[0]).sum(), live, allow_unused=True))
        return out, [str(w.message)[:200] for w in ws if "mmea_kernels" in str(w.filename)]
    finally:
        os.environ.pop("MMEA_FUSED_LINEAR") if old is None else os.environ.update(MMEA_FUSED_LINEAR=old)


def case_mmea(rng, i):
    from e3nn import o3
    from mmea_kernels import MMEALinear
    _, irr_in, irr_out, biases = draw_linear(rng)
    irr_in, irr_out, dtype = widen(rng, irr_in), widen(rng, irr_out), draw_dtype(rng)
    rank = rng.randint(1, 8) if rng.random() < 0.85 else rng.choice([16, 32, 33, 40])
    phi, N, path = rng.choice(["exp", "residual"]), rng.choice(NS), rng.choice(["1", "1", "1", "0", "auto"])
    grad = rng.choice(["train", "train", "frozen", "params", "nograd"])
    second = grad in ("train", "frozen") and dtype != BF16 and rng.random() < 0.5
    try:
        torch.manual_seed(rng.randint(0, 2**31))
        lin = o3.Linear(o3.Irreps(irr_in), o3.Irreps(irr_out), biases=biases).to(dtype).to(DEVICE)
        m = MMEALinear(lin, rank=rank, phi=phi, backend="triton")
    except Exception as e:  # noqa  (e3nn's own construction; e.g. biases without a 0e input)
        raise Skip(f"o3.Linear/MMEALinear: {type(e).__name__}: {str(e)[:60]}")
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3).to(p.dtype))
            p.requires_grad_(grad != "frozen")
        for p in m.base.parameters():
            p.requires_grad_(rng.random() < 0.3)
    r = copy.deepcopy(m)
    r.backend = "torch"
    rb = copy.deepcopy(r)
    r = r.double() if dtype == BF16 else r
    x, mx = draw(rng, (N, lin.irreps_in.dim), dtype)
    lead3 = rng.random() < 0.15
    ctx = dict(family="mmea", i=i, irreps_in=irr_in, irreps_out=irr_out, biases=biases, rank=rank, phi=phi, N=N,
               dtype=str(dtype), path=path, grad=grad, second=second, x_mode=mx, lead3=lead3,
               static=m.mmea_up is None, scalar_span=m._scalar_span)
    pn = [n for n, p in m.named_parameters() if p.requires_grad]
    live = (["x"] if grad in ("train", "frozen") else []) + pn
    names = ["y"] + ([f"d/d{n}" for n in live] if grad != "nograd" and live else [])
    names += [f"d2/d{n}" for n in live] if second else []
    xr, seen, dp = (x.double() if dtype == BF16 else x), [], DAMP.get(dtype, 1.0)

    def tri():
        out, ws = mmea_run(m, x, mx, lead3, grad, second, i, path, dp)
        seen.extend(ws)
        return out
    ref = lambda mod, xs: lambda: mmea_run(mod, xs, mx, lead3, grad, second, i, "0", dp)[0]  # noqa: E731
    noise_run = None
    if dtype == BF16:  # the float64 reference with its parameters and input perturbed
        rn = copy.deepcopy(r)
        with torch.no_grad():
            for k, p in enumerate(rn.parameters()):
                p.copy_(noisy(p, i + k))
        noise_run = ref(rn, noisy(x, i))
    fails = versus(ctx, ref(r, xr), tri, names, dtype, ref(rb, x), noise_run)
    return fails + [dict(ctx, what="warning", err=w) for w in seen]


FAMILIES = {"gate": case_gate, "gated_linear": case_gl, "fused_gate": case_fg, "gate_net": case_gn,
            "mmea": case_mmea}


# ----------------------------------------------------------------------------- driver
def child(family, seed, start, seconds):
    torch.set_num_threads(1)
    t0, i, n, nf, nc, skips = time.time(), start, 0, 0, 0, {}
    while time.time() - t0 < seconds:
        rng = random.Random(f"{seed}-{family}-{i}")
        STATE["tiny"] = random.Random(f"tiny-{seed}-{family}-{i}").random() < 0.35
        try:
            with contextlib.ExitStack() as st:
                for mod, name, f in TINY[family] if STATE["tiny"] else []:
                    st.enter_context(mock.patch.object(importlib.import_module(mod), name, f))
                res = FAMILIES[family](rng, i)
            n += 1
            for f in res:
                nf += 1
                print("FAIL " + json.dumps(dict(f, tiny=STATE["tiny"]), default=str), flush=True)
        except Skip as e:
            skips[str(e)[:60]] = skips.get(str(e)[:60], 0) + 1
            print("SKIP " + json.dumps(dict(i=i, why=str(e))), flush=True)
        except Exception:  # noqa: BLE001  (the Triton side raised where the reference ran)
            n, nc = n + 1, nc + 1
            print("CRASH " + json.dumps(dict(i=i, tiny=STATE["tiny"], tb=traceback.format_exc()[-2500:])), flush=True)
        i += 1
    print("DONE " + json.dumps(dict(family=family, cases=n, next=i, fails=nf, crashes=nc, skips=skips)), flush=True)


def run_family(fam, seconds, seed, out_dir):
    """Children until ``seconds`` are spent; a child that dies (signal, abort) is restarted after its last case."""
    s = dict(cases=0, fails=[], crashes=[], skips={}, wall_s=0.0)
    t0, start = time.time(), 0
    while seconds - (time.time() - t0) > 5:
        left = seconds - (time.time() - t0)
        cmd = [sys.executable, os.path.abspath(__file__), "--device", DEVICE, fam, str(seed), str(start),
               str(int(left))]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir, timeout=left + 300)
            stdout, stderr, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            txt = lambda b: b if isinstance(b, str) else (b or b"").decode()  # noqa: E731
            stdout, stderr, rc = txt(e.stdout), txt(e.stderr), "timeout"
        last = None
        for line in stdout.splitlines():
            kind, _, body = line.partition(" ")
            if kind == "CASE":
                last, s["cases"] = json.loads(body), s["cases"] + 1
            elif kind == "FAIL":
                s["fails"].append(json.loads(body))
            elif kind == "CRASH":
                s["crashes"].append(dict(json.loads(body), case=last))
            elif kind == "SKIP":
                why = json.loads(body)["why"][:60]
                s["skips"][why] = s["skips"].get(why, 0) + 1
        if rc == 0 and ("\n" + stdout).count("\nDONE "):
            break
        s["crashes"].append(dict(rc=rc, case=last, stderr=stderr[-1500:]))
        start = (last["i"] + 1) if last else start + 1
    s["wall_s"] = round(time.time() - t0, 1)
    return s


def parent(seconds_per_family, fams, seed=15):
    out_dir = os.environ.get("FUZZ_OUT") or os.path.join(tempfile.gettempdir(), "mmea_fuzz_triton")
    os.makedirs(out_dir, exist_ok=True)  # the children run there (the installed package, not ./)
    bad = 0  # fails and crashes, and families that compared nothing
    for fam in fams:
        s = run_family(fam, seconds_per_family, seed, out_dir)
        bad += len(s["fails"]) + len(s["crashes"]) + (s["cases"] == 0)
        print(fam, json.dumps(dict(cases=s["cases"], fails=len(s["fails"]), crashes=len(s["crashes"]),
                                   skips=sum(s["skips"].values()), wall_s=s["wall_s"])), flush=True)
        with open(os.path.join(out_dir, f"summary_{fam}.json"), "w") as fh:
            json.dump(s, fh, indent=1, default=str)
    print("summaries in", out_dir, flush=True)
    return bad


if __name__ == "__main__":
    if len(sys.argv) >= 5:
        child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif len(sys.argv) > 3:
        raise SystemExit("usage: fuzz_triton.py [--device D] [SECONDS [FAMILY,FAMILY,...]]  (families as one comma list)")
    else:
        fams = sys.argv[2].split(",") if len(sys.argv) > 2 else list(FAMILIES)
        if any(f not in FAMILIES for f in fams):
            raise SystemExit(f"unknown family in {fams}; expected some of {list(FAMILIES)}")
        seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 200
        if seconds <= 5:
            raise SystemExit(f"SECONDS per family must be over 5 (got {seconds:g}): each child needs time for a case")
        sys.exit(1 if parent(seconds, fams) else 0)
