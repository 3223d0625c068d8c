"""Paired per-layer timing of ``MMEALinear`` on CPU with the fused C++ linear + gate kernels, against
the frozen ``o3.Linear`` and against the unfused adapter (the base linear, then the C++ gate ops), on
the CPU grid's layers (``providers.CPU_LAYERS``, as in bench/test_bench_cpu.py).

    python bench/linear_speed.py                      # N = 2000, 8000; 1 and 2 threads; fwd, fwd+bwd; float32
    python bench/linear_speed.py --n 64 --rounds 2 --threads 1 --out -      # smoke run (tests)
    python bench/linear_speed.py --compiled           # each side under torch.compile (inductor)

Every round times both sides back to back (the order alternates between rounds), in one process;
each number is the median over rounds of the per-round ratio, with its interquartile range:
``MMEA/base`` (the adapter's cost over the frozen layer: 1.10 is +10 %) and ``fused/unfused``
(below 1: the fused kernels are faster). fwd+bwd takes the input gradient only (frozen base and
adapter, as in test_bench_cpu.py). Before timing, the fused output is checked against the
unfused one. Single timings on a shared machine drift by tens of percent: read the ratios.
``--compiled`` times every side under ``torch.compile`` (inductor, static shapes): the fused side
is then the fused linear's custom op with the gate net as compiled torch ops, the unfused side the
compiled ``o3.Linear`` with the compiled gate. Each JSON row also keeps every round's times
(``a_round_ms``, ``b_round_ms``) and ratio, the CPU model and the git commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # runs from a checkout, installed or not
sys.path.insert(0, str(HERE))

from gate_speed import _quantile, machine, paired  # noqa: E402
from provenance import provenance  # noqa: E402
from providers import CPU_LAYERS, Variant, make_run  # noqa: E402


def _row(what, ta, tb, ratios):
    """ta, tb: the times of the two sides; ratios: per round, time(b) / time(a)."""
    return {"what": what, "ratio_median": statistics.median(ratios), "ratio_q1": _quantile(ratios, 0.25),
            "ratio_q3": _quantile(ratios, 0.75), "a_ms": 1e3 * statistics.median(ta),
            "b_ms": 1e3 * statistics.median(tb), "rounds": len(ratios), "a_round_ms": [1e3 * t for t in ta],
            "b_round_ms": [1e3 * t for t in tb], "ratios": ratios}


def bench_layer(layer, n, dtype, mode, rounds, compiled=False):
    """Two paired rows for one configuration: MMEA (fused) / base and fused / unfused."""
    from e3nn import o3

    irreps_in, irreps_out = CPU_LAYERS[layer]
    torch.manual_seed(0)
    lin = o3.Linear(irreps_in, irreps_out).to(dtype)
    fused, unfused, base = (Variant(lin, p).to(dtype) for p in ("cpp", "cpp-unfused", "base"))
    unfused.load_state_dict(fused.state_dict())
    for v in (fused, unfused, base):
        v.requires_grad_(False)
    x = torch.randn(n, lin.irreps_in.dim, dtype=dtype, requires_grad=(mode != "fwd"))
    dy = torch.randn(n, lin.irreps_out.dim, dtype=dtype)
    assert fused.adapter._fused(x, (), {}) is not None, "the fused cpp kernels do not run for this layer"
    with torch.no_grad():
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(fused(x), unfused(x), rtol=tol, atol=tol)
    sides = {"fused": fused, "unfused": unfused, "base": base}
    if compiled:  # a fresh dynamo state per configuration: its recompile limit counts per code object
        torch._dynamo.reset()
        sides = {k: torch.compile(v, dynamic=False) for k, v in sides.items()}
        with torch.no_grad():
            torch.testing.assert_close(sides["fused"](x), unfused(x), rtol=tol, atol=tol)
    run = {k: make_run(v, x, dy, mode) for k, v in sides.items()}
    rows = []
    for what, a, b in (("MMEA/base", "base", "fused"), ("fused/unfused", "unfused", "fused")):
        t_b, t_a, ratios = paired(run[b], run[a], rounds, torch.device("cpu"))  # ratios: time(b) / time(a)
        rows.append(_row(what, t_a, t_b, ratios))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2000,8000", help="rows, comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--layers", default=",".join(CPU_LAYERS), help="names of providers.CPU_LAYERS, comma-separated")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--compiled", action="store_true", help="time every side under torch.compile (inductor)")
    ap.add_argument("--note", default="", help="a line added to the header (e.g. 'machine shared with other jobs')")
    ap.add_argument("--out", default=None, help="output folder ('-': stdout only); default bench/results")
    args = ap.parse_args(argv)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    unknown = [name for name in layers if name not in CPU_LAYERS]
    if unknown:
        ap.error(f"unknown layers {unknown}; expected names of {list(CPU_LAYERS)}")
    sizes = [int(s) for s in args.n.split(",")]
    dtype = getattr(torch, args.dtype)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# MMEALinear (fused C++ linear + gate) per layer{', torch.compile' if args.compiled else ''}, "
             f"{now:%Y-%m-%d %H:%M} UTC",
             f"machine: {machine(torch.device('cpu'))}; torch {torch.__version__}; {args.dtype}; "
             f"{args.rounds} paired rounds; N = {sizes}; threads {args.threads}"]
    if args.note:
        lines.append(f"note: {args.note}")
    lines += ["", "| layer | N | threads | mode | ratio | median of paired ratios | IQR | ms (a -> b) |",
              "|---|---|---|---|---|---|---|---|"]
    for line in lines:
        print(line, flush=True)
    rows = []
    prov = provenance()
    prev = torch.get_num_threads()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for layer in layers:
                for n in sizes:
                    for mode in args.modes.split(","):
                        for r in bench_layer(layer, n, dtype, mode, args.rounds, args.compiled):
                            r.update(layer=layer, n=n, threads=threads, mode=mode, dtype=args.dtype, compiled=args.compiled,
                                     date=now.isoformat(timespec="seconds"), torch=torch.__version__, **prov)
                            rows.append(r)
                            lines.append(f"| {layer} | {n} | {threads} | {mode} | {r['what']} | "
                                         f"{r['ratio_median']:.3f} | {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | "
                                         f"{r['a_ms']:.2f} -> {r['b_ms']:.2f} |")
                            print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(prev)
    if args.out != "-":
        out = pathlib.Path(args.out) if args.out else HERE / "results"
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"linear-speed-cpu-{'compiled-' if args.compiled else ''}{now:%Y-%m-%dT%H%M}"
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        print(f"written to {stem}.md / .json")
    return rows


if __name__ == "__main__":
    main()
