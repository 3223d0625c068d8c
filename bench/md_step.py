"""One MD step's model evaluation through the ASE calculator (energy, forces; stress too for a
periodic box), with the calculator's cached input (``BatchCache``: a new neighbour list per frame,
the rest reused) against mace's full ``atoms_to_batch`` per frame, the way the calculator built its
input before. Both calculators wrap the same model and see the same frames, timed in alternating
rounds in one process; the result is the median of the per-round ratios (cached / full) with its
interquartile range; the JSON also keeps every round's times (ms per round of ``--steps`` frames)
and ratio, the CPU model and the git commit. An odd ``--rounds`` is raised by one (each side first
equally often).

    python bench/md_step.py                       # shipped model, 1 aspirin (21 atoms), CPU, 1 thread
    python bench/md_step.py --copies 8 --threads 2 --out bench/results
    python bench/md_step.py --device cuda         # the model on the GPU: the host's share is larger there
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from model_overhead import paired  # noqa: E402
from provenance import provenance  # noqa: E402


def _frames(copies: int, data_dir: str, n: int):
    """``n`` frames of ``copies`` aspirin molecules (rMD17, or the shipped ethanol set when the rMD17
    directory is missing) 10 Å apart, each a small random displacement of the one before (an MD run)."""
    from ase import Atoms
    from ase.io import read

    path = pathlib.Path(data_dir) / "aspirin" / "test.xyz"
    if not path.is_file():
        path = pathlib.Path(__file__).resolve().parents[1] / "mmea_kernels" / "assets" / "ethanol_pbe" / "test.xyz"
    mol = read(str(path), 0)
    atoms = Atoms()
    for i in range(copies):
        m = mol.copy()
        m.positions += np.array([i % 4, (i // 4) % 4, i // 16]) * 10.0
        atoms += m
    rng = np.random.default_rng(0)
    out = [atoms]
    for _ in range(n - 1):
        a = out[-1].copy()
        a.positions += rng.normal(0, 0.005, a.positions.shape)
        out.append(a)
    return out, path.parent.name


def main(argv=None) -> dict:
    import os

    from mmea_kernels.app.calculator import MMEACalculator
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.train.foundation import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="frames per round")
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:N)")
    ap.add_argument("--data-dir", default=os.environ.get("MMEA_RMD17_DIR", "../shared/data/rmd17"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = load_model().to(device)
    cached = MMEACalculator(module=net)
    full = MMEACalculator(module=net)

    class _Full:  # the calculator's input before BatchCache: mace's whole path every frame
        def __call__(self, atoms):
            return atoms_to_batch([atoms], full.z, full.r_max, energy_key="__none__", forces_key="__none__",
                                  device=full.device, dtype=full.dtype)

    full._batches = _Full()
    frames, molecule = _frames(args.copies, args.data_dir, args.steps)

    def run(calc):
        def go():
            for a in frames:
                calc.calculate(a, ["energy", "forces"])
        return go

    for a in frames[:2]:  # the same numbers on both paths (exactly on the CPU; CUDA's atomic sums may reorder)
        cached.calculate(a, ["energy", "forces"])
        e1, f1 = cached.results["energy"], cached.results["forces"]
        full.calculate(a, ["energy", "forces"])
        # a molecule's edges come in k-d tree order on the cached path: equal to round-off, not to the bit
        tol = dict(rtol=1e-9, atol=1e-9) if cached.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        assert np.allclose(e1, full.results["energy"], **tol) and np.allclose(f1, full.results["forces"], **tol)
    res = paired(run(full), run(cached), args.rounds, device)
    res.update(what="MD step (E+F through the calculator): cached input / full atoms_to_batch",
               size=f"shipped mace-xtb-small, {args.copies}x {molecule} ({len(frames[0])} atoms), {args.steps} "
                    "frames per round", device=(torch.cuda.get_device_name(device) if device.type == "cuda" else
                                             f"cpu-{platform.machine()}") + f" {args.threads} thread(s)",
               torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"), **provenance())
    res["a_ms"], res["b_ms"] = res["a_ms"] / args.steps, res["b_ms"] / args.steps  # per step
    print(f"{res['what']}  {res['size']}  {res['device']}: ratio {res['ratio_median']:.3f} (IQR "
          f"{res['ratio_q1']:.3f}..{res['ratio_q3']:.3f}, {res['rounds']} rounds; {res['a_ms']:.2f} -> "
          f"{res['b_ms']:.2f} ms per step)")
    if args.out:
        path = pathlib.Path(args.out) / f"md-step-{device.type}-{datetime.date.today()}-{args.copies}x.json"
        path.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
