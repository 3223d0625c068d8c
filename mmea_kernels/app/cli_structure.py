"""The commands that run a checkpoint's model on one structure, ``md`` and ``relax``: their options
and what they run (:mod:`.md`, :mod:`.relax`), for :mod:`.cli`."""
from __future__ import annotations

import json
import sys

from .cli_common import common_options, data_checks, seed_type


def _structure_command(sub, name: str, help: str, description: str, structure_help: str = ""):
    """A command that runs a checkpoint's model on one structure (md, relax)."""
    p = sub.add_parser(name, help=help, parents=[common_options(True, True, True, dtype=True)], description=description)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--structure", required=not structure_help,
                   help="a structure file ASE reads (path[@index], first frame used)" + structure_help)
    p.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    return p


def add_relax_parser(sub):
    from .relax import OPTIMIZERS, RelaxSettings

    d = RelaxSettings()
    rx = _structure_command(sub, "relax", "geometry optimisation with a checkpoint (positions; --cell: the cell too)",
                            "Relax a structure with a fine-tuning checkpoint until every force is below --fmax; "
                            "prints a JSON summary; exit code 3 when it did not converge within --steps (the "
                            "structure is written all the same).")
    rx.add_argument("--out", required=True, help="the relaxed structure (.xyz/.extxyz, with energy, forces, stress)")
    rx.add_argument("--fmax", type=float, default=d.fmax, help="eV/Å: converged when every force is below this")
    rx.add_argument("--steps", type=int, default=d.steps, help="the most optimiser steps")
    rx.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                    help="ASE's optimiser; auto (default): bfgs up to 300 atoms, lbfgs above (bfgs's dense Hessian "
                         "costs O(N^3) time a step)")
    rx.add_argument("--cell", action="store_true", help="relax the cell too (3-D periodic structures; ASE's "
                                                        "FrechetCellFilter on the model's stress)")
    rx.add_argument("--pressure", type=float, default=None, help="with --cell: target pressure, bar (default 0; "
                    "refused without --cell)")
    rx.add_argument("--stress-tol", type=float, default=None, help="with --cell: converged also needs every stress "
                    "component within this of the target, bar (default: ASE's cell criterion, fmax·N/V)")
    rx.add_argument("--trajectory", default=None, help="every step (.traj)")
    rx.add_argument("--log", default=None, help="the optimiser's log ('-': standard output)")
    rx.add_argument("--overwrite", action="store_true", help="replace existing --out / --trajectory / --log files")


def add_md_parser(sub):
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
    md.add_argument("--seed", type=seed_type, default=None, help=f"default {d.seed}")
    md.add_argument("--trajectory", default=None, help="write frames here (.traj, .xyz or .extxyz) every --interval "
                                                       "steps and the last: positions, momenta, energy, forces, "
                                                       "stress if periodic, step and time")
    md.add_argument("--log", default=None, help="ASE's MD log every --interval steps ('-': standard output)")
    md.add_argument("--interval", type=int, default=d.interval, help="steps between trajectory frames / log lines")
    md.add_argument("--save-state", default=None, help="an MD state file (.npz) every --save-state-every steps and "
                                                       "at the end: --resume goes on from it exactly")
    md.add_argument("--save-state-every", type=int, default=None, help=f"with --save-state (default "
                                                                       f"{d.save_state_every})")
    md.add_argument("--resume", default=None, help="go on from a --save-state file (its structure, momenta, step, "
                                                   "thermostat and barostat state; the same dynamics)")
    md.add_argument("--overwrite", action="store_true", help="replace existing --trajectory / --log / --save-state "
                                                             "files (the --resume file may be the --save-state "
                                                             "without it)")


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
    check_structure(atoms, calc, args.structure, data_checks(args))
    return atoms, calc


def _inputs(args) -> dict:
    """The files the command reads (no output may be one of them)."""
    from .files import checkpoint_inputs

    return {**checkpoint_inputs(args.checkpoint, args.model), "--structure": args.structure,
            **({"--resume": args.resume} if getattr(args, "resume", None) is not None else {})}


def _calculator(args):
    from .calculator import MMEACalculator

    return MMEACalculator(checkpoint=args.checkpoint, model=args.model, trust_pickle=args.trust_pickle,
                          device=args.device, dtype=args.dtype, checks=data_checks(args))


def run_relax_command(args) -> int:
    from .relax import RelaxSettings, relax

    settings = RelaxSettings(fmax=args.fmax, steps=args.steps, optimizer=args.optimizer, cell=args.cell,
                             pressure_bar=args.pressure, stress_tol_bar=args.stress_tol, out=args.out, trajectory=args.trajectory, log=args.log,
                             overwrite=args.overwrite)
    settings.check(_inputs(args))  # before the model is loaded
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


def run_md_command(args) -> None:
    from .md import OPTION_FIELDS, MDSettings, resumed_settings, run_md

    given = {field: getattr(args, opt) for opt, field in OPTION_FIELDS.items() if getattr(args, opt) is not None}
    every = {} if args.save_state_every is None else {"save_state_every": args.save_state_every}
    settings = MDSettings(steps=args.steps, trajectory=args.trajectory, log=args.log, interval=args.interval,
                          overwrite=args.overwrite, save_state=args.save_state, **every, **given)
    if (args.structure is None) == (args.resume is None):
        raise ValueError("md needs one of --structure (a new run) and --resume (go on from a --save-state file)")
    state = None
    if args.resume is not None:
        from .md_state import load_state

        state = load_state(args.resume)
        settings = resumed_settings(state, settings, given)
    # before the model is loaded: bad settings cost nothing
    settings.check(args.resume, _inputs(args), given={*given, *every})
    if state is None:
        atoms, calc = _structure_and_calculator(args)
    else:
        from .calculator import check_structure

        atoms, calc = None, _calculator(args)
        check_structure(state.atoms, calc, args.resume, data_checks(args))
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
