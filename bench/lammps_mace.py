"""The shipped MACE (``builtin:mace-xtb-small``) fine-tuned with MMEA, exported by ``mmea-kernels
export --format lammps`` (mace-torch's LAMMPS_MACE, float64), in a real LAMMPS with this package's
``pair_style mace`` plugin (``mmea-kernels lammps-build``):

- parity: ``pair_style mace no_domain_decomposition`` (one process) and ``pair_style mace`` (domain
  decomposition) at 1, 2 and 4 MPI processes against the checkpoint's eager model in float64 (energy,
  forces, virial), on a periodic box of rMD17 ethanol molecules; the ``--kernels cpp`` file too
  (without decomposition, and with it on 2 processes) where the kernels are built;
- an NVE run in LAMMPS: the drift of the total energy;
- cost per MD step in LAMMPS: the fine-tuned file against the base model's file (the same export
  without adapters), ``no_domain_decomposition``, one process, 1 and 2 torch threads, LAMMPS' loop
  time after 3 untimed force evaluations (``--warmup``), alternating rounds, the median of the
  per-round ratios with its interquartile range; for the portable file (``--kernels aten``) and,
  where the LAMMPS directory has the kernels (``mmea_ops.so``), the fused one (``--kernels cpp``);
- what a step costs in each mode and process count (one short run each; with domain decomposition
  the owned atoms and the ghosts within num_interactions hops of them are the graph's nodes).

    python bench/lammps_mace.py        # fine-tunes on 20 rMD17 ethanol frames first (reused from --work later)

Writes ``bench/results/lammps-mace.{json,md}`` (``--out``)."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from lammps_sevenn import (_cli, _loop_time, _rel, _timing, checkpoint, eager, nve_drift,  # noqa: E402
                           parser, setup_and_box, write_result)

REPO = pathlib.Path(__file__).resolve().parents[1]
SERIAL, DECOMPOSED = "mace no_domain_decomposition", "mace"


def _files(args, work: pathlib.Path):
    """The checkpoint (fine-tuned here unless given), its LAMMPS files (portable; fused, where the
    LAMMPS directory has the kernels, else None) and the base model's."""
    from mmea_kernels.integrations.export import export_lammps
    from mmea_kernels.train import load_finetuned
    from mmea_kernels.train.foundation import load_model

    ckpt = checkpoint(args, work, "--epochs", "20")
    _cli("export", "--checkpoint", ckpt, "--out", str(work / "mace-mmea.pt"), "--overwrite")
    fused = None
    if (pathlib.Path(args.lammps_dir) / "mmea_ops.so").is_file():
        fused = str(work / "mace-mmea-cpp.pt")
        _cli("export", "--checkpoint", ckpt, "--out", fused, "--overwrite", "--kernels", "cpp")
    _, meta = load_finetuned(ckpt, dtype="float64")
    export_lammps(load_model(meta.get("model") or "builtin:mace-xtb-small"), work / "mace-base.pt")
    return ckpt, str(work / "mace-mmea.pt"), fused, str(work / "mace-base.pt")


def main(argv=None) -> int:
    p = parser(__doc__, "MACE", "lammps-mace")
    p.add_argument("--mode-steps", type=int, default=5, help="MD steps of the one run per mode and process count")
    p.add_argument("--warmup", type=int, default=3, help="untimed force evaluations before each timed run")
    args = p.parse_args(argv)

    from mmea_kernels.integrations.lammps import run_lammps
    from mmea_kernels.train import load_finetuned

    setup, work, box, source = setup_and_box(args)
    ckpt, tuned, fused, base = _files(args, work)
    net, meta = load_finetuned(ckpt, dtype="float64")
    want = eager(net, box)
    coeff = f"* * {tuned} {{species}}"
    got = run_lammps(box, SERIAL, coeff, setup, work / "parity-serial")
    parity = [dict(pair=SERIAL, processes=1, kernels="aten", **_rel(got, want))]
    for n in (1, 2, 4):
        got = run_lammps(box, DECOMPOSED, coeff, setup, work / f"parity-{n}", nprocs=n)
        parity.append(dict(pair=DECOMPOSED, processes=n, kernels="aten", **_rel(got, want)))
    for pair, n in ((SERIAL, 1), (DECOMPOSED, 2)) if fused else ():
        got = run_lammps(box, pair, f"* * {fused} {{species}}", setup, work / f"parity-cpp-{n}", nprocs=n)
        parity.append(dict(pair=pair, processes=n, kernels="cpp", **_rel(got, want)))
    for p in parity:  # one short run each, after the warm-up: what a step costs (one torch thread per process)
        run_lammps(box, p["pair"], f"* * {fused if p['kernels'] == 'cpp' else tuned} {{species}}", setup,
                   work / "step", nprocs=p["processes"], steps=args.mode_steps,
                   extra=[f"run {args.warmup} post no"] if args.warmup else ())
        p["ms_per_step"] = 1e3 * _loop_time(work / "step") / args.mode_steps

    hot, drift = nve_drift(box, SERIAL, coeff, setup, work, args.nve_steps)
    timing = [dict(kernels=k, **_timing(hot, setup, work, f, base, args.steps, args.rounds, int(t), style=SERIAL,
                                        names=("mmea", "base"), warmup=args.warmup))
              for k, f in (("aten", tuned), ("cpp", fused)) if f for t in args.threads.split(",")]
    result = write_result(args, checkpoint=ckpt, base_model=meta.get("model"), atoms=len(box), molecules=source,
                          parity=parity, nve=drift, timing=timing)
    pathlib.Path(args.out).with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r) -> str:
    lines = [f"# MACE ({r['base_model']}) + MMEA in LAMMPS, pair_style mace plugin ({r['date']})", "",
             f"Machine: {r['machine']}; {r['lammps']}; torch {r['torch']}. Box: {r['atoms']} atoms "
             f"(18 ethanol molecules ({r['molecules']}), randomly rotated, 6 Å apart, 18 × 18 × 12 Å).", "",
             "## Parity against the eager model (float64 file and model), max relative difference", "",
             "| file (--kernels) | pair style | processes | energy | forces | virial | ms per MD step (one run after "
             "the warm-up) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p.get('kernels', 'aten')} | {p['pair']} | {p['processes']} | {p['energy']:.1e} | {p['forces']:.1e} | "
              f"{p['virial']:.1e} | {p['ms_per_step']:.0f} |" for p in r["parity"]]
    n = r["nve"]
    lines += ["", f"## NVE in LAMMPS: {n['steps']} steps of {n['dt_fs']} fs from {n['start_K']} K, {n['atoms']} atoms "
              "(no_domain_decomposition)", "", f"Total energy: max − min {n['etotal_max_minus_min_meV']:.2f} meV, "
              f"end − start {n['etotal_end_minus_start_meV']:.2f} meV.", "",
              "## Cost per MD step, pair_style mace no_domain_decomposition, one process", "",
              "Fine-tuned (MMEA) file / the base model's file (the same export without adapters), rounds "
              "alternating (the order flips every round), LAMMPS' loop time (start-up and "
              f"{r['timing'][0]['warmup_evaluations']} untimed force evaluations before each run excluded). "
              "`aten`: the portable file (`export`'s default); `cpp`: `--kernels cpp` (each adapter one op of this "
              "package's C++ kernels, loaded by the plugin from mmea_ops.so). Each against the base file in its "
              "own alternating rounds.", "",
              "| file (--kernels) | torch threads | rounds × steps | ratio (median of paired) | IQR | ms per step "
              "(MMEA / base) |", "|---|---|---|---|---|---|"]
    lines += [f"| {t.get('kernels', 'aten')} | {t['threads']} | {t['rounds']} × {t['steps_per_run']} | "
              f"**{t['ratio_median']:.3f}×** | "
              f"{t['ratio_iqr'][0]:.3f}–{t['ratio_iqr'][1]:.3f} | {t['ms_per_step_median']['mmea']:.1f} / "
              f"{t['ms_per_step_median']['base']:.1f} |" for t in r["timing"]]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    raise SystemExit(main())
