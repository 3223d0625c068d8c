"""The fine-tuning workflow behind ``mmea-kernels finetune`` / ``evaluate``.

:func:`finetune` adapts a base model (:mod:`.foundation`) to labelled extended-XYZ data with one of
the methods of :mod:`.methods`; :func:`load_finetuned` rebuilds the adapted model from a checkpoint
(checking that the base model is the one it was trained on); :func:`evaluate_checkpoint` reports
its errors on a data file.

Training: loss ``w_E·MSE(E/N_atoms) + w_F·MSE(F)`` (defaults 1 and 1000, the MMEA paper's), Adam
with amsgrad, ReduceLROnPlateau on the validation loss, an exponential moving average (EMA) of
the trainable weights (validation, checkpoints and the final model use the EMA weights),
gradient-norm clipping, early stopping on the validation loss, all seeded. Every epoch writes
``state.pt`` (atomically); ``resume=True`` continues from it and gives the same result as an
uninterrupted run (the batch order of an epoch depends only on the seed and the epoch).

Outputs in ``out_dir``: ``checkpoint.pt`` (best validation epoch; trainable tensors only, plus the
re-fitted E0s: an adapter-only checkpoint for adapter methods, every weight for full/scratch),
``metrics.json``, ``learning_curve.png``, ``state.pt`` (to resume).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .checks import DataChecks, checked_graphs
from .foundation import DEFAULT_MODEL, fingerprint, load_model, model_info
from .methods import METHODS, apply_method, trainable_state
from .safe_load import safe_load
from .selfcheck import make_probe, verify_probe
from .guard import (check_finite, check_finite_tensors, created_dirs, interrupt_message,
                          remove_created_dirs)

__all__ = ["FinetuneConfig", "finetune", "load_finetuned", "evaluate_checkpoint", "read_frames",
           "CHECKPOINT_FORMAT", "refit_e0s", "errors", "loss"]

CHECKPOINT_FORMAT = "mmea_kernels.finetune/1"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class FinetuneConfig:
    train: str
    valid: Optional[str] = None
    test: Optional[str] = None
    out_dir: str = "runs/finetune"
    model: str = DEFAULT_MODEL
    model_config: Optional[str] = None
    method: str = "mmea"
    rank: int = 16
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    dtype: str = "float64"
    e0s: str = "lstsq"  # lstsq | average | keep | path to a JSON {Z: eV}
    refit_e0s_after: bool = False  # re-fit the E0s with the trained model (lstsq on the training frames)
    epochs: int = 100
    batch_size: int = 5
    lr: float = 1e-2
    w_energy: float = 1.0
    w_forces: float = 1000.0
    ema_decay: float = 0.99
    clip_grad: float = 10.0
    patience: int = 30
    plateau_patience: int = 5
    plateau_factor: float = 0.8
    valid_fraction: float = 0.1
    seed: int = 0
    resume: bool = False
    progress: bool = True
    eval_batch_size: int = 50
    stop_after: Optional[int] = None  # stop (resumably) after this many epochs in this call
    trust_pickle: bool = False  # allow a whole pickled base model (runs code from the file)
    fused_gate: bool = True  # SevenNet: FusedGate in place of e3nn's Gate (same numbers)
    min_distance: float = 0.1  # Å: closer atoms are refused (checks.DataChecks)
    max_neighbors: int = 500  # neighbours per atom within the cutoff
    allow_small_cells: bool = False  # accept periodic cells narrower than the cutoff

    def data_checks(self) -> DataChecks:
        return DataChecks(self.min_distance, self.max_neighbors, self.allow_small_cells)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected float32 or float64")
        for name in ("epochs", "batch_size", "rank", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        self.data_checks()


# ----------------------------------------------------------------------------------------- data
def read_frames(spec: str, energy_key: str, forces_key: str, labels: bool = True) -> list:
    """Frames of an extended-XYZ file; ``path@index`` selects with ASE's index syntax
    (``data.xyz@:50``, ``data.xyz@50:100``). Every frame must carry both labels, finite (named in
    the error); an empty selection, a bad index or an unreadable file raise ``checks.DataError``."""
    from .checks import check_labels, read_structures

    frames = read_structures(spec)
    if labels:
        check_labels(frames, str(spec), energy_key, forces_key)
    return frames


def _energies(frames, key):
    return np.array([a.info[key] for a in frames], dtype=float)


def refit_e0s(model, frames, z_table: Sequence[int], mode: str, energy_key: str, batch_size: int = 50,
              from_scratch: bool = False) -> List[float]:
    """Per-element reference energies for a new level of theory, keeping the model's interaction
    energy: the residual ``E_ref - (E_model - Σ E0_old)`` of the training frames is fitted by
    ``lstsq`` (least squares on element counts; minimum-norm when the compositions do not
    determine every element) or ``average`` (one mean residual per atom for every element);
    ``keep`` leaves them; a JSON file path gives ``{"Z": eV}`` explicitly. ``from_scratch``: fit the
    energies themselves (a randomly initialised model's interaction energy means nothing)."""
    from ..integrations.mace import atoms_to_batch

    e0_old = model.atomic_energies_fn.atomic_energies.detach().double().reshape(-1).cpu().numpy()
    if mode == "keep":
        return [float(v) for v in e0_old]
    if mode not in ("lstsq", "average"):
        p = pathlib.Path(mode)
        if not p.is_file():
            raise ValueError(f"e0s must be lstsq, average, keep or a JSON file; {mode!r} is none of these")
        given = {int(k): float(v) for k, v in json.loads(p.read_text()).items()}
        missing = [z for z in z_table if z not in given]
        if missing:
            raise KeyError(f"{p}: no E0 for elements {missing}")
        return [given[int(z)] for z in z_table]
    counts = np.array([[int((a.numbers == z).sum()) for z in z_table] for a in frames], dtype=float)
    interaction = np.zeros(len(frames))
    if not from_scratch:
        r_max = float(model.r_max)
        dtype = next(model.parameters()).dtype
        preds = []
        for i in range(0, len(frames), batch_size):
            b = atoms_to_batch(frames[i:i + batch_size], z_table, r_max, dtype=dtype)
            out = model(b, training=False, compute_force=False)
            preds.append(out["energy"].detach().double().cpu().numpy())
        interaction = np.concatenate(preds) - counts @ e0_old
    resid = _energies(frames, energy_key) - interaction
    if mode == "average":
        per_atom = float(np.mean(resid / counts.sum(1)))
        return [per_atom] * len(z_table)
    e0, *_ = np.linalg.lstsq(counts, resid, rcond=None)
    return [float(v) for v in e0]


def _set_e0s(model, e0s, source: str = "the E0s") -> None:
    buf = model.atomic_energies_fn.atomic_energies
    if len(e0s) != buf.numel():
        z = [int(v) for v in getattr(model, "atomic_numbers", [])]
        raise ValueError(f"{source} holds {len(e0s)} reference energies (E0s), but the base model has {buf.numel()} "
                         f"elements {z}: it was made for a base model with other elements")
    if not all(math.isfinite(float(v)) for v in e0s):
        raise ValueError(f"{source}: non-finite reference energies (E0s) {list(e0s)}")
    with torch.no_grad():
        buf.copy_(torch.tensor(e0s, dtype=buf.dtype).reshape(buf.shape))


# -------------------------------------------------------------------------------------- metrics
def _batches(graphs, size, order=None, rank: int = 0, world: int = 1):
    """Batches of ``size`` graphs in ``order``; with ``world`` processes, process ``rank`` gets its
    share (every ``world``-th graph) of each global batch."""
    from ..integrations.mace import collate

    idx = list(range(len(graphs))) if order is None else list(order)
    out = []
    for k in range(0, len(idx), size):
        full = idx[k:k + size]
        if len(full) < world:  # a last global batch too small to give every process a frame is dropped
            continue
        b = collate([graphs[i] for i in full[rank::world]])
        b["_global"] = (len(full), sum(int(graphs[i].num_nodes) for i in full))
        out.append(b)
    return out


def _loss_terms(model, batch, training: bool):
    out = model({k: v for k, v in batch.items() if k != "_global"}, training=training, compute_force=True)
    n_atoms = (batch["ptr"][1:] - batch["ptr"][:-1]).to(out["energy"].dtype)
    return out["energy"], out["forces"], n_atoms


def loss(model, batch: dict, w_energy: float = 1.0, w_forces: float = 1000.0, global_frames: Optional[int] = None,
         global_atoms: Optional[int] = None, world: int = 1) -> torch.Tensor:
    """``w_E·MSE(E/N_atoms) + w_F·MSE(F)`` on one batch, differentiable (forces with create_graph).

    Data-parallel: ``batch`` is this process's share of a global batch of ``global_frames`` frames
    and ``global_atoms`` atoms; the sums are divided by the global counts and multiplied by
    ``world`` so that DDP's gradient average equals the single-process gradient of the global batch."""
    e, f, n = _loss_terms(model, batch, training=True)
    nf = e.shape[0] if global_frames is None else global_frames
    na = f.shape[0] if global_atoms is None else global_atoms
    return world * (w_energy * (((e - batch["energy"]) / n) ** 2).sum() / nf
                    + w_forces * ((f - batch["forces"]) ** 2).sum() / (3 * na))


def errors(model, batches, w_energy: float = 1.0, w_forces: float = 1000.0) -> Dict[str, float]:
    """Energy (total, meV) and force (meV/Å) MAE and RMSE, and the loss, over ``batches``."""
    de, df, dea = [], [], []
    for b in batches:
        e, f, n = _loss_terms(model, b, training=False)
        de.append((e.detach() - b["energy"]).double())
        dea.append(de[-1] / n.double())
        df.append((f.detach() - b["forces"]).double().reshape(-1))
    de, df, dea = torch.cat(de), torch.cat(df), torch.cat(dea)
    return {"energy_mae_meV": 1000 * float(de.abs().mean()), "energy_rmse_meV": 1000 * float(de.pow(2).mean().sqrt()),
            "forces_mae_meV_per_A": 1000 * float(df.abs().mean()),
            "forces_rmse_meV_per_A": 1000 * float(df.pow(2).mean().sqrt()),
            "loss": w_energy * float(dea.pow(2).mean()) + w_forces * float(df.pow(2).mean())}


# ---------------------------------------------------------------------------------- distributed
def _dist_setup():
    """(rank, world size); initialises torch.distributed under torchrun (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------------- checkpoint
def _atomic_save(obj, path: pathlib.Path) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        raise RuntimeError(f"process {dist.get_rank()} tried to write {path}: only rank 0 writes files")
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def _check_writable(out: pathlib.Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {out} is not writable ({exc.strerror or exc})") from None


class _EMA:
    def __init__(self, params: Dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self):
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1 - self.decay) if self.decay > 0 else self.shadow[n].copy_(p)

    @torch.no_grad()
    def swap(self):
        for n, p in self.params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)


def _prepare(model_spec, model_config, method, rank, dtype, seed, e0s=None, trust_pickle=False, source="the E0s"):
    model = load_model(model_spec, model_config, dtype=dtype, trust_pickle=trust_pickle)
    fp = fingerprint(model)
    if e0s is not None:
        _set_e0s(model, e0s, source)
    groups = apply_method(model, method, rank=rank, seed=seed)
    return model, fp, groups


def _read_checkpoint(path: pathlib.Path) -> dict:
    ckpt = safe_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file (found {got!r})")
    for key in ("method", "rank", "model", "base_fingerprint", "e0s", "trainable", "seed", "dtype"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} is missing the key {key!r} (corrupt or truncated)")
    if ckpt["dtype"] not in _DTYPES:
        raise ValueError(f"checkpoint {path}: unknown dtype {ckpt['dtype']!r}")
    return ckpt


def _needs_same_base(ckpt: dict, spec: str) -> bool:
    """Whether the base weights must equal the ones trained on: always for adapter methods; for
    full/scratch only in checkpoints without their own buffers (written before they held them),
    except a scratch run from an (untrained, randomly initialised) preset."""
    if ckpt["method"] not in ("full", "scratch"):
        return True
    if "buffers" in ckpt:
        return False
    return not (ckpt["method"] == "scratch" and str(ckpt["model"]).startswith("preset:"))


def _load_tensors(net, ckpt: dict, path, spec: str) -> None:
    named = dict(net.named_parameters())
    want = {n for n, p in named.items() if p.requires_grad}
    have = set(ckpt["trainable"])
    if want != have:
        raise ValueError(f"checkpoint {path} does not fit model {spec!r} with method {ckpt['method']!r}: "
                         f"missing {sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}")
    bufs = dict(net.named_buffers())
    saved_bufs = ckpt.get("buffers", {})
    if set(saved_bufs) - set(bufs):
        raise ValueError(f"checkpoint {path} does not fit model {spec!r}: buffers {sorted(set(saved_bufs) - set(bufs))[:5]} "
                         "are not in the model (different architecture)")
    pairs = [(n, named[n], t) for n, t in ckpt["trainable"].items()] + [(n, bufs[n], t) for n, t in saved_bufs.items()]
    for n, dst, t in pairs:
        if dst.shape != t.shape:
            raise ValueError(f"checkpoint {path}: {n} has shape {tuple(t.shape)}, model expects "
                             f"{tuple(dst.shape)} (different architecture or rank)")
    with torch.no_grad():
        for n, dst, t in pairs:
            dst.copy_(t)


def load_finetuned(checkpoint, model: Optional[str] = None, model_config=None, dtype: Optional[str] = None,
                   trust_pickle: bool = False):
    """(model, checkpoint dict): the base model (``model`` overrides the spec stored in the
    checkpoint) set up with the checkpoint's method and loaded with its weights. Raises when the
    base model is not the one the checkpoint was trained on (fingerprint, or the checkpoint's own
    reference prediction), or the checkpoint is unreadable. The checkpoint is read with
    ``weights_only=True``; ``trust_pickle`` only concerns a whole pickled base model."""
    path = pathlib.Path(checkpoint)
    ckpt = _read_checkpoint(path)
    spec = model or ckpt["model"]
    dt = _DTYPES[dtype or ckpt["dtype"]]
    net, fp, _ = _prepare(spec, model_config if model else ckpt.get("model_config"), ckpt["method"], ckpt["rank"],
                          dt, ckpt["seed"], ckpt["e0s"], trust_pickle, source=f"checkpoint {path}")
    if _needs_same_base(ckpt, spec) and fp != ckpt["base_fingerprint"]:
        raise ValueError(f"checkpoint {path} was trained on base model {ckpt['model']!r} (fingerprint "
                         f"{ckpt['base_fingerprint']}), but {spec!r} has fingerprint {fp}: not the same weights")
    _load_tensors(net, ckpt, path, spec)
    if "probe" in ckpt:
        verify_probe(net, ckpt["probe"], str(path), spec)
    return net.eval(), ckpt


def evaluate_checkpoint(checkpoint, data: str, model: Optional[str] = None, energy_key: Optional[str] = None,
                        forces_key: Optional[str] = None, batch_size: int = 50, dtype: Optional[str] = None,
                        trust_pickle: bool = False, checks: Optional[DataChecks] = None) -> dict:
    """Errors of a fine-tuned checkpoint on a labelled data file (``path[@index]``), after the data
    checks of :mod:`.checks`."""
    ckpt = _read_checkpoint(pathlib.Path(checkpoint))
    ek, fk = energy_key or ckpt.get("energy_key", "REF_energy"), forces_key or ckpt.get("forces_key", "REF_forces")
    frames = read_frames(data, ek, fk)  # bad data is reported before the model is built
    net, ckpt = load_finetuned(checkpoint, model, dtype=dtype, trust_pickle=trust_pickle)
    z, r_max = model_info(net)
    graphs = checked_graphs(frames, z, r_max, str(data), ek, fk, dtype=next(net.parameters()).dtype,
                            checks=checks or DataChecks())
    res = errors(net, _batches(graphs, batch_size))
    res["frames"] = len(frames)
    return res


# ------------------------------------------------------------------------------------- training
def _plot(history, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].semilogy(ep, [h["train_loss"] for h in history], label="train")
    ax[0].semilogy(ep, [h["valid"]["loss"] for h in history], label="valid")
    ax[0].set_xlabel("epoch"); ax[0].set_ylabel("loss"); ax[0].legend()
    ax[1].semilogy(ep, [h["valid"]["energy_mae_meV"] for h in history], label="E MAE (meV)")
    ax[1].semilogy(ep, [h["valid"]["forces_mae_meV_per_A"] for h in history], label="F MAE (meV/Å)")
    ax[1].set_xlabel("epoch"); ax[1].set_title("validation"); ax[1].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def format_table(metrics: dict) -> str:
    rows = []
    for split in ("train", "valid", "test"):
        m = metrics.get(split)
        if m:
            rows.append(f"| {split} | {m['frames']} | {m['energy_mae_meV']:.2f} | {m['energy_rmse_meV']:.2f} | "
                        f"{m['forces_mae_meV_per_A']:.2f} | {m['forces_rmse_meV_per_A']:.2f} |")
    head = (f"method {metrics['method']}, {metrics['trainable_parameters']:,} trainable parameters, "
            f"{metrics['epochs_run']} epochs (best {metrics['best_epoch']}), {metrics['train_seconds']:.1f} s training\n"
            "| split | frames | E MAE meV | E RMSE meV | F MAE meV/Å | F RMSE meV/Å |\n|---|---|---|---|---|---|")
    before = metrics.get("before_e0_refit")
    if before:
        for split in ("train", "valid", "test"):
            m = before.get(split)
            if m:
                rows.append(f"| {split}, E0s before re-fit | {m['frames']} | {m['energy_mae_meV']:.2f} | "
                            f"{m['energy_rmse_meV']:.2f} | {m['forces_mae_meV_per_A']:.2f} | "
                            f"{m['forces_rmse_meV_per_A']:.2f} |")
    return head + "\n" + "\n".join(rows)


def finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Run the workflow described in the module docstring; returns the metrics dict. Bad data,
    files or settings raise before training; an output directory this call created is removed
    again when it fails before writing anything into it."""
    cfg.check()
    rank, world = _dist_setup()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be a multiple of the {world} processes")
    if rank != 0:
        log = lambda *_: None  # noqa: E731
    out = pathlib.Path(cfg.out_dir)
    made = created_dirs(out) if rank == 0 else []
    try:
        if rank == 0:
            _check_writable(out)
        return _finetune(cfg, log, rank, world, out)
    except BaseException:
        remove_created_dirs(made)
        raise


def _read_splits(cfg: FinetuneConfig):
    train_frames = read_frames(cfg.train, cfg.energy_key, cfg.forces_key)
    if cfg.valid:
        valid_frames = read_frames(cfg.valid, cfg.energy_key, cfg.forces_key)
    else:
        perm = np.random.default_rng(cfg.seed).permutation(len(train_frames))
        n_va = max(1, int(round(cfg.valid_fraction * len(train_frames))))
        if n_va >= len(train_frames):
            raise ValueError(f"{cfg.train} has {len(train_frames)} frames: too few to split off a validation set")
        valid_frames = [train_frames[i] for i in perm[:n_va]]
        train_frames = [train_frames[i] for i in perm[n_va:]]
    test_frames = read_frames(cfg.test, cfg.energy_key, cfg.forces_key) if cfg.test else []
    return {"train": train_frames, "valid": valid_frames, "test": test_frames}


def _setup(cfg: FinetuneConfig, world: int):
    """Frames, base model, checked graphs, E0s and method: everything before the first step."""
    import types

    dtype = _DTYPES[cfg.dtype]
    frames = _read_splits(cfg)
    base = load_model(cfg.model, cfg.model_config, dtype=dtype, trust_pickle=cfg.trust_pickle,
                      fused_gate=cfg.fused_gate)
    z, r_max = model_info(base)
    graphs = {split: checked_graphs(frames[split], z, r_max, str(src), cfg.energy_key, cfg.forces_key, dtype=dtype,
                                    checks=cfg.data_checks())
              for split, src in (("train", cfg.train), ("valid", cfg.valid or cfg.train), ("test", cfg.test))}
    fp = fingerprint(base)
    e0s = refit_e0s(base, frames["train"], z, cfg.e0s, cfg.energy_key, from_scratch=cfg.method == "scratch")
    # the same steps as _prepare (which load_finetuned uses), on the model already loaded
    model = base
    _set_e0s(model, e0s, "the fitted E0s")
    groups = apply_method(model, cfg.method, rank=cfg.rank, seed=cfg.seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    net = model
    if world > 1:  # gradients averaged over processes by DDP; each process holds batch_size / world frames
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, amsgrad=True)
    return types.SimpleNamespace(
        model=model, net=net, params=params, opt=opt, z=z, e0s=e0s, fp=fp, groups=groups, graphs=graphs,
        probe_atoms=frames["train"][0], train_frames=frames["train"], n_train=sum(p.numel() for p in params.values()),
        sched=torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience),
        ema=_EMA(params, cfg.ema_decay), history=[], best={"loss": math.inf, "epoch": 0, "state": None},
        start_epoch=1, elapsed=0.0, saved_epoch=0)


def _resume(cfg: FinetuneConfig, r, state_path: pathlib.Path, log) -> None:
    st = safe_load(state_path, "training state")
    if not isinstance(st, dict) or not {"config_key", "params", "ema", "optimizer", "scheduler", "history",
                                         "best", "epoch", "elapsed"} <= set(st):
        raise ValueError(f"{state_path} is not a training state of this package (corrupt, or another file)")
    if st.get("config_key") != _config_key(cfg):
        raise ValueError(f"{state_path} belongs to a run with different settings ({st.get('config_key')}); "
                         f"this run is {_config_key(cfg)}")
    with torch.no_grad():
        for n, p in r.params.items():
            p.copy_(st["params"][n])
    r.ema.shadow = st["ema"]
    r.opt.load_state_dict(st["optimizer"])
    r.sched.load_state_dict(st["scheduler"])
    r.history, r.best, r.start_epoch, r.elapsed = st["history"], st["best"], st["epoch"] + 1, st["elapsed"]
    r.saved_epoch = st["epoch"]
    log(f"resuming {state_path.parent} at epoch {r.start_epoch}")


def _train_epoch(cfg: FinetuneConfig, r, epoch: int, rank: int, world: int, state_path) -> float:
    """One epoch of steps; the mean training loss. Stops on a non-finite loss or gradient norm before
    the optimizer step, so the weights of the last good step are never replaced by NaN."""
    r.model.train()
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(r.graphs["train"]), generator=g).tolist()
    tot, nb = 0.0, 0
    for k, b in enumerate(_batches(r.graphs["train"], cfg.batch_size, order, rank, world)):
        value = loss(r.net, b, cfg.w_energy, cfg.w_forces, *b["_global"], world=world)
        r.opt.zero_grad(set_to_none=True)
        value.backward()
        v = value.detach().clone()
        if world > 1:  # the global batch's loss, for the log (and the same stop decision everywhere)
            torch.distributed.all_reduce(v)
        check_finite(float(v), "the training loss", epoch, k + 1, state_path, r.saved_epoch)
        if cfg.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(r.params.values(), cfg.clip_grad)
            check_finite(float(norm), "the gradient norm", epoch, k + 1, state_path, r.saved_epoch)
        r.opt.step()
        r.ema.update()
        tot, nb = tot + float(v) / world, nb + 1
    return tot / nb


def _validate(cfg: FinetuneConfig, r, epoch: int, state_path) -> dict:
    r.model.eval()
    r.ema.swap()  # evaluate with the EMA weights
    val = errors(r.model, r.valid_b, cfg.w_energy, cfg.w_forces)
    check_finite(val["loss"], "the validation loss", epoch, None, state_path, r.saved_epoch)
    if val["loss"] < r.best["loss"]:
        r.best = {"loss": val["loss"], "epoch": epoch, "state": trainable_state(r.model)}
    r.ema.swap()
    return val


def _save_state(cfg: FinetuneConfig, r, epoch: int, state_path: pathlib.Path) -> None:
    _atomic_save({"config_key": _config_key(cfg), "params": {n: p.detach().clone() for n, p in r.params.items()},
                  "ema": r.ema.shadow, "optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(),
                  "history": r.history, "best": r.best, "epoch": epoch, "elapsed": r.elapsed}, state_path)


def _loop(cfg: FinetuneConfig, r, rank: int, world: int, out: pathlib.Path, bar) -> tuple:
    state_path, ckpt_path = out / "state.pt", out / "checkpoint.pt"
    stopped, epoch, ran = "epochs", r.start_epoch - 1, 0
    for epoch in range(r.start_epoch, cfg.epochs + 1):
        if epoch - r.best["epoch"] > cfg.patience and r.best["epoch"] > 0:
            return f"early stopping (no validation improvement for {cfg.patience} epochs)", epoch - 1, ran
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            return "stop_after", epoch - 1, ran
        r.epoch = epoch
        t0 = time.perf_counter()
        train_loss = _train_epoch(cfg, r, epoch, rank, world, state_path)
        val = _validate(cfg, r, epoch, state_path)
        r.sched.step(val["loss"])
        r.elapsed += time.perf_counter() - t0
        r.history.append({"epoch": epoch, "train_loss": train_loss, "valid": val, "lr": r.opt.param_groups[0]["lr"],
                          "seconds": r.elapsed})
        ran += 1
        # every process checks (identical weights under DDP), so all of them stop together
        check_finite_tensors(list(r.params.items()) + list(r.ema.shadow.items()), "the weight", epoch, state_path,
                             r.saved_epoch)
        if r.best["epoch"] == epoch and rank == 0:
            _write_checkpoint(ckpt_path, cfg, r)
        if rank == 0:
            _save_state(cfg, r, epoch, state_path)
        r.saved_epoch = epoch
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"E {val['energy_mae_meV']:.1f} meV  F {val['forces_mae_meV_per_A']:.1f} meV/Å  "
                                f"best {r.best['epoch']}")
    return stopped, epoch, ran


def _finetune(cfg: FinetuneConfig, log, rank: int, world: int, out: pathlib.Path) -> dict:
    state_path = out / "state.pt"
    if state_path.exists() and not cfg.resume:
        raise FileExistsError(f"{state_path} exists (an earlier run): pass resume=True (--resume) to continue it, "
                              "or choose another output directory")
    r = _setup(cfg, world)
    if cfg.resume and state_path.exists():
        _resume(cfg, r, state_path, log)
    r.valid_b = _batches(r.graphs["valid"], cfg.eval_batch_size)
    log(f"{cfg.method}: {r.n_train:,} trainable parameters ({'; '.join(f'{k} {v:,}' for k, v in r.groups.items())}); "
        f"{len(r.graphs['train'])} train / {len(r.graphs['valid'])} valid / {len(r.graphs['test'])} test frames; "
        f"E0s {dict(zip(r.z, (round(e, 4) for e in r.e0s)))}")
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=r.start_epoch - 1, desc=cfg.method, file=sys.stderr, dynamic_ncols=True)
    r.epoch = r.start_epoch
    try:
        stopped, epoch, ran = _loop(cfg, r, rank, world, out, bar)
    except KeyboardInterrupt:
        log(interrupt_message(r.epoch, state_path, r.saved_epoch))
        raise
    finally:
        if bar is not None:
            bar.close()
    if stopped == "stop_after":
        log(f"stopped after {ran} epochs as asked (stop_after); resume with --resume")
        return {"stopped": stopped, "epoch": epoch}
    return _finish(cfg, r, rank, world, out, stopped, epoch, log)


def _finish(cfg: FinetuneConfig, r, rank: int, world: int, out: pathlib.Path, stopped: str, epoch: int, log) -> dict:
    """Final model (the best EMA weights), metrics on every split, checkpoint, metrics.json, plot."""
    with torch.no_grad():
        for n, p in r.params.items():
            p.copy_(r.best["state"][n])
    metrics = {"method": cfg.method, "model": cfg.model, "base_fingerprint": r.fp, "rank": cfg.rank,
               "trainable_parameters": r.n_train, "parameter_groups": r.groups, "epochs_run": epoch,
               "best_epoch": r.best["epoch"], "stopped": stopped, "train_seconds": r.elapsed, "e0s": r.e0s,
               "seed": cfg.seed, "dtype": cfg.dtype, "config": dataclasses.asdict(cfg), "history": r.history}
    _split_errors(cfg, r, metrics)
    if cfg.refit_e0s_after:
        _refit_e0s_after(cfg, r, metrics, log)
    metrics["world_size"] = world
    if rank == 0:
        _write_checkpoint(out / "checkpoint.pt", cfg, r, metrics)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        _plot(r.history, out / "learning_curve.png", f"{cfg.method} on {cfg.train} (base {cfg.model})")
    log(format_table(metrics))
    return metrics


def _split_errors(cfg: FinetuneConfig, r, metrics: dict) -> None:
    for split in ("train", "valid", "test"):
        if r.graphs[split]:
            metrics[split] = dict(errors(r.model, _batches(r.graphs[split], cfg.eval_batch_size), cfg.w_energy,
                                         cfg.w_forces), frames=len(r.graphs[split]))


def _refit_e0s_after(cfg: FinetuneConfig, r, metrics: dict, log) -> None:
    """Fair energies: the E0s re-fitted by least squares on the training frames with the trained
    model (its interaction energy kept), so that a constant offset left by training does not count
    as model error. The new E0s go into the model and the checkpoint; the metrics before the re-fit
    stay in ``metrics["before_e0_refit"]``, side by side."""
    before = {split: metrics[split] for split in ("train", "valid", "test") if split in metrics}
    old = list(r.e0s)
    new = refit_e0s(r.model, r.train_frames, r.z, "lstsq", cfg.energy_key)
    _set_e0s(r.model, new, "the re-fitted E0s")
    r.e0s = new
    _split_errors(cfg, r, metrics)
    metrics.update(e0s=new, e0s_before_refit=old, before_e0_refit=before)
    log("E0s re-fitted after training: " + ", ".join(f"Z={z}: {a:+.4f} -> {b:+.4f} eV" for z, a, b in zip(r.z, old, new)))


def _config_key(cfg: FinetuneConfig) -> str:
    d = dataclasses.asdict(cfg)
    # settings that do not change the trajectory (and did not exist in earlier runs' state.pt) stay out
    for k in ("resume", "progress", "stop_after", "out_dir", "epochs", "eval_batch_size", "trust_pickle",
              "min_distance", "max_neighbors", "allow_small_cells", "fused_gate", "refit_e0s_after"):
        d.pop(k)
    return json.dumps(d, sort_keys=True)


def _model_with(r, state: Dict[str, torch.Tensor]):
    """The model with ``state`` in its trained parameters (for the checkpoint's reference
    prediction); the current values are put back afterwards."""
    import contextlib

    @contextlib.contextmanager
    def swapped():
        keep = {n: p.detach().clone() for n, p in r.params.items()}
        with torch.no_grad():
            for n, p in r.params.items():
                p.copy_(state[n])
        try:
            yield r.model
        finally:
            with torch.no_grad():
                for n, p in r.params.items():
                    p.copy_(keep[n])
    return swapped()


def _write_checkpoint(path, cfg, r, metrics=None):
    """Trained tensors, E0s, method and base identity; for full/scratch every buffer too (scale/shift,
    E0s, ...), so that the checkpoint does not depend on the base model's other tensors; and a
    reference prediction (:mod:`.selfcheck`) that loading must reproduce. Plain types only
    (``weights_only=True`` reads it)."""
    summary = None
    if metrics is not None:
        summary = {k: metrics[k] for k in ("train", "valid", "test") if k in metrics}
    with _model_with(r, r.best["state"]) as model:
        probe = make_probe(model, r.probe_atoms)
    extra = {"probe": probe}
    if cfg.method in ("full", "scratch"):
        extra["buffers"] = {n: b.detach().clone() for n, b in r.model.named_buffers()}
    _atomic_save({"format": CHECKPOINT_FORMAT, "method": cfg.method, "rank": cfg.rank, "model": cfg.model,
                  "model_config": cfg.model_config, "base_fingerprint": r.fp, "e0s": [float(v) for v in r.e0s],
                  "seed": cfg.seed, "dtype": cfg.dtype, "energy_key": cfg.energy_key, "forces_key": cfg.forces_key,
                  "epoch": r.best["epoch"], "trainable": r.best["state"], "trainable_parameters": r.n_train,
                  "parameter_groups": dict(r.groups), "metrics": summary, **extra}, path)
