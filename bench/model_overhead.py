"""Whole-model cost of MMEA: an adapted MACE against the same frozen MACE (energy + forces, what
every MD step pays), and one force-training step of MMEA against ELoRA at the same rank.

Both models are timed in the same process in alternating rounds (the order flips every round);
the result is the median of the per-round ratios with its interquartile range, because single
timings on a shared machine drift by tens of percent.

    python bench/model_overhead.py                                   # CPU, 1 thread, 4 aspirin frames
    python bench/model_overhead.py --device cuda --frames 64 --rounds 50 --out $OUT
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not


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
    """Median and IQR of time(fb)/time(fa) over alternating rounds, plus each side's median."""
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
            "b_ms": 1e3 * statistics.median(rb), "rounds": rounds}


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
        base = build_mace(args.preset).to(device=device, dtype=dtype)
        cfg = PRESETS[args.preset]
        batch = atoms_to_batch(frames, cfg.atomic_numbers, cfg.r_max, device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    for p in base.parameters():
        p.requires_grad_(False)
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


def energy_forces(model, batch, training=False):
    out = model(dict(batch), training=training, compute_force=True)
    return out["energy"], out["forces"]


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
    kernels = [m.fused_kernel(like.new_empty((0, m.in_layout.dim))) for m in adapters]
    fused = f"{sum(k is not None for k in kernels)}/{len(adapters)} MMEALinear fused ({sorted(set(kernels) - {None})})"
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu-{platform.machine()} {torch.get_num_threads()} thread(s)")
    size = f"{args.preset} {args.frames}x {args.molecule} {args.dtype}"
    if "inference" in args.modes:
        def infer(m):
            def f():
                e, fo = energy_forces(m, batch)
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
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    for r in rows:
        r.update({"size": size, "device": where, "torch": torch.__version__, "date": stamp, "rank": args.rank,
                  "mmea_fused": fused})
        print(f"{r['what']:<48} {size}  {where}: ratio {r['ratio_median']:.3f} "
              f"(IQR {r['ratio_q1']:.3f}..{r['ratio_q3']:.3f}, {r['rounds']} rounds; "
              f"{r['a_ms']:.2f} -> {r['b_ms']:.2f} ms; {fused})", flush=True)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "gpu" if device.type == "cuda" else "cpu"
        path = out / f"model-overhead-{tag}-{datetime.date.today().isoformat()}.json"
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    main()
