"""One adapted layer as a scripted (TorchScript) file runs it: the portable form (``--kernels
aten``) and the fused op (``--kernels cpp``) against the bare scripted e3nn ``o3.Linear``, forward
plus the input gradient (what forces need), float64, one thread, TorchScript's graph optimisation off
(as the LAMMPS plugins run files), rows = atoms of the LAMMPS benches' box; in each round the three
are timed back to back, the order rotated each round so each one takes each position equally often
(``--rounds`` is raised to a multiple of 3); median of the per-round ratios with the IQR.

    python bench/scripted_layers.py [--rows 162] [--rounds 31]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time

import torch

LAYERS = ("32x0e+32x1o+32x2e", "32x0e+32x1o", "32x0e")


class Holder(torch.nn.Module):
    """A model holding one layer (what scripting compiles around it)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


def _modules(irreps: str) -> dict:
    from e3nn import o3
    from e3nn.util import jit

    from mmea_kernels.nn import MMEALinear
    from mmea_kernels.nn.scriptable import script_kernels

    lin = o3.Linear(irreps, irreps)
    ad = MMEALinear(lin)
    torch.nn.init.normal_(ad.mmea_up.weight, std=0.1)
    torch.nn.init.normal_(ad.mmea_up.bias, std=0.1)
    for p in ad.parameters():
        p.requires_grad_(False)
    mods = {"base": jit.compile(Holder(copy.deepcopy(lin))), "aten": jit.compile(Holder(copy.deepcopy(ad)))}
    with script_kernels("cpp", ad):
        mods["cpp"] = jit.compile(Holder(copy.deepcopy(ad)))
    return mods


def _time(m, x, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        torch.autograd.grad((y * y).sum(), xx)
    return (time.perf_counter() - t) / reps * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=162)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--reps", type=int, default=50, help="calls per timed block")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the ratios' quartiles)")
    args.rounds += -args.rounds % 3  # each of the three sides in each position equally often
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch._C._set_graph_executor_optimize(False)
    print(f"# {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}, {platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread, float64, {args.rows} rows, "
          f"{args.rounds} rounds x {args.reps} calls")
    print("| layer | base µs | aten/base (IQR) | cpp/base (IQR) |\n|---|---|---|---|")
    for irreps in LAYERS:
        mods = _modules(irreps)
        x = torch.randn(args.rows, sum(int(m) * (2 * int(ir[0]) + 1) for m, ir in
                                       (t.split("x") for t in irreps.split("+"))))
        for m in mods.values():
            _time(m, x, 20)
        ts = {k: [] for k in mods}
        names = list(mods)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:  # rotated: base, aten, cpp each in every position
                ts[k].append(_time(mods[k], x, args.reps))
        cells = []
        for k in ("aten", "cpp"):
            ratios = [a / b for a, b in zip(ts[k], ts["base"])]
            q = statistics.quantiles(ratios, n=4)
            cells.append(f"{statistics.median(ratios):.2f} ({q[0]:.2f}–{q[2]:.2f})")
        print(f"| {irreps} | {statistics.median(ts['base']):.0f} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
