"""Randomized differential test of the C++ kernels: backend="cpp" vs backend="torch" (the reference), float64/float32, values and first/second derivatives, 1 vs 2 threads (bitwise). Written by a review on 2026-11-30. Usage:
  python bench/fuzz_cpp.py FAMILY SEED START SECONDS   (one family; prints CASE/FAIL/DONE lines)
  python bench/fuzz_cpp.py [SECONDS]                    (every family, each in its own subprocess)"""
import copy, json, math, os, random, subprocess, sys, tempfile, time
# the 1-vs-2-thread check is of the kernels' own summation order: MKL's GEMMs, in its default mode, give
# other bits on another calling thread on some CPUs (an AVX-512 Xeon), so they run reproducibly here
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
import torch

RTOL = {torch.float64: 1e-10, torch.float32: 2e-4}
NS = [0, 1, 2, 3, 5, 17, 63, 64, 65, 257, 1025]


def irreps_str(blocks):
    return "+".join(f"{m}x{l}{p}" for m, l, p in blocks)


def rand_blocks(rng, nmax=5, lmax=4, ls=None):
    bl = [(rng.randint(0, 9), rng.choice(ls) if ls else rng.randint(0, lmax), rng.choice("eo"))
          for _ in range(rng.randint(1, nmax))]
    if rng.random() < 0.35:
        bl.append(rng.choice(bl))  # repeated unsimplified entry
    if rng.random() < 0.3:
        bl.insert(0, (rng.randint(1, 9), 0, "e"))
    return bl


def rand_N(rng, big=True):
    return rng.choice(NS if big else NS[:-1])


def mk(rng, shape, dtype, mode=None, pos=False):
    """A float tensor of ``shape`` (2-D: maybe non-contiguous), drawn with a seeded generator."""
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    def draw(*s):
        t = torch.randn(*s, generator=gen, dtype=torch.float64)
        return (t.abs() * 0.5 + 0.5 if pos else t).to(dtype)
    if mode is None:
        mode = rng.choice(["contig", "contig", "colstride", "offset", "transposed"])
    if len(shape) != 2 or mode == "contig":
        return draw(*shape), "contig"
    N, D = shape
    if mode == "colstride":
        return draw(N, 2 * D)[:, ::2], mode
    if mode == "offset":
        return draw(N, D + 3)[:, 1:D + 1], mode
    return draw(D, N).t(), mode  # column-major


def cmp(name, got, ref, dtype, fails, ctx):
    if got is None and ref is None:
        return
    if got is None or ref is None:
        got = torch.zeros_like(ref) if got is None else got
        ref = torch.zeros_like(got) if ref is None else ref
    if got.shape != ref.shape or got.dtype != ref.dtype:
        fails.append(dict(ctx, what=name, err=f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(ref.shape)} {ref.dtype}"))
        return
    if ref.numel() == 0:
        return
    g, r = got.detach().double(), ref.detach().double()
    if torch.isnan(g).any() != torch.isnan(r).any() or torch.isinf(g).any() != torch.isinf(r).any():
        fails.append(dict(ctx, what=name, err="nan/inf mismatch", nan_got=bool(torch.isnan(g).any()), nan_ref=bool(torch.isnan(r).any())))
        return
    fin = torch.isfinite(r)
    d = (g - r)[fin].abs().max().item() if fin.any() else 0.0
    s = r[fin].abs().max().item() if fin.any() else 0.0
    rel = d / max(s, 1e-12)
    if rel > RTOL[dtype] and d > 1e-13 * (dtype == torch.float64) + 1e-6 * (dtype == torch.float32):
        fails.append(dict(ctx, what=name, rel=rel, abs=d, scale=s))


def same_bits(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a.detach(), 7.0), torch.nan_to_num(b.detach(), 7.0))


def leaves_clone(ts):
    return [None if t is None else t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in ts]


def all_orders(fn, leaves, second=True, seed=0):
    """(outputs..., first grads of a random scalar, second derivatives of sum of squares of the first grads)."""
    live = [t for t in leaves if t is not None and t.requires_grad]
    ys = fn(*leaves)
    ys = ys if isinstance(ys, tuple) else (ys,)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for y in ys:
        w = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
        loss = loss + (y.sin() * w).sum()
    if not live or not (torch.is_tensor(loss) and loss.requires_grad):
        return list(ys)
    g1 = torch.autograd.grad(loss, live, create_graph=second, allow_unused=True)
    out = list(ys) + list(g1)
    if second:
        g1l = [g for g in g1 if g is not None and g.requires_grad]
        if g1l:
            s2 = sum(((g * g).sum() + g.sum()) for g in g1l)
            g2 = torch.autograd.grad(s2, live, allow_unused=True)
            out += list(g2)
    return out


def run_threads(f):
    """f() at 1 and 2 threads (the 2-thread result first); returns (res2, res1)."""
    torch.set_num_threads(2)
    r2 = f()
    torch.set_num_threads(1)
    r1 = f()
    torch.set_num_threads(2)
    return r2, r1


def check_family_results(names, cpp2, cpp1, ref, dtype, fails, ctx, det=True):
    """``det``: check 1 vs 2 threads bitwise (True, or one flag per name)."""
    dets = det if isinstance(det, (list, tuple)) else [det] * len(names)
    for nm, a, b, r, d_ in zip(names, cpp2, cpp1, ref, dets):
        cmp(nm, a, r, dtype, fails, ctx)
        if d_ and not same_bits(a, b):
            d = (a.detach().double() - b.detach().double()).abs().max().item() if a is not None and b is not None and a.numel() else None
            fails.append(dict(ctx, what=nm + " threads1!=threads2", abs=d))


# ----------------------------------------------------------------------------- families
def case_gate(rng, i):
    from mmea_kernels import IrrepsLayout, gate_mul, seg_dot
    from mmea_kernels.ops.gate.function import gate_mul_2d
    dtype = torch.float64 if rng.random() < 0.7 else torch.float32
    irr = irreps_str(rand_blocks(rng))
    lay = rng.choice(["mul_ir", "ir_mul"])
    L = IrrepsLayout.of(irr, lay)
    N = rand_N(rng)
    D, G = L.dim, L.num_gates
    shared = rng.random() < 0.4
    keep = rng.random() < 0.6
    x, mx = mk(rng, (N, D), dtype)
    b, mb = mk(rng, (N, D), dtype)
    g, mg = (mk(rng, (G,), dtype) if shared else mk(rng, (N, G), dtype))
    grads = dtype == torch.float64 and N <= 257 and rng.random() < 0.7
    ctx = dict(family="gate", i=i, irreps=irr, layout=lay, N=N, dtype=str(dtype), shared=shared, keep=keep,
               modes=[mx, mb, mg], grads=grads)
    print("CASE " + json.dumps(ctx), flush=True)

    def fn(be):
        def f(x, b, g):
            y1 = gate_mul(x, g, L, backend=be)
            y2 = gate_mul_2d(x, g, L, keep, be) if x.dim() == 2 else y1
            s1 = seg_dot(x, b, L, shared=False, backend=be)
            s2 = seg_dot(x, b, L, shared=True, backend=be)
            return (y1, y2, s1, s2)
        def run():
            lv = leaves_clone([x, b, g]) if grads else [x, b, g]
            with torch.set_grad_enabled(grads):
                return all_orders(f, lv, second=True, seed=i) if grads else list(f(*lv))
        return run
    ref = fn("torch")()
    c2, c1 = run_threads(fn("cpp"))
    names = ["gate_mul", "gate_mul_2d(keep)", "seg_dot", "seg_dot_shared"] + [f"d{k}" for k in range(20)]
    fails = []
    check_family_results(names, c2, c1, ref, dtype, fails, ctx)
    again = fn("cpp")()
    for nm, a, bb in zip(names, c2, again):
        if not same_bits(a, bb):
            fails.append(dict(ctx, what=nm + " run-to-run"))
    return fails


def draw_linear(rng):
    """(dtype, irreps_in, irreps_out, biases) of a random linear layer (the draws in this order)."""
    dtype = torch.float64 if rng.random() < 0.7 else torch.float32
    bi, bo = rand_blocks(rng, 4), rand_blocks(rng, 4)
    return dtype, irreps_str(bi), irreps_str(bo), rng.random() < 0.5


def case_gl(rng, i):
    from e3nn import o3
    from mmea_kernels.linear_spec import LinearSpec
    from mmea_kernels.ops.gated_linear import gated_linear
    dtype, irr_in, irr_out, biases = draw_linear(rng)
    lay = rng.choice(["mul_ir", "ir_mul"])
    N = rand_N(rng)
    gmode, amode = rng.choice([None, "row", "shared"]), rng.choice([None, "row", "shared"])
    ctx = dict(family="gated_linear", i=i, irreps_in=irr_in, irreps_out=irr_out, biases=biases, layout=lay, N=N,
               dtype=str(dtype), gates=gmode, additive=amode)
    try:
        torch.manual_seed(rng.randint(0, 2**31))
        lin = o3.Linear(o3.Irreps(irr_in), o3.Irreps(irr_out), biases=biases).double()
    except Exception as e:  # noqa  (e3nn's own construction; e.g. biases without a 0e input)
        return [("skip", f"e3nn o3.Linear: {type(e).__name__}: {str(e)[:100]}")]
    spec = LinearSpec.from_e3nn(lin, lay)
    Go, So = spec.out_layout.num_gates, spec.out_layout.num_scalars
    x, mx = mk(rng, (N, spec.dim_in), dtype)
    w = lin.weight.detach().to(dtype).clone()
    if rng.random() < 0.5:
        w = w + 0.3 * mk(rng, tuple(w.shape), dtype)[0]
    bias = None
    if lin.bias.numel() > 0 and rng.random() < 0.85:
        bias = mk(rng, (lin.bias.numel(),), dtype)[0]
    gts = None if gmode is None else mk(rng, (Go,) if gmode == "shared" else (N, Go), dtype, pos=True)[0]
    add = None if amode is None else mk(rng, (So,) if amode == "shared" else (N, So), dtype)[0]
    grads = N <= 257 and rng.random() < 0.8
    second = grads and rng.random() < 0.7
    ctx.update(x_mode=mx, bias_given=bias is not None, grads=grads, second=second, dim_in=spec.dim_in,
               dim_out=spec.dim_out, weight_numel=spec.weight_numel)
    print("CASE " + json.dumps(ctx), flush=True)

    def fn(be):
        def run():
            lv = leaves_clone([x, w, bias, gts, add]) if grads else [x, w, bias, gts, add]
            f = lambda x, w, b, g, a: gated_linear(x, w, b, g, a, spec, backend=be)
            with torch.set_grad_enabled(grads):
                return all_orders(f, lv, second=second, seed=i) if grads else [f(*lv)]
        return run
    ref = fn("torch")()
    c2, c1 = run_threads(fn("cpp"))
    live = ["x", "w", "bias", "gates", "add"]
    live = [n for n, t in zip(live, [x, w, bias, gts, add]) if t is not None]
    names = ["y"] + [f"d/d{n}" for n in live] + [f"d2/d{n}" for n in live]
    fails = []
    check_family_results(names, c2, c1, ref, dtype, fails, ctx)
    return fails


ACT_E = ["silu", "tanh", "sigmoid", "abs", "softplus", None]
ACT_O = ["tanh", "abs", None]


def _act(name):
    import torch.nn.functional as F
    return {"silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "abs": torch.abs, "softplus": F.softplus,
            None: None}[name]


def draw_gate_irreps(rng):
    """(scalars, gated, gates) blocks of a random e3nn-style gate: the gates split into random pieces,
    sometimes with an entry of multiplicity 0."""
    sc = [(rng.randint(0, 9), 0, rng.choice("eo")) for _ in range(rng.randint(0, 3))]
    gated = rand_blocks(rng, 4, ls=[1, 2, 3, 4]) if rng.random() < 0.85 else rand_blocks(rng, 4)
    gates, left = [], sum(m for m, _, _ in gated)
    while left > 0:
        m = rng.randint(1, left)
        gates.append((m, 0, rng.choice("eo")))
        left -= m
    if rng.random() < 0.2:
        gates.insert(rng.randint(0, len(gates)), (0, 0, "e"))
    return sc, gated, gates


def case_fg(rng, i):
    from e3nn import o3
    from e3nn.nn import Gate
    from mmea_kernels.nn import FusedGate
    dtype = torch.float64 if rng.random() < 0.7 else torch.float32
    sc, gated, gates = draw_gate_irreps(rng)
    act_s = [rng.choice(ACT_E if p == "e" else ACT_O) for _, _, p in sc]
    act_g = [rng.choice(ACT_E[:-1] if p == "e" else ACT_O[:-1]) for _, _, p in gates]
    lay = rng.choice(["mul_ir", "ir_mul"])
    N = rand_N(rng)
    ctx = dict(family="fused_gate", i=i, scalars=irreps_str(sc), act_scalars=act_s, gates=irreps_str(gates),
               act_gates=act_g, gated=irreps_str(gated), layout=lay, N=N, dtype=str(dtype))
    args = (irreps_str(sc) or "", [_act(a) for a in act_s], irreps_str(gates) or "", [_act(a) for a in act_g],
            irreps_str(gated))
    try:
        fc = FusedGate(*args, layout=lay, backend="cpp")
        ft = FusedGate(*args, layout=lay, backend="torch")
    except Exception as e:  # noqa
        return [("skip", f"{type(e).__name__}: {str(e)[:100]}")]
    e3 = None
    if lay == "mul_ir":
        try:
            e3 = Gate(*args)
        except Exception as e:  # noqa
            e3 = None
            ctx["e3nn_gate_error"] = str(e)[:80]
    D = fc.irreps_in.dim
    x, mx = mk(rng, (N, D), dtype)
    x = x * 2
    grads = N <= 257 and rng.random() < 0.8
    ctx.update(x_mode=mx, grads=grads, fused=bool(fc.fused), dim=D)
    print("CASE " + json.dumps(ctx), flush=True)

    def fn(mod):
        def run():
            lv = leaves_clone([x]) if grads else [x]
            with torch.set_grad_enabled(grads):
                return all_orders(mod, lv, second=True, seed=i) if grads else [mod(*lv)]
        return run
    ref = fn(ft)()
    c2, c1 = run_threads(fn(fc))
    fails = []
    names = ["y", "dx", "d2x"]
    check_family_results(names, c2, c1, ref, dtype, fails, ctx)
    if e3 is not None:
        r3 = fn(e3)()
        for nm, a, r in zip(names, c2, r3):
            cmp(nm + " vs e3nn.Gate", a, r, dtype, fails, ctx)
    return fails


def case_mmea(rng, i):
    from e3nn import o3
    from mmea_kernels import MMEALinear
    dtype, irr_in, irr_out, biases = draw_linear(rng)
    rank = rng.randint(1, 8)
    phi = rng.choice(["exp", "residual"])
    N = rand_N(rng)
    ctx = dict(family="mmea", i=i, irreps_in=irr_in, irreps_out=irr_out, biases=biases, rank=rank, phi=phi, N=N,
               dtype=str(dtype))
    try:
        torch.manual_seed(rng.randint(0, 2**31))
        lin = o3.Linear(o3.Irreps(irr_in), o3.Irreps(irr_out), biases=biases).to(dtype)
    except Exception as e:  # noqa  (e3nn's own construction; e.g. biases without a 0e input)
        return [("skip", f"e3nn o3.Linear: {type(e).__name__}: {str(e)[:100]}")]
    m = MMEALinear(lin, rank=rank, phi=phi, backend="cpp")
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3).to(p.dtype))
    r = copy.deepcopy(m)
    r.backend = "torch"
    x, mx = mk(rng, (N, lin.irreps_in.dim), dtype)
    second = N <= 257 and rng.random() < 0.5
    ctx.update(x_mode=mx, second=second, n_adapter_params=len(m.adapter_parameters()))
    print("CASE " + json.dumps(ctx), flush=True)

    def fn(mod):
        def run():
            xx = x.detach().clone().requires_grad_()
            ps = mod.adapter_parameters()
            y = mod(xx)
            gen2 = torch.Generator().manual_seed(i)
            wy = torch.randn(y.shape, generator=gen2, dtype=torch.float64).to(y.dtype)
            loss = (y.sin() * wy).sum()
            g = torch.autograd.grad(loss, [xx] + ps, create_graph=second, allow_unused=True)
            out = [y] + list(g)
            if second:
                gx = g[0]
                if gx is not None and gx.requires_grad:
                    out += list(torch.autograd.grad((gx * gx).sum(), [xx] + ps, allow_unused=True))
            return out
        return run
    ref, ref1 = run_threads(fn(r))
    c2, c1 = run_threads(fn(m))
    ref_bitwise = [same_bits(a, b) for a, b in zip(ref, ref1)]
    ctx["torch_ref_threads_bitwise"] = all(ref_bitwise)
    pn = [n for n, p in m.named_parameters() if not n.startswith("base.")]
    names = ["y", "dx"] + [f"d/d{n}" for n in pn] + ["d2 dx"] + [f"d2/d{n}" for n in pn]
    fails = []
    # a result the torch reference itself gives with other bits on 2 threads comes from ATen ops (the
    # create_graph backward runs the torch formulas; MKL's GEMM depends on the thread count): the
    # thread check is for the C++ kernels' own results
    check_family_results(names, c2, c1, ref, dtype, fails, ctx, det=ref_bitwise)
    return fails


FAMILIES = {"gate": case_gate, "gated_linear": case_gl, "fused_gate": case_fg, "mmea": case_mmea}


def child(family, seed, start, seconds):
    torch.set_num_threads(2)
    t0 = time.time()
    i = start
    n = 0
    skips = {}
    nf = 0
    while time.time() - t0 < seconds:
        rng = random.Random(seed * 1_000_003 + i * 7919 + hash(family) % 1000)
        rng = random.Random(f"{seed}-{family}-{i}")
        res = FAMILIES[family](rng, i)
        if res and isinstance(res[0], tuple) and res[0][0] == "skip":
            skips[res[0][1][:60]] = skips.get(res[0][1][:60], 0) + 1
        else:
            n += 1
            for f in res:
                nf += 1
                print("FAIL " + json.dumps(f), flush=True)
        i += 1
    print("DONE " + json.dumps(dict(family=family, cases=n, next=i, fails=nf, skips=skips)), flush=True)


def parent(seconds_per_family, seed=15):
    fams = sys.argv[2].split(",") if len(sys.argv) > 2 else list(FAMILIES)
    out_dir = os.environ.get("FUZZ_OUT", os.path.join(tempfile.gettempdir(), "mmea_fuzz"))
    os.makedirs(out_dir, exist_ok=True)  # the children run there (the installed package, not ./) and the summaries go there
    procs = {}
    for fam in fams:
        procs[fam] = (0, time.time())
    summary = {}
    for fam in fams:
        start, left = 0, seconds_per_family
        summary[fam] = dict(cases=0, fails=[], crashes=[])
        while left > 5:
            t = time.time()
            p = subprocess.run([sys.executable, __file__, fam, str(seed), str(start), str(int(left))],
                               capture_output=True, text=True, cwd=out_dir)
            left -= time.time() - t
            last = None
            for line in p.stdout.splitlines():
                if line.startswith("CASE "):
                    last = json.loads(line[5:])
                elif line.startswith("FAIL "):
                    summary[fam]["fails"].append(json.loads(line[5:]))
                elif line.startswith("DONE "):
                    d = json.loads(line[5:])
                    summary[fam]["cases"] += d["cases"]
                    summary[fam]["skips"] = d["skips"]
            if p.returncode != 0:
                summary[fam]["crashes"].append(dict(rc=p.returncode, case=last, stderr=p.stderr[-1500:]))
                start = (last["i"] + 1) if last else start + 1
                summary[fam]["cases"] += (last["i"] - start + 1) if False else 0
                continue
            break
        print(fam, json.dumps(dict(cases=summary[fam]["cases"], n_fails=len(summary[fam]["fails"]),
                                   crashes=len(summary[fam]["crashes"]), skips=summary[fam].get("skips"))), flush=True)
        with open(os.path.join(out_dir, f"summary_{fam}.json"), "w") as fh:
            json.dump(summary[fam], fh, indent=1)


if __name__ == "__main__":
    if len(sys.argv) >= 5:
        child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        parent(float(sys.argv[1]) if len(sys.argv) > 1 else 200)
