"""Paired-ratio timing of FusedGate against e3nn's Gate, and of SevenNet-0 with and without
``replace_gates``.

    python bench/gate_speed.py                       # CPU, 1 thread, writes bench/results/gate-cpu-<date>T<time>.txt
    python bench/gate_speed.py --device cuda         # on a GPU machine (Triton kernels)
    python bench/gate_speed.py --rounds 5 --n 500 --frames 1 --out -     # quick check (tests)

Gate: SevenNet-0's shape (``128x0e`` scalars, ``64x0e+32x0e`` gates, gated ``64x1e+32x2e``, silu
for both, read from the SevenNet-0 checkpoint when sevenn is installed) at N rows, forward (no
grad), forward+backward (input gradient) and a force step (forward, input gradient with
``create_graph``, the gradient of a scalar of it: the second derivatives force training takes). Model: SevenNet-0 energy + forces (inference,
``training=False``) and a force-training step (E and F with ``create_graph``, the gradient of a
loss on both with respect to every parameter) on ``--frames`` aspirin frames of rMD17 (``../shared/data/rmd17`` or
``MMEA_RMD17_DIR``; toy molecules otherwise), plain against ``replace_gates``.

Every round times both providers back to back (order alternating between rounds) in one process;
the reported number is the median over rounds of the per-round ratio ``e3nn / fused`` (> 1: fused
is faster), with its interquartile range, next to the median times. Before timing, the outputs
are checked to agree (gate: float64 1e-12, its second derivatives 1e-10; model: float64 energies/forces 1e-10 relative). Next to
the .txt a .json keeps every row's per-round times and ratios, the CPU model and the git commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from provenance import cpu_model, provenance  # noqa: E402


def _quantile(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired(fn_a, fn_b, rounds, device, warmup=3):
    """(times_a, times_b, ratios a/b): both timed in every round, order alternating."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for r in range(rounds):
        pair = ((fn_a, ta), (fn_b, tb)) if r % 2 == 0 else ((fn_b, tb), (fn_a, ta))
        for fn, acc in pair:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    return ta, tb, [a / b for a, b in zip(ta, tb)]


def raw_row(label, ta, tb, ratios):
    """A JSON row: the summary's numbers and every round's times (ms) and ratio."""
    return {"case": label, "ratio_median": statistics.median(ratios), "ratio_q1": _quantile(ratios, 0.25),
            "ratio_q3": _quantile(ratios, 0.75), "a_ms": 1e3 * statistics.median(ta),
            "b_ms": 1e3 * statistics.median(tb), "rounds": len(ratios), "a_round_ms": [1e3 * t for t in ta],
            "b_round_ms": [1e3 * t for t in tb], "ratios": ratios}


def summary(label, ta, tb, ratios):
    return (f"| {label} | {1e3 * statistics.median(ta):.2f} | {1e3 * statistics.median(tb):.2f} | "
            f"{statistics.median(ratios):.2f}x | {_quantile(ratios, 0.25):.2f}-{_quantile(ratios, 0.75):.2f} | "
            f"{len(ratios)} |")


def sevennet_gate_args():
    """SevenNet-0's gate (the one of interaction blocks 0-3), from its checkpoint when possible."""
    try:
        from e3nn.nn import Gate

        from mmea_kernels.integrations.sevenn import load_sevennet

        m = load_sevennet("7net-0", fused_gate=False)
        g = next(mod for mod in m.modules() if isinstance(mod, Gate) and mod.irreps_gates.dim)
        acts_s = [a.f if a is not None else None for a in g.act_scalars.acts]
        acts_g = [a.f if a is not None else None for a in g.act_gates.acts]
        return (g.act_scalars.irreps_in, acts_s, g.act_gates.irreps_in, acts_g, g.irreps_gated), "SevenNet-0 checkpoint"
    except Exception as exc:  # noqa: BLE001 - sevenn is optional
        return ("128x0e", [F.silu], "64x0e+32x0e", [F.silu, F.silu], "64x1e+32x2e"), f"built-in ({exc})"


def _second(m, x, dy=None, w=None):
    """What force training asks of a gate: forward, the input gradient with ``create_graph`` (the
    forces' step), then the gradient of a scalar of that (the loss's step): second derivatives."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    y = m(x)
    dy = torch.randn(y.shape, dtype=y.dtype, device=y.device, generator=gen) if dy is None else dy
    w = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen) if w is None else w
    (g,) = torch.autograd.grad(y, x, dy, create_graph=True)
    return torch.autograd.grad((g * w).sum(), x)[0]


def bench_gate(args, device, lines):
    from e3nn.nn import Gate

    from mmea_kernels.nn.fused_gate import FusedGate

    gate_args, source = sevennet_gate_args()
    lines.append(f"Gate: {gate_args[0]} scalars, gates {gate_args[2]}, gated {gate_args[4]} (from {source}); "
                 f"N = {args.n}")
    lines.append("")
    lines.append("| case | e3nn Gate ms | FusedGate ms | speed-up (median of paired ratios) | IQR | rounds |")
    lines.append("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        ref = Gate(*gate_args).to(device=device, dtype=dtype)
        fused = FusedGate.from_module(ref).to(device)
        x64 = torch.randn(64, ref.irreps_in.dim, dtype=torch.float64, device=device)
        ref64 = Gate(*gate_args).to(device=device, dtype=torch.float64)
        torch.testing.assert_close(FusedGate.from_module(ref64)(x64), ref64(x64), rtol=1e-12, atol=1e-12)
        x64.requires_grad_(True)
        torch.testing.assert_close(_second(FusedGate.from_module(ref64), x64), _second(ref64, x64),
                                   rtol=1e-10, atol=1e-10)  # what the force-step case times
        x = torch.randn(args.n, ref.irreps_in.dim, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(args.n, ref.irreps_out.dim, dtype=dtype, device=device)

        def fwd(m):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        def fwd_bwd(m):
            def run():
                torch.autograd.grad(m(x), x, dy)
            return run

        def force_step(m):
            def run():
                _second(m, x, dy, w)
            return run

        w = torch.randn_like(x)
        name = str(dtype).split(".")[-1]
        for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd), ("force step", force_step)):
            ta, tb, ratios = paired(make(ref), make(fused), args.rounds, device)
            lines.append(summary(f"gate {mode} {name}", ta, tb, ratios))
            args.rows.append(raw_row(f"gate {mode} {name}", ta, tb, ratios))
            print(lines[-1], flush=True)


def _frames(n):
    from mmea_kernels.app.data import toy_molecules

    root = pathlib.Path(os.environ.get("MMEA_RMD17_DIR", HERE.parent.parent / "shared" / "data" / "rmd17"))
    path = root / "aspirin" / "test.xyz"
    if path.is_file():
        import ase.io

        return ase.io.read(str(path), f":{n}"), f"rMD17 aspirin test.xyz[:{n}]"
    return toy_molecules("ethanol", n), f"toy ethanol x{n} (rMD17 not found at {root})"


def _loss_grads(m, batch):
    """What fine-tuning on forces does per batch: E and F (``create_graph``), a loss on both, its
    gradient with respect to every parameter."""
    out = m(dict(batch), training=True, compute_force=True)
    loss = out["energy"].square().mean() + out["forces"].square().mean()
    return torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])


def bench_model(args, device, lines):
    from mmea_kernels import replace_gates
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.integrations.sevenn import load_sevennet

    frames, what = _frames(args.frames)
    lines.append("")
    lines.append(f"SevenNet-0 energy + forces (inference) and a force-training step on {what}, "
                 f"{sum(len(a) for a in frames)} atoms")
    # equality first, in float64
    plain64 = load_sevennet("7net-0", dtype=torch.float64, fused_gate=False).to(device)
    batch64 = {k: v.to(device) if torch.is_tensor(v) else v for k, v in
               atoms_to_batch(frames, plain64.atomic_numbers.tolist(), float(plain64.r_max),
                              dtype=torch.float64).items()}
    o0 = plain64(dict(batch64), training=False, compute_force=True)
    g0 = _loss_grads(plain64, batch64)
    rep = replace_gates(plain64)
    o1 = plain64(dict(batch64), training=False, compute_force=True)
    g1 = _loss_grads(plain64, batch64)
    rel_e = ((o1["energy"] - o0["energy"]).abs() / o0["energy"].abs()).max().item()
    rel_f = ((o1["forces"] - o0["forces"]).abs().max() / o0["forces"].abs().max()).item()
    rel_g = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() for a, b in zip(g1, g0))
    lines.append(f"float64 check after replace_gates ({len(rep)} gates): max relative energy difference {rel_e:.1e}, "
                 f"max force difference / max |force| {rel_f:.1e}, force-training step's parameter gradients "
                 f"{rel_g:.1e} (max difference / max |gradient|, worst parameter)")
    assert rel_e <= 1e-10 and rel_f <= 1e-10 and rel_g <= 1e-10, (rel_e, rel_f, rel_g)
    lines.append("")
    lines.append("| case | e3nn gates ms | fused gates ms | speed-up (median of paired ratios) | IQR | rounds |")
    lines.append("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        plain = load_sevennet("7net-0", dtype=dtype, fused_gate=False).to(device)
        fused = load_sevennet("7net-0", dtype=dtype, fused_gate=False).to(device)
        replace_gates(fused)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in
                 atoms_to_batch(frames, plain.atomic_numbers.tolist(), float(plain.r_max), dtype=dtype).items()}

        def run(m):
            return lambda: m(dict(batch), training=False, compute_force=True)

        def train_step(m):
            return lambda: _loss_grads(m, batch)

        name = str(dtype).split('.')[-1]
        for case, make in ((f"SevenNet-0 E+F {name}", run), (f"SevenNet-0 force-training step {name}", train_step)):
            ta, tb, ratios = paired(make(plain), make(fused), args.model_rounds or args.rounds, device)
            lines.append(summary(case, ta, tb, ratios))
            args.rows.append(raw_row(case, ta, tb, ratios))
            print(lines[-1], flush=True)


def machine(device):
    cpu = cpu_model()
    # the ISA torch's kernels use (this VM has been AVX2 one day and AVX-512 the next: ratios shift)
    what = f"{cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(0)} (host: {what})"
    return what


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=4000, help="gate rows (default 4000)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--model-rounds", type=int, default=0, help="rounds of the model timing (default: --rounds)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32,float64")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--note", default="", help="a line added to the header (e.g. 'machine shared with other jobs')")
    p.add_argument("--out", default=None, help="output file ('-': stdout only); default bench/results/gate-<dev>-<date>T<time>.txt")
    args = p.parse_args(argv)
    args.dtypes = [getattr(torch, d.strip()) for d in args.dtype.split(",")]
    args.rows = []  # per-round times and ratios, for the .json
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from mmea_kernels.ops.fused_gate import fused_gate_backend_status

    backend = "triton" if device.type == "cuda" else ("cpp" if fused_gate_backend_status("cpp", device)[0] else "torch")
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# FusedGate vs e3nn Gate, {now:%Y-%m-%d %H:%M} UTC",
             f"machine: {machine(device)}; device {device}; torch {torch.__version__}; threads "
             f"{torch.get_num_threads()}; FusedGate backend {backend}"]
    if args.note:
        lines.append(f"note: {args.note}")
    lines.append("")
    for line in lines:
        print(line, flush=True)
    bench_gate(args, device, lines)
    if not args.no_model:
        bench_model(args, device, lines)
    text = "\n".join(lines) + "\n"
    if args.out != "-":
        out = pathlib.Path(args.out) if args.out else HERE / "results" / f"gate-{device.type}-{now:%Y-%m-%dT%H%M}.txt"  # never an earlier run's file
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        meta = dict(date=now.isoformat(timespec="seconds"), machine=machine(device), device=str(device),
                    torch=torch.__version__, threads=torch.get_num_threads(), backend=backend, n=args.n,
                    note=args.note, **provenance())
        out.with_suffix(".json").write_text(json.dumps(dict(meta, rows=args.rows), indent=1))
        print(f"written to {out} and {out.with_suffix('.json')}")
    return text


if __name__ == "__main__":
    main()
