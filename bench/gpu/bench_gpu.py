"""GPU benchmark for a lent device machine: the adapted linear in each implementation against the
base o3.Linear (same run), the gate kernel alone against the card's measured copy bandwidth, and
cuEquivariance's cuet.Linear + gate where it is installed. Writes
bench/results/<card>-<date>-gpu.json and prints a table.

    python bench/gpu/bench_gpu.py                 # on a CUDA machine
    TRITON_INTERPRET=1 python bench/gpu/bench_gpu.py --small   # correctness check on CPU
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/providers.py

from e3nn import o3  # noqa: E402

from mmea_kernels import IrrepsLayout, gate_mul, seg_dot  # noqa: E402
from mmea_kernels.ops import backend_status  # noqa: E402
from mmea_kernels.ops.gated_linear import gated_linear  # noqa: E402
from mmea_kernels.ops.linear_spec import LinearSpec  # noqa: E402

LAYERS = {
    "128x0e+128x1o": ("128x0e+128x1o", "128x0e+128x1o"),
    "128x0e+128x1o+128x2e+128x3o": ("128x0e+128x1o+128x2e+128x3o",) * 2,
    "mace-interaction-1": ("128x0e+128x0e+128x1o+128x1o+128x1o+128x2e+128x2e+128x2e+128x3o+128x3o",
                           "128x0e+128x1o+128x2e+128x3o"),
}
SMALL_LAYERS = {"small": ("4x0e+4x0e+3x1o+2x2e", "4x0e+3x1o+2x2e+1x3o")}


def timer(device):
    if device.type == "cuda":
        def run(fn, reps):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return times
    else:
        def run(fn, reps):
            fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
            return times
    return run


def copy_bandwidth(device, dtype, numel, run):
    a = torch.empty(numel, dtype=dtype, device=device)
    b = torch.empty_like(a)
    ms = statistics.median(run(lambda: b.copy_(a), 20))
    return 2 * a.element_size() * numel / (ms * 1e-3) / 1e9


def gate_bench(layer, n, dtype, device, run, reps, rows, card):
    irreps_out = LAYERS.get(layer, SMALL_LAYERS.get(layer))[1]
    L = IrrepsLayout.of(irreps_out, "mul_ir")
    x = torch.randn(n, L.dim, dtype=dtype, device=device)
    g = torch.rand(n, L.num_gates, dtype=dtype, device=device) + 0.5
    nbytes = (2 * L.dim + L.num_gates) * n * x.element_size()
    for be in ("torch", "triton", "cpp"):
        ok, why = backend_status(be, device)
        if not ok:
            continue
        ref = gate_mul(x, g, L, backend="torch")
        torch.testing.assert_close(gate_mul(x, g, L, backend=be), ref)
        for op, fn in (("gate_mul", lambda: gate_mul(x, g, L, backend=be)),
                       ("seg_dot", lambda: seg_dot(x, x, L, backend=be))):
            ms = statistics.median(run(fn, reps))
            byt = nbytes if op == "gate_mul" else (2 * L.dim + L.num_gates) * n * x.element_size()
            rows.append({"op": op, "provider": be, "mode": "fwd", "size": f"{layer} N={n} {str(dtype)[6:]}",
                         "median_ms": ms, "GB/s": byt / (ms * 1e-3) / 1e9, "device": card})


def linear_bench(layer, n, dtype, device, run, reps, rows, card):
    irreps_in, irreps_out = LAYERS.get(layer, SMALL_LAYERS.get(layer))
    torch.manual_seed(0)
    lin = o3.Linear(irreps_in, irreps_out).to(device=device, dtype=dtype)
    lin.requires_grad_(False)
    Lout = IrrepsLayout.of(irreps_out, "mul_ir")
    spec = LinearSpec.from_e3nn(lin)
    scal = torch.tensor(Lout.scalar_columns, device=device)
    x = torch.randn(n, lin.irreps_in.dim, dtype=dtype, device=device, requires_grad=True)
    g = torch.rand(n, Lout.num_gates, dtype=dtype, device=device) + 0.5
    add = torch.randn(n, Lout.num_scalars, dtype=dtype, device=device)
    gy = torch.randn(n, Lout.dim, dtype=dtype, device=device)

    def unfused(be):
        return lambda: torch.index_add(gate_mul(lin(x), g, Lout, backend=be), 1, scal, add)

    variants = {"base": lambda: lin(x)}
    for be in ("torch", "triton", "cpp"):
        if backend_status(be, device)[0]:
            variants[f"linear+{be}-gate"] = unfused(be)
    if backend_status("triton", device)[0]:
        variants["fused"] = lambda: gated_linear(x, lin.weight, None, g, add, spec, backend="triton")
    try:  # cuEquivariance's linear (ir_mul native) + our gate in ir_mul
        import cuequivariance as cue
        import cuequivariance_torch as cuet
        clin = cuet.Linear(cue.Irreps("O3", irreps_in), cue.Irreps("O3", irreps_out), layout=cue.ir_mul,
                           device=device, dtype=dtype)
        Lir = IrrepsLayout.of(irreps_out, "ir_mul")
        variants["cuet"] = lambda: clin(x)
        variants["cuet+triton-gate"] = lambda: gate_mul(clin(x), g, Lir, backend="triton" if device.type == "cuda" else "torch")
        from mmea_kernels.nn import MMEALinear  # the whole adapter on cuet.Linear, ir_mul native
        clin_ad = MMEALinear(clin, rank=16).to(device=device, dtype=dtype)
        variants["cuet+MMEALinear"] = lambda: clin_ad(x)
    except Exception as exc:  # not installed, or no CUDA ops
        print(f"cuEquivariance skipped: {type(exc).__name__}: {exc}")

    ref = variants["linear+torch-gate"]().detach()
    for name, fn in variants.items():
        if name in ("fused",) or name.startswith("linear+"):
            torch.testing.assert_close(fn().detach(), ref, rtol=1e-4, atol=1e-4)
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn()
            else:
                def step(fn=fn):
                    x.grad = None
                    fn().backward(gy)
            rows.append({"op": "adapted_linear", "provider": name, "mode": mode,
                         "size": f"{layer} N={n} {str(dtype)[6:]}", "median_ms": statistics.median(run(step, reps)),
                         "device": card})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU interpreter check)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu-interpreter"
    run = timer(device)
    layers = SMALL_LAYERS if args.small else LAYERS
    sizes = [7, 33] if args.small else [2000, 8000, 32000]
    dtypes = [torch.float32] if args.small else [torch.float32, torch.bfloat16, torch.float64]
    reps = 2 if args.small else 20
    rows = []
    bw = copy_bandwidth(device, torch.float32, 1 << (10 if args.small else 28), run)
    print(f"device: {card}; measured copy bandwidth {bw:.0f} GB/s")
    for layer in layers:
        for n in sizes:
            for dtype in dtypes:
                gate_bench(layer, n, dtype, device, run, reps, rows, card)
                linear_bench(layer, n, dtype, device, run, reps, rows, card)
    base = {(r["size"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "base"}
    for r in rows:
        b = base.get((r["size"], r["mode"]))
        extra = f"{r['GB/s']:8.0f} GB/s ({100 * r['GB/s'] / bw:.0f} % of copy)" if "GB/s" in r else (
            f"{100 * (r['median_ms'] / b - 1):+7.1f} % vs base" if b and r["provider"] != "base" else "")
        print(f"{r['op']:<15}{r['size']:<40}{r['mode']:<8}{r['provider']:<20}{r['median_ms']:9.3f} ms  {extra}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{card.replace(' ', '-')}-{datetime.date.today().isoformat()}-gpu.json"
    (out / name).write_text(json.dumps({"copy_GBps": bw, "rows": rows}, indent=1))
    print(f"written {out / name}")


if __name__ == "__main__":
    main()
