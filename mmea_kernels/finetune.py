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

from .foundation import DEFAULT_MODEL, _torch_load, fingerprint, load_model, model_info
from .methods import METHODS, apply_method, trainable_state

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


# ----------------------------------------------------------------------------------------- data
def read_frames(spec: str, energy_key: str, forces_key: str, labels: bool = True) -> list:
    """Frames of an extended-XYZ file; ``path@index`` selects with ASE's index syntax
    (``data.xyz@:50``, ``data.xyz@50:100``). Every frame must carry both labels (named in the error)."""
    import ase.io

    from .data import read_xyz

    path, _, index = str(spec).partition("@")
    if labels:
        return read_xyz(path, index or ":", energy_key, forces_key)
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    frames = ase.io.read(path, index or ":")
    return frames if isinstance(frames, list) else [frames]


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
    from .models.mace import atoms_to_batch

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


def _set_e0s(model, e0s) -> None:
    buf = model.atomic_energies_fn.atomic_energies
    with torch.no_grad():
        buf.copy_(torch.tensor(e0s, dtype=buf.dtype).reshape(buf.shape))


# -------------------------------------------------------------------------------------- metrics
def _batches(graphs, size, order=None, rank: int = 0, world: int = 1):
    """Batches of ``size`` graphs in ``order``; with ``world`` processes, process ``rank`` gets its
    share (every ``world``-th graph) of each global batch."""
    from .models.mace import collate

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


def _prepare(model_spec, model_config, method, rank, dtype, seed, e0s=None):
    model = load_model(model_spec, model_config, dtype=dtype)
    fp = fingerprint(model)
    if e0s is not None:
        _set_e0s(model, e0s)
    groups = apply_method(model, method, rank=rank, seed=seed)
    return model, fp, groups


def load_finetuned(checkpoint, model: Optional[str] = None, model_config=None, dtype: Optional[str] = None):
    """(model, checkpoint dict): the base model (``model`` overrides the spec stored in the
    checkpoint) set up with the checkpoint's method and loaded with its weights. Raises when the
    base model is not the one the checkpoint was trained on, or the checkpoint is unreadable."""
    path = pathlib.Path(checkpoint)
    ckpt = _torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file (found {got!r})")
    for key in ("method", "rank", "model", "base_fingerprint", "e0s", "trainable", "seed", "dtype"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} is missing the key {key!r} (corrupt or truncated)")
    spec = model or ckpt["model"]
    dt = _DTYPES[dtype or ckpt["dtype"]]
    net, fp, _ = _prepare(spec, model_config if model else ckpt.get("model_config"), ckpt["method"], ckpt["rank"],
                          dt, ckpt["seed"], ckpt["e0s"])
    if ckpt["method"] not in ("full", "scratch") and fp != ckpt["base_fingerprint"]:
        raise ValueError(f"checkpoint {path} was trained on base model {ckpt['model']!r} (fingerprint "
                         f"{ckpt['base_fingerprint']}), but {spec!r} has fingerprint {fp}: not the same weights")
    named = dict(net.named_parameters())
    want = {n for n, p in named.items() if p.requires_grad}
    have = set(ckpt["trainable"])
    if want != have:
        raise ValueError(f"checkpoint {path} does not fit model {spec!r} with method {ckpt['method']!r}: "
                         f"missing {sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}")
    with torch.no_grad():
        for n, t in ckpt["trainable"].items():
            if named[n].shape != t.shape:
                raise ValueError(f"checkpoint {path}: {n} has shape {tuple(t.shape)}, model expects "
                                 f"{tuple(named[n].shape)} (different architecture or rank)")
            named[n].copy_(t)
    return net.eval(), ckpt


def evaluate_checkpoint(checkpoint, data: str, model: Optional[str] = None, energy_key: Optional[str] = None,
                        forces_key: Optional[str] = None, batch_size: int = 50, dtype: Optional[str] = None) -> dict:
    """Errors of a fine-tuned checkpoint on a labelled data file (``path[@index]``)."""
    from .models.mace import atoms_to_graphs

    net, ckpt = load_finetuned(checkpoint, model, dtype=dtype)
    ek, fk = energy_key or ckpt.get("energy_key", "REF_energy"), forces_key or ckpt.get("forces_key", "REF_forces")
    frames = read_frames(data, ek, fk)
    z, r_max = model_info(net)
    graphs = atoms_to_graphs(frames, z, r_max, ek, fk, dtype=next(net.parameters()).dtype, where=str(data))
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
    return head + "\n" + "\n".join(rows)


def finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Run the workflow described in the module docstring; returns the metrics dict."""
    from .models.mace import atoms_to_graphs

    cfg.check()
    rank, world = _dist_setup()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be a multiple of the {world} processes")
    if rank != 0:
        log = lambda *_: None  # noqa: E731
    out = pathlib.Path(cfg.out_dir)
    if rank == 0:
        _check_writable(out)
    dtype = _DTYPES[cfg.dtype]
    state_path, ckpt_path = out / "state.pt", out / "checkpoint.pt"
    if state_path.exists() and not cfg.resume:
        raise FileExistsError(f"{state_path} exists (an earlier run): pass resume=True (--resume) to continue it, "
                              "or choose another output directory")

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

    base = load_model(cfg.model, cfg.model_config, dtype=dtype)
    z, r_max = model_info(base)
    graphs = {}
    for split, frames, src in (("train", train_frames, cfg.train), ("valid", valid_frames, cfg.valid or cfg.train),
                               ("test", test_frames, cfg.test)):
        graphs[split] = atoms_to_graphs(frames, z, r_max, cfg.energy_key, cfg.forces_key, dtype=dtype, where=str(src))
    fp = fingerprint(base)
    e0s = refit_e0s(base, train_frames, z, cfg.e0s, cfg.energy_key, from_scratch=cfg.method == "scratch")
    # the same steps as _prepare (which load_finetuned uses), on the model already loaded
    model = base
    _set_e0s(model, e0s)
    groups = apply_method(model, cfg.method, rank=cfg.rank, seed=cfg.seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_train = sum(p.numel() for p in params.values())
    net = model
    if world > 1:  # gradients averaged over processes by DDP; each process holds batch_size / world frames
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, amsgrad=True)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    ema = _EMA(params, cfg.ema_decay)
    history: List[dict] = []
    best = {"loss": math.inf, "epoch": 0, "state": None}
    start_epoch, elapsed = 1, 0.0
    if cfg.resume and state_path.exists():
        st = _torch_load(state_path, "training state")
        if st.get("config_key") != _config_key(cfg):
            raise ValueError(f"{state_path} belongs to a run with different settings ({st.get('config_key')}); "
                             f"this run is {_config_key(cfg)}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(st["params"][n])
        ema.shadow = st["ema"]
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        history, best, start_epoch, elapsed = st["history"], st["best"], st["epoch"] + 1, st["elapsed"]
        log(f"resuming {out} at epoch {start_epoch}")

    valid_b = _batches(graphs["valid"], cfg.eval_batch_size)
    log(f"{cfg.method}: {n_train:,} trainable parameters ({'; '.join(f'{k} {v:,}' for k, v in groups.items())}); "
        f"{len(graphs['train'])} train / {len(graphs['valid'])} valid / {len(graphs['test'])} test frames; "
        f"E0s {dict(zip(z, (round(e, 4) for e in e0s)))}")
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch - 1, desc=cfg.method, file=sys.stderr, dynamic_ncols=True)
    stopped, epoch, ran = "epochs", start_epoch - 1, 0
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if epoch - best["epoch"] > cfg.patience and best["epoch"] > 0:
                stopped = f"early stopping (no validation improvement for {cfg.patience} epochs)"
                epoch -= 1
                break
            if cfg.stop_after is not None and ran >= cfg.stop_after:
                stopped = "stop_after"
                epoch -= 1
                break
            t0 = time.perf_counter()
            model.train()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            order = torch.randperm(len(graphs["train"]), generator=g).tolist()
            tot, nb = 0.0, 0
            for b in _batches(graphs["train"], cfg.batch_size, order, rank, world):
                value = loss(net, b, cfg.w_energy, cfg.w_forces, *b["_global"], world=world)
                opt.zero_grad(set_to_none=True)
                value.backward()
                if cfg.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.clip_grad)
                opt.step()
                ema.update()
                v = value.detach().clone()
                if world > 1:  # the global batch's loss, for the log
                    torch.distributed.all_reduce(v)
                tot, nb = tot + float(v) / world, nb + 1
            model.eval()
            ema.swap()  # evaluate with the EMA weights
            val = errors(model, valid_b, cfg.w_energy, cfg.w_forces)
            if val["loss"] < best["loss"]:
                best = {"loss": val["loss"], "epoch": epoch, "state": trainable_state(model)}
            ema.swap()
            sched.step(val["loss"])
            elapsed += time.perf_counter() - t0
            history.append({"epoch": epoch, "train_loss": tot / nb, "valid": val, "lr": opt.param_groups[0]["lr"],
                            "seconds": elapsed})
            ran += 1
            if best["epoch"] == epoch and rank == 0:
                _write_checkpoint(ckpt_path, cfg, fp, e0s, best, n_train, groups)
            if rank == 0:
                _atomic_save({"config_key": _config_key(cfg), "params": {n: p.detach().clone() for n, p in params.items()},
                          "ema": ema.shadow, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "history": history, "best": best, "epoch": epoch, "elapsed": elapsed}, state_path)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"E {val['energy_mae_meV']:.1f} meV  F {val['forces_mae_meV_per_A']:.1f} meV/Å  "
                                    f"best {best['epoch']}")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        log(f"interrupted after epoch {epoch - 1}; state saved in {state_path}: run again with --resume to continue")
        raise
    if bar is not None:
        bar.close()
    if stopped == "stop_after":
        log(f"stopped after {ran} epochs as asked (stop_after); resume with --resume")
        return {"stopped": stopped, "epoch": epoch}

    # final model: the best EMA weights
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best["state"][n])
    metrics = {"method": cfg.method, "model": cfg.model, "base_fingerprint": fp, "rank": cfg.rank,
               "trainable_parameters": n_train, "parameter_groups": groups, "epochs_run": epoch,
               "best_epoch": best["epoch"], "stopped": stopped, "train_seconds": elapsed, "e0s": e0s,
               "seed": cfg.seed, "dtype": cfg.dtype, "config": dataclasses.asdict(cfg), "history": history}
    for split in ("train", "valid", "test"):
        if graphs[split]:
            metrics[split] = dict(errors(model, _batches(graphs[split], cfg.eval_batch_size), cfg.w_energy, cfg.w_forces),
                                  frames=len(graphs[split]))
    metrics["world_size"] = world
    if rank == 0:
        _write_checkpoint(ckpt_path, cfg, fp, e0s, best, n_train, groups, metrics)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        _plot(history, out / "learning_curve.png", f"{cfg.method} on {cfg.train} (base {cfg.model})")
    log(format_table(metrics))
    return metrics


def _config_key(cfg: FinetuneConfig) -> str:
    d = dataclasses.asdict(cfg)
    for k in ("resume", "progress", "stop_after", "out_dir", "epochs", "eval_batch_size"):
        d.pop(k)
    return json.dumps(d, sort_keys=True)


def _write_checkpoint(path, cfg, fp, e0s, best, n_train, groups, metrics=None):
    summary = None
    if metrics is not None:
        summary = {k: metrics[k] for k in ("train", "valid", "test") if k in metrics}
    _atomic_save({"format": CHECKPOINT_FORMAT, "method": cfg.method, "rank": cfg.rank, "model": cfg.model,
                  "model_config": cfg.model_config, "base_fingerprint": fp, "e0s": e0s, "seed": cfg.seed,
                  "dtype": cfg.dtype, "energy_key": cfg.energy_key, "forces_key": cfg.forces_key,
                  "epoch": best["epoch"], "trainable": best["state"], "trainable_parameters": n_train,
                  "parameter_groups": groups, "metrics": summary}, path)
