"""The fine-tuning workflow behind ``mmea-kernels finetune``: :func:`finetune`.

It adapts a base model (:mod:`.foundation`) to labelled extended-XYZ data with one of the methods
of :mod:`.methods`. Training: loss ``w_E·MSE(E/N_atoms) + w_F·MSE(F)`` (:mod:`.loss`; defaults 1
and 1000, the MMEA paper's; ``+ w_S·MSE(σ)`` on the stresses of periodic frames with
``w_stress > 0``), Adam with amsgrad, ReduceLROnPlateau on the validation loss, an exponential
moving average (EMA, :mod:`.ema`) of the trainable weights (validation, checkpoints
and the final model use the EMA weights), gradient-norm clipping, early stopping on the
validation loss, all seeded. Every epoch writes ``state.pt`` (atomically); ``resume=True``
continues from it and gives the same result as an uninterrupted run (the batch order of an epoch
depends only on the seed and the epoch); ``resume="auto"`` too, but leaves a finished run as it is.
Under ``torchrun`` the global batch is shared out between the processes (DDP), with the same result.

The steps: :func:`setup` (data, base model, E0s, method, optimizer), :func:`train` (the epochs),
:func:`train_one_epoch`, :func:`take_step`, :func:`evaluate` (validation with the EMA weights),
:func:`finish` (the best EMA weights, metrics on every split, the files).

Outputs in ``out_dir``: ``checkpoint.pt`` (best validation epoch; trainable tensors only, plus the
re-fitted E0s: an adapter-only checkpoint for adapter methods, every weight for full/scratch;
:mod:`.checkpoint`), ``metrics.json``, ``learning_curve.png``, ``state.pt`` (to resume); each file is
written atomically, ``metrics.json`` last (a run is finished when it is there and of ``state.pt``'s
epoch). While a run works in ``out_dir`` it holds ``out_dir/.mmea-kernels.lock`` (:func:`lock_run_dir`): a second
run there is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import stat
import sys
import time
import types

import torch

from .checkpoint import (DISK_ERRNOS, WriteFailed, atomic_write_text, check_semantics, check_writable, load_state,
                         prepare, save_state, write_checkpoint)
from . import lockfile
from .lockfile import DirectoryInUse
from .config import DTYPES, FinetuneConfig
from .data import frame_key, make_batches, overlap_note, read_splits, split_graphs, validation_split, weights_note
from .device import resolve_device
from .distributed import check_inputs, check_start, dist_setup, peer_failure
from .e0s import refit_after_training, refit_e0s, split_span_note
from .ema import ema_weights, make_ema, weights_in
from .foundation import fingerprint, load_model, model_info
from .guard import check_finite, check_finite_tensors, created_dirs, interrupt_message, remove_created_dirs
from .loss import errors, format_table, label_scale_note, loss, split_errors
from .methods import trainable_state
from .plot import plot_history
from .provenance import data_hashes, overlap_counts, provenance

__all__ = ["finetune", "setup", "train", "train_one_epoch", "take_step", "evaluate", "finish", "dist_setup",
           "DirectoryInUse", "lock_run_dir", "unlock_run_dir"]


def finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Run the workflow described in the module docstring; returns the metrics dict. Bad data,
    files or settings raise before training; an output directory this call created is removed
    again when it fails before writing anything into it; :class:`DirectoryInUse` when another process
    runs in it."""
    cfg.check()
    device = resolve_device(cfg.device)  # a device that is not there is refused before anything is written
    rank, world = dist_setup(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (--batch-size, the global batch) must be a multiple of the "
                         f"{world} processes of this torchrun run")
    if rank != 0:
        log = lambda *_: None  # noqa: E731
    out = pathlib.Path(cfg.out_dir)
    made = created_dirs(out) if rank == 0 else []
    try:
        lock = None
        if rank == 0:  # the process that writes the files holds the directory for the whole run
            check_writable(out)
            lock = lock_run_dir(out)
            try:
                refuse_linked_results(out)
            except BaseException:
                unlock_run_dir(lock)  # a refused run lets go of the directory (a retry in one process)
                raise
            if lock is not None:
                _remove_orphans(out, log)
        try:
            return _run(cfg, log, rank, world, out, device)
        finally:
            unlock_run_dir(lock)
    except BaseException:
        remove_created_dirs(made)
        raise


LOCK_NAME = ".mmea-kernels.lock"  # in --out while a run works there (a name no user file has)


def lock_run_dir(out: pathlib.Path):
    """Lock the output directory ``out`` for this process (:func:`.lockfile.hold` on ``out/``
    :data:`LOCK_NAME`, released when the process ends, however it ends); :class:`DirectoryInUse` when
    another process holds it. Returns the lock for :func:`unlock_run_dir`, or None where there is no
    ``fcntl`` or the file system has no locks."""
    path = pathlib.Path(out) / LOCK_NAME
    try:
        fd = lockfile.hold(path)
    except lockfile.LockHeld as exc:
        raise DirectoryInUse(f"output directory {out} (--out) is in use by another process{exc.holder}: two runs "
                             "in one directory would overwrite each other's files; wait for that run to end, "
                             "or choose another --out") from None
    return None if fd is None else (fd, path)


RUN_FILES = ("state.pt", "checkpoint.pt", "metrics.json", "learning_curve.png")  # what a run writes in --out


def refuse_linked_results(out: pathlib.Path) -> None:
    """A run writes its own files in ``out`` (:data:`RUN_FILES`); one that is a symbolic link there (a run
    directory copied from someone else, say) is refused by name rather than written through: the file
    it names was never given to the run. (A symlinked ``--out`` directory itself is fine.) One that is
    there but not a regular file (a FIFO, a device, a directory) is refused by name too: reading a FIFO
    named metrics.json (``--resume auto``) would wait for ever."""
    for name in RUN_FILES:
        path = pathlib.Path(out) / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode):
            raise FileExistsError(f"{path} is a symbolic link (to {os.readlink(path)}): a run writes its own files in "
                                  f"--out and never through a link to a file it was not given; remove the link, or "
                                  "choose another output directory")
        if not stat.S_ISREG(mode):
            raise FileExistsError(f"{path} is not a regular file ({_file_kind(mode)}): a run reads and writes its own "
                                  "files in --out as plain files; remove it, or choose another output directory")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "a special file")


def _remove_orphans(out: pathlib.Path, log) -> None:
    """Remove the temporary files of a run in ``out`` that was killed (SIGKILL, a crash) while writing:
    with the directory's lock held, no other run writes them."""
    orphans = [p for name in ("state.pt", "checkpoint.pt", "metrics.json") for p in out.glob(f".{name}.*.tmp")]
    for p in orphans:
        p.unlink(missing_ok=True)
    if orphans:
        log(f"removed {len(orphans)} temporary file(s) of a run that was killed while writing: "
            f"{', '.join(p.name for p in orphans)}")


def unlock_run_dir(lock) -> None:
    """Release a :func:`lock_run_dir` lock, removing its file (while still holding it)."""
    if lock is not None:
        lockfile.release(*lock)


def setup(cfg: FinetuneConfig, world: int, device: torch.device = torch.device("cpu"), log=None):
    """Frames, base model, checked graphs, E0s and method: everything before the first step. The
    model is built, its E0s fitted and the method applied (seeded initial weights) on the CPU, so
    the run starts from the same weights on every device; then it moves to ``device``."""
    dtype = DTYPES[cfg.dtype]
    frames = read_splits(cfg)
    data_sha = data_hashes(cfg)  # once a run: its record and every saved state take theirs from it
    model = load_model(cfg.model, cfg.model_config, dtype=dtype, trust_pickle=cfg.trust_pickle,
                       fused_gate=cfg.fused_gate, head=cfg.head)
    z, r_max = model_info(model)
    graphs = split_graphs(cfg, frames, z, r_max, dtype)
    fp = fingerprint(model)
    e0s = refit_e0s(model, frames["train"], z, cfg.e0s, cfg.energy_key, from_scratch=cfg.method == "scratch", log=log)
    scale = "" if cfg.method == "scratch" or str(cfg.model).startswith("preset:") else \
        label_scale_note(model, graphs["train"], stress=cfg.w_stress > 0)  # a trained base only: a random one says nothing of the units
    groups = prepare(model, e0s, cfg.method, cfg.rank, cfg.seed, "the fitted E0s", cfg.adapter_options)  # as load_finetuned does
    model.to(device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    net = model
    if world > 1:  # gradients averaged over processes by DDP; each process holds batch_size / world frames
        check_inputs(cfg, data_sha, {split: len(g) for split, g in graphs.items()}, world)  # one job on every process
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=False)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, amsgrad=True)
    ema, ema_source = make_ema(params, cfg.ema_decay)
    overlaps = overlap_counts(frames, frame_key)
    return types.SimpleNamespace(
        model=model, net=net, params=params, device=device, opt=opt, z=z, e0s=e0s, fp=fp, groups=groups, graphs=graphs,
        probe_atoms=frames["train"][0], train_frames=frames["train"], scale=scale, n_train=sum(p.numel() for p in params.values()),
        overlap="\n".join(n for n in (overlap_note(cfg, frames, overlaps), weights_note(frames),
                                      split_span_note(cfg, frames, z)) if n),
        record=provenance(cfg, validation_split(cfg, frames), overlaps, data_sha), data_sha=data_sha,
        sched=torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience),
        ema=ema, ema_source=ema_source, history=[], best={"loss": math.inf, "epoch": 0, "state": None},
        start_epoch=1, elapsed=0.0, saved_epoch=0)


def results_without_state(out) -> list:
    """The names of a finished run's results in ``out`` (checkpoint.pt, metrics.json) when its
    state.pt, which a run continues from, is not there; [] otherwise."""
    out = pathlib.Path(out)
    if (out / "state.pt").exists():
        return []
    return [name for name in ("checkpoint.pt", "metrics.json") if os.path.lexists(out / name)]


def _run(cfg: FinetuneConfig, log, rank: int, world: int, out: pathlib.Path, device: torch.device) -> dict:
    state_path = out / "state.pt"
    if state_path.exists() and not cfg.resume:
        raise FileExistsError(f"{state_path} exists (an earlier run): pass resume=True (--resume) to continue it, "
                              "or choose another output directory")
    done = results_without_state(out)
    if done:  # a new run would replace them
        raise FileExistsError(f"{out} holds {' and '.join(done)} of an earlier run but no state.pt to continue it "
                              "from; a new run would replace them: choose another output directory")
    r = setup(cfg, world, device, log)
    resumed, held = bool(cfg.resume) and state_path.exists(), []  # held: load_state's lines, said unless finished
    if resumed:
        load_state(cfg, r, state_path, held.append)
    check_start(r, world, state_path)  # torchrun: every process starts from one state
    if resumed:
        metrics = _finished_metrics(out, r, held.append) if cfg.resume == "auto" and _nothing_left(cfg, r) else None
        if metrics is not None:
            why = ("early stopping ended it" if _early_stop(cfg, r, r.start_epoch) else
                   f"all {cfg.epochs} epochs done; a larger --epochs trains on")
            log(f"{out} holds a finished run (epoch {r.start_epoch - 1}, best {r.best['epoch']}; metrics.json): "
                f"{why}; left as it is (resume='auto', --resume auto)")
            return metrics
        for line in held:
            log(line)
        if not _nothing_left(cfg, r):
            check_semantics(cfg, r, state_path)  # an older version's objective: not trained on
            if rank == 0:  # training on: a finished run's metrics.json is no longer this directory's result
                _drop_stale_metrics(out, r, cfg, log)
    r.valid_b = make_batches(r.graphs["valid"], cfg.eval_batch_size, device=device)
    log(f"{cfg.method} on {device}: {r.n_train:,} trainable parameters ({'; '.join(f'{k} {v:,}' for k, v in r.groups.items())}); "
        f"{len(r.graphs['train'])} train / {len(r.graphs['valid'])} valid / {len(r.graphs['test'])} test frames; "
        f"E0s {_e0_text(r.z, r.e0s, r.train_frames)}")
    for note in (r.overlap, r.scale):
        if note:
            log(note)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=r.start_epoch - 1, desc=cfg.method, file=sys.stderr, dynamic_ncols=True)
    return _train_and_finish(cfg, r, log, rank, world, out, bar)


def _train_and_finish(cfg: FinetuneConfig, r, log, rank: int, world: int, out: pathlib.Path, bar) -> dict:
    """:func:`train`, then :func:`finish`; an interrupt (Ctrl-C, SIGTERM in the CLI) or a full disk
    says which epoch ``state.pt`` holds."""
    state_path, phase = out / "state.pt", "train"
    r.epoch = r.start_epoch
    try:
        try:
            stopped, epoch, ran = train(cfg, r, rank, world, out, bar)
        finally:
            if bar is not None:
                bar.close()
        if stopped == "stop_after":
            log(f"stopped after {ran} epochs as asked (stop_after); resume with --resume")
            return {"stopped": stopped, "epoch": epoch}
        phase = "finish"
        return finish(cfg, r, rank, world, out, stopped, epoch, log)
    except KeyboardInterrupt:
        if phase == "finish" and r.saved_epoch > 0 and state_path.exists():
            log(f"interrupted in the final evaluation, after the last epoch; {state_path} holds epoch {r.saved_epoch}: "
                "run again with --resume to finish (final evaluation and files)")
        else:
            log(interrupt_message(r.epoch, state_path, r.saved_epoch))
        raise
    except RuntimeError as exc:  # torchrun: a collective failed because another process stopped
        failed = peer_failure(exc, world, state_path, r.saved_epoch)
        if failed is None:
            raise
        raise failed from exc
    except OSError as exc:
        if not (isinstance(exc, WriteFailed) or exc.errno in DISK_ERRNOS):
            raise
        if r.saved_epoch > 0 and state_path.exists():
            kept = f"{state_path} holds epoch {r.saved_epoch}: free space, then run again with --resume " + (
                "to finish the run (final evaluation and files)" if phase == "finish" else "to continue from it")
        else:  # what this run wrote would block a new run in --out (results without a state): removed
            if rank == 0:
                for name in ("checkpoint.pt", "metrics.json"):
                    (out / name).unlink(missing_ok=True)
            kept = "no training state was saved (nothing of this run is left in --out): free space, then start the run again"
        err = WriteFailed(f"{exc}; {kept}")
        err.errno = exc.errno
        raise err from exc


def _finished_metrics(out: pathlib.Path, r, log):
    """The metrics.json of the finished run whose state ``r`` was loaded from; None (the run is finished
    again) when there is none, or it is unreadable (a write cut short) or of another epoch."""
    path = out / "metrics.json"
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
        ok = isinstance(metrics, dict) and (metrics.get("epochs_run"), metrics.get("best_epoch")) == \
            (r.start_epoch - 1, r.best["epoch"])
        why = "" if ok else (f"it is of epoch {metrics.get('epochs_run')}, state.pt of epoch {r.start_epoch - 1}"
                             if isinstance(metrics, dict) else "it holds no run's metrics")
    except (OSError, ValueError) as exc:
        ok, why = False, f"it is unreadable ({exc})"
    if ok:
        return metrics
    log(f"{path} is not the finished run's result ({why}): finishing the run again (final evaluation and files)")
    return None


def _drop_stale_metrics(out: pathlib.Path, r, cfg: FinetuneConfig, log) -> None:
    """Remove the metrics.json of a finished run that now trains on (a larger --epochs): killed before
    it finishes again, the directory would claim a result that is not its checkpoint's or state's."""
    path = out / "metrics.json"
    if path.exists():
        path.unlink()
        log(f"{path} of the run finished at epoch {r.start_epoch - 1} removed: training on to epoch {cfg.epochs} "
            "(written again when the run finishes)")


def _early_stop(cfg: FinetuneConfig, r, epoch: int) -> bool:
    """Whether early stopping ends the run before ``epoch`` (no validation improvement for ``patience`` epochs)."""
    return epoch - r.best["epoch"] > cfg.patience and r.best["epoch"] > 0


def _nothing_left(cfg: FinetuneConfig, r) -> bool:
    """Whether a run continued from its state would train no epoch: the last one done, or early stopping."""
    return r.start_epoch > cfg.epochs or _early_stop(cfg, r, r.start_epoch)


def _e0_text(z, e0s, frames) -> str:
    """The E0s of the elements in the training data (a foundation model knows ~90 elements)."""
    present = {int(n) for a in frames for n in a.numbers}
    shown = {zi: round(e, 4) for zi, e in zip(z, e0s) if zi in present}
    rest = len(z) - len(shown)
    return f"{shown}" + (f" (and {rest} element{'s' if rest > 1 else ''} not in the training data)" if rest else "")


def train(cfg: FinetuneConfig, r, rank: int, world: int, out: pathlib.Path, bar) -> tuple:
    """The epochs from ``r.start_epoch`` on, until ``cfg.epochs``, early stopping or ``stop_after``:
    (why it stopped, the last epoch run, epochs run in this call). Every epoch saves ``state.pt``,
    and ``checkpoint.pt`` when the validation loss improved."""
    state_path, ckpt_path = out / "state.pt", out / "checkpoint.pt"
    stopped, epoch, ran = "epochs", r.start_epoch - 1, 0
    for epoch in range(r.start_epoch, cfg.epochs + 1):
        if _early_stop(cfg, r, epoch):
            return f"early stopping (no validation improvement for {cfg.patience} epochs)", epoch - 1, ran
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            return "stop_after", epoch - 1, ran
        r.epoch = epoch
        t0 = time.perf_counter()
        train_loss = train_one_epoch(cfg, r, epoch, rank, world, state_path)
        val = evaluate(cfg, r, epoch, state_path)
        r.sched.step(val["loss"])
        r.elapsed += time.perf_counter() - t0
        r.history.append({"epoch": epoch, "train_loss": train_loss, "valid": val, "lr": r.opt.param_groups[0]["lr"],
                          "seconds": r.elapsed})
        ran += 1
        # every process checks (identical weights under DDP), so all of them stop together
        check_finite_tensors(list(r.params.items()) + list(ema_weights(r.ema, r.params).items()), "the weight", epoch,
                             state_path, r.saved_epoch)
        if r.best["epoch"] == epoch and rank == 0:
            write_checkpoint(ckpt_path, cfg, r)
        if rank == 0:
            save_state(cfg, r, epoch, state_path)
        r.saved_epoch = epoch
        if bar is not None:
            bar.update(1)
            stress = f"σ {val['stress_mae_meV_per_A3']:.2f} meV/Å³  " if "stress_mae_meV_per_A3" in val else ""
            bar.set_postfix_str(f"E {val['energy_mae_meV']:.1f} meV  F {val['forces_mae_meV_per_A']:.1f} meV/Å  "
                                f"{stress}best {r.best['epoch']}")
    return stopped, epoch, ran


def train_one_epoch(cfg: FinetuneConfig, r, epoch: int, rank: int, world: int, state_path) -> float:
    """One epoch of steps in the seeded order of the epoch; the mean training loss."""
    r.model.train()
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(r.graphs["train"]), generator=g).tolist()
    tot, nb = 0.0, 0
    for k, b in enumerate(make_batches(r.graphs["train"], cfg.batch_size, order, rank, world, r.device)):
        tot, nb = tot + take_step(cfg, r, b, epoch, k + 1, world, state_path) / world, nb + 1
    return tot / nb


def take_step(cfg: FinetuneConfig, r, batch: dict, epoch: int, k: int, world: int, state_path) -> float:
    """One optimizer step on batch ``k`` (and the EMA update); the global batch's loss. Stops on a
    non-finite loss or gradient norm before the step, so the weights of the last good step are
    never replaced by NaN."""
    value = loss(r.net, batch, cfg.w_energy, cfg.w_forces, *batch["_global"], world=world, w_stress=cfg.w_stress)
    r.opt.zero_grad(set_to_none=True)
    value.backward()
    v = value.detach().clone()
    if world > 1:  # the global batch's loss, for the log (and the same stop decision everywhere)
        torch.distributed.all_reduce(v)
    check_finite(float(v), "the training loss", epoch, k, state_path, r.saved_epoch)
    if cfg.clip_grad > 0:
        norm = torch.nn.utils.clip_grad_norm_(r.params.values(), cfg.clip_grad)
        check_finite(float(norm), "the gradient norm", epoch, k, state_path, r.saved_epoch)
    r.opt.step()
    r.ema.update_parameters(r.ema_source)
    return float(v)


def evaluate(cfg: FinetuneConfig, r, epoch: int, state_path) -> dict:
    """Validation errors with the EMA weights; keeps them as the best state when the loss improved."""
    r.model.eval()
    with weights_in(r.params, ema_weights(r.ema, r.params)):
        val = errors(r.model, r.valid_b, cfg.w_energy, cfg.w_forces, cfg.w_stress)
        check_finite(val["loss"], "the validation loss", epoch, None, state_path, r.saved_epoch)
        if val["loss"] < r.best["loss"]:
            r.best = {"loss": val["loss"], "epoch": epoch, "state": trainable_state(r.model)}
    return val


def finish(cfg: FinetuneConfig, r, rank: int, world: int, out: pathlib.Path, stopped: str, epoch: int, log) -> dict:
    """Final model (the best EMA weights), metrics on every split, checkpoint, metrics.json, plot."""
    with torch.no_grad():
        for n, p in r.params.items():
            p.copy_(r.best["state"][n])
    metrics = {"method": cfg.method, "model": cfg.model, "base_fingerprint": r.fp, "rank": cfg.rank,
               "trainable_parameters": r.n_train, "parameter_groups": r.groups, "epochs_run": epoch,
               "best_epoch": r.best["epoch"], "stopped": stopped, "train_seconds": r.elapsed, "e0s": r.e0s,
               "seed": cfg.seed, "dtype": cfg.dtype, "config": dataclasses.asdict(cfg), "history": r.history}
    metrics.update(split_errors(r.model, r.graphs, cfg.eval_batch_size, cfg.w_energy, cfg.w_forces, cfg.w_stress))
    if cfg.refit_e0s_after:
        refit_after_training(cfg, r, metrics, log)
    metrics["world_size"] = world
    metrics["provenance"] = r.record  # versions, threads, command, data files' SHA-256, the split, overlaps
    if rank == 0:
        write_checkpoint(out / "checkpoint.pt", cfg, r, metrics)
        plot_history(r.history, out / "learning_curve.png", f"{cfg.method} on {cfg.train} (base {cfg.model})")
        # last, whole or not at all: a metrics.json that --resume auto reads back marks the run finished
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    log(format_table(metrics))
    return metrics
