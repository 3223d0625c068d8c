"""Whole-model cost of MMEA: an adapted MACE against the same frozen MACE (energy + forces, what
every MD step pays), and one force-training step of MMEA against ELoRA at the same rank.

Both models are timed in the same process in alternating rounds (the order flips every round; an
odd ``--rounds`` is raised by one so each side goes first equally often); the result is the median
of the per-round ratios with its interquartile range, because single timings on a shared machine
drift by tens of percent. Each JSON row also keeps every round's times and ratio, the CPU model and
the git commit.

    python bench/model_overhead.py                                   # CPU, 1 thread, 4 aspirin frames
    python bench/model_overhead.py --device cuda --frames 64 --rounds 50 --out $OUT
    python bench/model_overhead.py --device cuda --frames 64 --profile 5      # where the time goes

``--profile K`` adds, per model (frozen, MMEA, ELoRA), what K energy+force evaluations cost: host
time (until the call returns, before synchronising), wall time, and from ``torch.profiler`` the
number of device kernels and their summed device time per evaluation, plus the kernels whose
summed time grows most from the frozen to the MMEA model. Host time close to wall time with
device time well below it means the model is bound by launches and Python, not by the GPU; on a
CPU the kernel count is the number of ATen ops dispatched (a launch-count proxy). On CUDA it also
counts the host-device synchronisations per evaluation (``torch.cuda.set_sync_debug_mode``) and
the source lines that cause them: one sync per layer stalls the host until the device is idle,
which turns an overlapped host + device into host plus device.
``--compile`` times every model under ``torch.compile`` (inductor, static shapes, ``fullgraph``),
the way mace-torch compiles MACE: built with e3nn's code generation off, ``torch.autograd.grad``
traced into the graph, and forces always with ``create_graph`` (``training=True``, as mace-torch's
calculator calls a compiled model); each compiled model is first checked against its eager self.
In the fused adapters the linear + gate is then a custom op and the gate net compiled torch ops.
``MMEA_FUSED_LINEAR=0`` makes every ``MMEALinear`` run its base layer and then the gate (the
unfused path), for comparing the two on a device; ``MMEA_FUSED_LINEAR=auto`` lets each layer time
both at its first calls and keep the faster (the rows then list every choice with its two times).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import platform
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def _timer(device):
    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t
    return run


def paired(fa, fb, rounds: int, device, warmup: int = 3) -> dict:
    """Median and IQR of time(fb)/time(fa) over alternating rounds (an even count: ``rounds`` + 1
    when odd, so each side goes first in half of them), each side's median, and every round's times
    and ratio."""
    rounds += rounds % 2
    t = _timer(device)
    for _ in range(warmup):
        fa(), fb()
    ra, rb, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            b, a = t(fb), t(fa)
        else:
            a, b = t(fa), t(fb)
        ra.append(a)
        rb.append(b)
        ratios.append(b / a)
    q1, med, q3 = _quartiles(ratios)
    return {"ratio_median": med, "ratio_q1": q1, "ratio_q3": q3, "a_ms": 1e3 * statistics.median(ra),
            "b_ms": 1e3 * statistics.median(rb), "rounds": rounds, "a_round_ms": [1e3 * x for x in ra],
            "b_round_ms": [1e3 * x for x in rb], "ratios": ratios}


def machine_label(device) -> str:
    """The card's name, or the CPU's architecture and intra-op threads, for a result row."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {torch.get_num_threads()} thread(s)"


def default_molecule(data_dir=None) -> str:
    """The issue's frames, aspirin, when the rMD17 splits are found; else the built-in toluene."""
    from mmea_kernels.app.data import find_rmd17
    return "aspirin" if find_rmd17(data_dir, ("aspirin",)) is not None else "toluene"


def build(args, device, dtype):
    import mmea_kernels as mk
    from mmea_kernels.app.data import _GEOMETRIES, find_rmd17, read_xyz, toy_molecules
    from mmea_kernels.integrations.mace import PRESETS, atoms_to_batch, build_mace

    if args.molecule in _GEOMETRIES:  # a built-in geometry, jittered
        frames = toy_molecules(args.molecule, args.frames)
    else:  # the first frames of an rMD17 training split
        try:
            d = find_rmd17(args.data_dir, (args.molecule,))
        except FileNotFoundError as exc:
            raise SystemExit(f"--data-dir: {exc}") from None
        if d is None:
            raise SystemExit(f"no rMD17 splits for {args.molecule!r} (pass --data-dir or set MMEA_RMD17_DIR), and no "
                             f"built-in geometry for it (built in: {', '.join(sorted(_GEOMETRIES))})")
        frames = read_xyz(d / args.molecule / "train.xyz", f":{args.frames}")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _codegen_off(args.compile):
            base = build_mace(args.preset).to(device=device, dtype=dtype)
        cfg = PRESETS[args.preset]
        batch = atoms_to_batch(frames, cfg.atomic_numbers, cfg.r_max, device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    for p in base.parameters():
        p.requires_grad_(False)
    if getattr(args, "split_slices", False):  # what load_model gives every base model (e3nn graphs rewritten)
        mk.split_tp_slices(base)
    mmea = copy.deepcopy(base)
    mk.inject_adapters(mmea, method="mmea", rank=args.rank)
    elora = copy.deepcopy(base)
    mk.inject_adapters(elora, method="elora", rank=args.rank)
    with torch.no_grad():  # non-trivial adapters (the cost does not depend on the values)
        for m in (mmea, elora):
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.01)
    return base, mmea, elora, batch


_OP_NAME = re.compile(r"^\w+::\w+(\.\w+)?$")  # a dispatched op (aten::mm, mmea_kernels_ext::gate_mul), not a range


def _codegen_off(compile_backend):
    """e3nn's TorchScript code generation off while building a model to compile (mace-torch's
    ``disable_e3nn_codegen``); a no-op otherwise."""
    import contextlib
    if not compile_backend:
        return contextlib.nullcontext()
    from mace.tools.compile import disable_e3nn_codegen
    return disable_e3nn_codegen()


def compile_checked(models: dict, batch, backend, rtol: float) -> dict:
    """``torch.compile`` each model as mace-torch does, after checking that its compiled energies and
    forces equal the eager ones (``SystemExit`` naming the model when they do not)."""
    from mace.tools.compile import configure_autograd_for_compile
    configure_autograd_for_compile()
    out = {}
    for name, m in models.items():
        c = torch.compile(m, backend=backend, dynamic=False, fullgraph=True)
        t = time.perf_counter()
        got, want = energy_forces(c, batch, training=True), energy_forces(m, batch, training=True)
        for what, a, b in zip(("energy", "forces"), got, want):
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            if not err <= rtol:
                raise SystemExit(f"--compile: the compiled {name} model's {what} differ from eager by {err:.2e} "
                                 f"(relative to the largest value; tolerance {rtol:g})")
        print(f"compiled {name} ({getattr(backend, '__name__', backend)}) in {time.perf_counter() - t:.0f} s; equals eager", flush=True)
        out[name] = c
    return out


def _kernel_events(prof, device):
    """(name, microseconds) of every device kernel and copy in ``prof``; on a CPU, of every op that
    the dispatcher reached from Python (an op with no op above it: what a GPU would launch)."""
    from torch.autograd import DeviceType
    out = []
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type == DeviceType.CUDA:
                out.append((e.name, e.time_range.elapsed_us()))
            continue
        if e.device_type != DeviceType.CPU or not _OP_NAME.match(e.name):
            continue
        p = e.cpu_parent
        while p is not None and not _OP_NAME.match(p.name):
            p = p.cpu_parent
        if p is None:
            out.append((e.name, e.time_range.elapsed_us()))
    return out


SYNC_WARNING = "synchroniz"  # in torch's warning "called a synchronizing CUDA operation"


def count_syncs(fn, iters: int, set_mode=None) -> tuple:
    """(syncs per call, [(file:line, count)] most frequent first) over ``iters`` calls of ``fn``
    with CUDA's sync debug mode at "warn" (``set_mode``: ``torch.cuda.set_sync_debug_mode``)."""
    import collections
    import warnings

    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    where = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            for _ in range(iters):
                fn()
        finally:
            set_mode("default")
    for w in caught:
        if SYNC_WARNING in str(w.message):
            where[f"{pathlib.Path(w.filename).name}:{w.lineno}"] += 1
    return sum(where.values()) / iters, where.most_common(8)


def profile_rows(fns: dict, device, iters: int, top: int = 12) -> list:
    """Host, wall and device-kernel cost of one call of each function in ``fns`` (name -> callable)
    over ``iters`` calls, and the kernels whose summed time grows most from the first entry to the
    second."""
    import collections
    from torch.profiler import ProfilerActivity, profile

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows, by_name = [], {}
    for name, fn in fns.items():
        fn()
        sync()
        host, wall = [], []
        for _ in range(iters):  # without the profiler (its own overhead inflates host time)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            sync()
            host.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
        with profile(activities=acts) as prof:
            for _ in range(iters):
                fn()
            sync()
        ev = _kernel_events(prof, device)
        agg = collections.Counter()
        for k, us in ev:
            agg[k[:80]] += us / iters
        by_name[name] = agg
        row = {"what": f"profile: {name}", "host_ms": 1e3 * statistics.median(host),
               "wall_ms": 1e3 * statistics.median(wall), "kernels_per_call": len(ev) / iters,
               "kernel_ms_per_call": sum(us for _, us in ev) / iters / 1e3,
               "kernel_kind": "device kernels" if device.type == "cuda" else "top-level ops (CPU time)",
               "iters": iters}
        if device.type == "cuda":
            row["syncs_per_call"], row["sync_sites"] = count_syncs(fn, iters)
        rows.append(row)
    names = list(fns)
    if len(names) >= 2:
        a, b = by_name[names[0]], by_name[names[1]]
        grow = sorted(((b[k] - a.get(k, 0.0), k) for k in set(a) | set(b)), reverse=True)[:top]
        rows.append({"what": f"profile: largest growth {names[0]} -> {names[1]} (us per call)",
                     "kernels": [{"name": k, "delta_us": d, names[0] + "_us": a.get(k, 0.0), names[1] + "_us": b.get(k, 0.0)}
                                 for d, k in grow]})
    return rows


def append_rows(out_dir, stem: str, device, rows: list) -> pathlib.Path:
    """Add ``rows`` to ``<out_dir>/<stem>-<cpu|gpu>-<date>.json`` (a list of rows, created if new)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    path = out / f"{stem}-{tag}-{datetime.date.today().isoformat()}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + rows, indent=1))
    return path


def energy_forces(model, batch, training=False):
    out = model(dict(batch), training=training, compute_force=True)
    return out["energy"], out["forces"]


def _print_profile(r: dict) -> None:
    if "kernels" in r:
        print(r["what"])
        for k in r["kernels"]:
            print(f"  {k['delta_us']:+9.1f}  {k['name']}")
        return
    print(f"{r['what']:<20} host {r['host_ms']:8.2f} ms  wall {r['wall_ms']:8.2f} ms  "
          f"{r['kernels_per_call']:7.0f} {r['kernel_kind']} per call, {r['kernel_ms_per_call']:8.2f} ms", flush=True)
    if "syncs_per_call" in r:
        print(f"{'':<20} {r['syncs_per_call']:g} host-device syncs per call"
              + "".join(f"; {n}x {site}" for site, n in r["sync_sites"]), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mace-off23-medium")
    ap.add_argument("--molecule", default=None,
                    help="frames: an rMD17 molecule (its first --frames training frames, from --data-dir) or a "
                         "built-in geometry (ethanol, toluene); default: aspirin when the rMD17 splits are found, "
                         "else toluene")
    ap.add_argument("--data-dir", default=None, help="rMD17 splits (default: $MMEA_RMD17_DIR or ../shared/data/rmd17)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="inference,train-step")
    ap.add_argument("--out", default=None, help="directory for the JSON row file")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="time every model under torch.compile (default backend: inductor), forces with create_graph")
    ap.add_argument("--split-slices", action="store_true",
                    help="rewrite the base model's e3nn graphs first (mk.split_tp_slices, as load_model does)")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="also profile K energy+force evaluations of each model (host, wall, device kernels)")
    args = ap.parse_args(argv)
    if args.molecule is None:
        args.molecule = default_molecule(args.data_dir)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base, mmea, elora, batch = build(args, device, dtype)
    rows = []
    from mmea_kernels import MMEALinear

    like = torch.empty(0, device=device, dtype=dtype)
    adapters = [m for m in mmea.modules() if isinstance(m, MMEALinear)]
    from mmea_kernels.nn.mmea import fused_linear_mode
    auto = fused_linear_mode() == "auto" and not args.compile  # each layer chooses at its first calls
    kernels = [] if auto else [m.fused_kernel(like.new_empty((0, m.in_layout.dim))) for m in adapters]
    fused = f"{sum(k is not None for k in kernels)}/{len(adapters)} MMEALinear fused ({sorted(set(kernels) - {None})})"
    where = machine_label(device)
    size = f"{args.preset} {args.frames}x {args.molecule} {args.dtype}"
    if args.split_slices:
        size += " split-slices"
    training = False  # inference forces without create_graph (eager)
    if args.compile:
        size += f" compiled ({args.compile})"
        training = True  # mace-torch compiles MACE with create_graph forces (its calculator's training=True)
        batch["positions"].requires_grad_(True)
        need = {"mmea": mmea}  # only the models that will run (each takes minutes to compile)
        if "inference" in args.modes or args.profile > 0:
            need["frozen"] = base
        if "train-step" in args.modes or args.profile > 0:
            need["elora"] = elora
        c = compile_checked(need, batch, args.compile, rtol=1e-4 if dtype == torch.float32 else 1e-9)
        base, mmea, elora = (c.get(k, m) for k, m in (("frozen", base), ("mmea", mmea), ("elora", elora)))
    if "inference" in args.modes:
        def infer(m):
            def f():
                e, fo = energy_forces(m, batch, training)
                return e
            return f
        res = paired(infer(base), infer(mmea), args.rounds, device)
        rows.append({"what": "energy+forces: MMEA-adapted / frozen", **res})
    if "train-step" in args.modes:
        def step(m):
            params = [p for p in m.parameters() if p.requires_grad]

            def f():
                for p in params:
                    p.grad = None
                e, fo = energy_forces(m, batch, training=True)
                n = batch["ptr"][1:] - batch["ptr"][:-1]
                loss = ((e / n) ** 2).mean() + 100.0 * (fo ** 2).mean()
                loss.backward()
            return f
        res = paired(step(elora), step(mmea), args.rounds, device)
        rows.append({"what": "force-training step: MMEA / ELoRA (same rank)", **res})
    if args.profile > 0:
        def ef(m):
            return lambda: energy_forces(m, batch, training)
        rows += profile_rows({"frozen": ef(base), "mmea": ef(mmea), "elora": ef(elora)}, device, args.profile)
    choices = []
    if auto:  # MMEA_FUSED_LINEAR=auto: what each layer chose at the sizes it saw, and its two timings
        from mmea_kernels.nn.path_choice import auto_choices
        choices = auto_choices(mmea)
        fused = (f"auto: {sum(c['path'] == 'fused' for c in choices)}/{len(choices)} choices fused (one per layer "
                 f"and row-count bucket), {len(adapters)} MMEALinear")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    prov = provenance()
    for r in rows:
        r.update({"size": size, "device": where, "torch": torch.__version__, "date": stamp, "rank": args.rank, **prov,
                  "mmea_fused": fused, **({"mmea_auto_choices": choices} if choices else {})})
        if r["what"].startswith("profile"):
            _print_profile(r)
            continue
        print(f"{r['what']:<48} {size}  {where}: ratio {r['ratio_median']:.3f} "
              f"(IQR {r['ratio_q1']:.3f}..{r['ratio_q3']:.3f}, {r['rounds']} rounds; "
              f"{r['a_ms']:.2f} -> {r['b_ms']:.2f} ms; {fused})", flush=True)
    if args.out:
        append_rows(args.out, "model-overhead", device, rows)


if __name__ == "__main__":
    main()
