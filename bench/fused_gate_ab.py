"""A/B timing of the fused gate's C++ kernels (csrc/fused_gate.cpp) against an earlier git revision
of them, in one process: the revision's file is built as a second extension whose op namespace is
renamed (``mmea_ab_ext``), and both are called on the same inputs.

    python bench/fused_gate_ab.py --rev 8fc8b50                 # SevenNet-0's gate, N = 4000, 1 thread
    python bench/fused_gate_ab.py --rev 8fc8b50 --ops dbwd --rounds 5 --out -

Each op (fwd, bwd, dbwd), layout and dtype: the outputs are compared first (max difference over
the largest value), then every round times both builds back to back (order alternating), and the
row gives the median of the paired ratios ``old / new`` (> 1: the current build is faster) with
its interquartile range. The revision's csrc/ headers are used for its build (``git show``).
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from gate_speed import paired, summary  # noqa: E402
from provenance import cpu_model, provenance  # noqa: E402

OPS = ("fwd", "bwd", "dbwd")


def build_revision(rev: str, where: pathlib.Path) -> None:
    """Writes ``rev``'s csrc/ into ``where`` (fused_gate.cpp's namespace renamed) and loads it."""
    from torch.utils.cpp_extension import load

    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:csrc"], cwd=HERE.parent, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in names:
        if name.endswith((".h", ".cpp")):
            text = subprocess.run(["git", "show", f"{rev}:csrc/{name}"], cwd=HERE.parent, capture_output=True,
                                  text=True, check=True).stdout
            (where / name).write_text(text.replace("mmea_kernels_ext", "mmea_ab_ext"))
    load(name="mmea_ab_fused_gate", sources=[str(where / "fused_gate.cpp")], extra_cflags=["-O3", "-fopenmp"],
         extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=str(where), verbose=False)


def _calls(op, t, x, dy, v):
    segs, csts, g = t.cpp_segs, t.cpp_csts, t.spec.num_gates
    args = {"fwd": (x, segs, csts, dy.shape[1], g), "bwd": (x, dy, segs, csts, g), "dbwd": (x, dy, v, segs, csts, g)}[op]
    name = f"fused_gate_{op}"
    return (lambda: getattr(torch.ops.mmea_ab_ext, name).default(*args),
            lambda: getattr(torch.ops.mmea_kernels_ext, name).default(*args))


def _max_rel(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return max(((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-300)).item()
               for p, q in zip(a, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the git revision to compare against (e.g. 8fc8b50)")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--out", default=None, help="output file ('-': stdout only); default bench/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import mmea_kernels._C  # noqa: F401 - registers the current kernels
    from mmea_kernels.nn import FusedGate
    from mmea_kernels.ops.fused_gate.function import spec_tables

    with tempfile.TemporaryDirectory() as tmp:
        build_revision(args.rev, pathlib.Path(tmp))
    when = datetime.datetime.now(datetime.timezone.utc)
    prov = provenance()
    lines = [f"# fused gate C++ kernels: {args.rev} (old) vs {prov['git_commit']} (new), {when:%Y-%m-%d %H:%M} UTC",
             f"machine: {cpu_model()}; torch {torch.__version__}; threads {args.threads}; N = {args.n}; "
             f"SevenNet-0's gate shape (128x0e, 96 silu gates, 64x1e+32x2e)", "",
             "| case | old ms | new ms | speed-up (median of paired ratios) | IQR | rounds | max rel. diff |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for layout in ("mul_ir", "ir_mul"):
        fg = FusedGate("128x0e", [F.silu], "64x0e+32x0e", [F.silu, F.silu], "64x1e+32x2e", layout=layout)
        t = spec_tables(fg._key, "cpu")
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(args.n, fg.irreps_in.dim, dtype=dtype, generator=gen)
            dy = torch.randn(args.n, fg.irreps_out.dim, dtype=dtype, generator=gen)
            v = torch.randn(x.shape, dtype=dtype, generator=gen)
            for op in args.ops.split(","):
                old, new = _calls(op, t, x, dy, v)
                diff = _max_rel(new(), old())
                ta, tb, ratios = paired(old, new, args.rounds, torch.device("cpu"))
                row = summary(f"{op} {layout} {str(dtype).split('.')[-1]}", ta, tb, ratios)
                lines.append(f"{row} {diff:.1e} |")
                print(lines[-1], flush=True)
    if args.out != "-":
        out = pathlib.Path(args.out) if args.out else HERE / "results" / f"fused-gate-ab-{when:%Y-%m-%dT%H%M}.txt"
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
