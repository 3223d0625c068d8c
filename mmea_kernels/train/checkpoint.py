"""Files of a fine-tuning run and reading them back.

``checkpoint.pt`` (:func:`write_checkpoint`; format :data:`CHECKPOINT_FORMAT`): the best
validation epoch's trainable tensors, the E0s, the method and the base model's identity (for
full/scratch every buffer too), and a reference prediction; :func:`load_finetuned` rebuilds the
adapted model from it, checking that the base model is the one it was trained on;
:func:`evaluate_checkpoint` reports its errors on a data file. ``state.pt`` (:func:`save_state`,
:func:`load_state`): everything needed to resume a run exactly. Files are written atomically,
by rank 0 only."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import tempfile
from typing import Optional

import torch

from .atomic import DISK_ERRNOS, WriteFailed, atomic_write, atomic_write_text, write_failed  # noqa: F401 - here too
from .checkpoint_fields import check_fields
from .checks import DataChecks, check_geometry, check_labels, checked_graphs
from .config import _NAMED_MODELS, DTYPES, FinetuneConfig, absolute_paths, config_key
from .data import EVAL_MAX_ATOMS, check_batch_size, check_mace_conventions, frame_chunks, iter_batches, read_frames
from .device import module_device, resolve_device
from .e0s import set_e0s
from .ema import ema_weights, load_ema_weights, weights_in
from .foundation import fingerprint, load_model, model_info
from .loss import SPLITS, errors
from .methods import apply_method
from .safe_load import UnsafeFileError, safe_load
from .selfcheck import make_probe, verify_probe

__all__ = ["CHECKPOINT_FORMAT", "WriteFailed", "atomic_save", "atomic_write_text", "check_writable", "write_failed",
           "prepare", "load_finetuned", "evaluate_checkpoint",
           "write_checkpoint", "save_state", "load_state", "base_files"]

CHECKPOINT_FORMAT = "mmea_kernels.finetune/1"  # the name of the module that wrote it first: old checkpoints load
_STATE_KEYS = {"config_key", "params", "ema", "optimizer", "scheduler", "history", "best", "epoch", "elapsed"}


# --------------------------------------------------------------------------------------- writing
def atomic_save(obj, path: pathlib.Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`.atomic.atomic_write`), by rank 0 only."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        raise RuntimeError(f"process {dist.get_rank()} tried to write {path}: only rank 0 writes files")
    atomic_write(path, lambda sink: torch.save(obj, sink))


def check_writable(out: pathlib.Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output directory {out} is a file, not a directory; give --out a directory "
                                 "(a new one, or the run's own to resume it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=str(out))
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise PermissionError(f"output directory {out} is not writable ({exc.strerror or exc})") from None


def write_checkpoint(path, cfg: FinetuneConfig, r, metrics=None) -> None:
    """Trained tensors, E0s, method and base identity; for full/scratch every buffer too (scale/shift,
    E0s, ...), so that the checkpoint does not depend on the base model's other tensors; and a
    reference prediction (:mod:`.selfcheck`) that loading must reproduce. Plain types only
    (``weights_only=True`` reads it), tensors on the CPU (a run on a GPU gives a file that loads
    anywhere). ``e0_span``: the span of the training compositions when the E0s were fitted on them
    (:func:`.e0s.fitted_span`; evaluating outside it warns), else None."""
    from .e0s import fitted_span

    summary = None
    if metrics is not None:
        summary = {k: metrics[k] for k in SPLITS if k in metrics}
    with weights_in(r.params, r.best["state"]):
        probe = make_probe(r.model, r.probe_atoms)
    extra = {"probe": probe}
    if cfg.method in ("full", "scratch"):
        extra["buffers"] = {n: b.detach().cpu().clone() for n, b in r.model.named_buffers()}
    # the base model's file (and config) by absolute path: evaluate/md/export run from any directory; as
    # given too: a project moved elsewhere loads from its own directory (base_files)
    base = absolute_paths({"model": cfg.model, "model_config": cfg.model_config})
    atomic_save({"format": CHECKPOINT_FORMAT, "method": cfg.method, "rank": cfg.rank, "model": base["model"],
                 "model_as_given": cfg.model, "model_config_as_given": cfg.model_config,
                 "head": getattr(r.model, "mmea_head", None),  # the head of a multi-head base it was trained on
                 "adapter_options": dict(cfg.adapter_options),
                 "model_config": base["model_config"], "base_fingerprint": r.fp, "e0s": [float(v) for v in r.e0s],
                 "seed": cfg.seed, "dtype": cfg.dtype, "energy_key": cfg.energy_key, "forces_key": cfg.forces_key,
                 "stress_key": cfg.stress_key, "w_stress": float(cfg.w_stress), "w_energy": float(cfg.w_energy),
                 "w_forces": float(cfg.w_forces),
                 "epoch": r.best["epoch"], "trainable": {n: t.cpu() for n, t in r.best["state"].items()},
                 "trainable_parameters": r.n_train,
                 "parameter_groups": dict(r.groups), "metrics": summary, "e0_span": fitted_span(cfg, r),
                 **_plain({"config": dataclasses.asdict(cfg), "provenance": getattr(r, "record", None)}), **extra}, path)


def _plain(obj):
    """``obj`` as JSON's plain types (numpy scalars given as settings from Python become floats/ints):
    weights-only loading reads nothing else."""
    return json.loads(json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# ---------------------------------------------------------------------------------- training state
def inputs_fingerprint(cfg: FinetuneConfig, r) -> dict:
    """What a run's inputs are beyond its settings: the base model's weights (fingerprint) and the
    SHA-256 of each data file (its first 16 digits; ``r.data_sha``, read once when the run set up), so
    that a resume refuses a file replaced under the same name."""
    from .provenance import data_hashes

    hashes = getattr(r, "data_sha", None) or data_hashes(cfg)
    return {"base model": r.fp, **{opt: h[:16] for opt, h in hashes.items()}}


# what the loss and the E0 modes mean, stored in state.pt: 2 = per-frame loss weights (mace-torch's) in the loss
# and the E0 fit, --e0s average = lstsq; states without it (1) had neither
SEMANTICS = 2


def _weighted(cfg: FinetuneConfig, r) -> bool:
    """Whether a training or validation frame carries a loss weight other than 1 on a term the loss has."""
    keys = ["weight"] + [k for k, w in (("energy_weight", cfg.w_energy), ("forces_weight", cfg.w_forces),
                                        ("stress_weight", cfg.w_stress)) if w > 0]
    return any(float(getattr(g, k, 1.0)) != 1.0 for split in ("train", "valid") for g in r.graphs[split]
               for k in keys if getattr(g, k, None) is not None)


def check_semantics(cfg: FinetuneConfig, r, state_path) -> None:
    """Before training on from a loaded state (``r.semantics``): ``ValueError`` for a state of an older
    version whose objective differs for this run's data or E0s (a finished run is left as it is)."""
    if getattr(r, "semantics", SEMANTICS) >= SEMANTICS:
        return
    changed = (["its loss ignored per-frame weights (config_weight, config_*_weight), which this run's frames "
                "carry"] if _weighted(cfg, r) else []) + \
        (["its --e0s average was one mean per atom for every element (now a least-squares fit)"] if cfg.e0s == "average" else [])
    if changed:
        raise ValueError(f"{state_path} was written by an older version of this package: {'; '.join(changed)}; "
                         "resuming would change the objective mid-run: start a new run (another --out)")


def save_state(cfg: FinetuneConfig, r, epoch: int, state_path: pathlib.Path) -> None:
    atomic_save({"config_key": config_key(cfg), "semantics": SEMANTICS, "inputs": inputs_fingerprint(cfg, r),
                 "params": {n: p.detach().clone() for n, p in r.params.items()},
                 "ema": ema_weights(r.ema, r.params), "optimizer": r.opt.state_dict(),
                 "scheduler": r.sched.state_dict(), "history": r.history, "best": r.best, "epoch": epoch,
                 "elapsed": r.elapsed, "intra_op_threads": torch.get_num_threads()}, state_path)


def _saved_settings(saved_key):
    """A state's ``config_key`` as a dict, its files by absolute path (the relative ones of states written
    before keys held absolute paths resolved against this working directory); None when unreadable."""
    try:
        saved = json.loads(saved_key)
    except (TypeError, ValueError):
        return None
    return absolute_paths(saved) if isinstance(saved, dict) else None


def _same_settings(saved_key, cfg: FinetuneConfig) -> bool:
    saved = _saved_settings(saved_key)
    return saved is not None and json.dumps(saved, sort_keys=True) == config_key(cfg)


def _settings_diff(saved_key, cfg: FinetuneConfig) -> str:
    """The settings (as command-line options) that differ between a state's ``config_key`` and ``cfg``."""
    saved = _saved_settings(saved_key)
    if saved is None:
        return f"its settings key is {saved_key!r}"
    now = json.loads(config_key(cfg))
    # config_key leaves some settings out at their defaults (keys of runs from before they existed)
    default = dataclasses.asdict(FinetuneConfig(train=""))
    names = {"adapter_options": "adapter options (--phi, --init, --alpha)"}
    diff = [f"{names.get(k, '--' + k.replace('_', '-'))} {saved.get(k, default.get(k))!r} there, "
            f"{now.get(k, default.get(k))!r} now" for k in sorted(set(saved) | set(now))
            if saved.get(k, default.get(k)) != now.get(k, default.get(k))]
    return "; ".join(diff) or "the same values, keyed differently"


def load_state(cfg: FinetuneConfig, r, state_path: pathlib.Path, log) -> None:
    """Continue the run ``r`` from ``state.pt``, which must come from a run with the same settings."""
    st = safe_load(state_path, "training state")
    if not isinstance(st, dict) or not _STATE_KEYS <= set(st):
        raise ValueError(f"{state_path} is not a training state of this package (corrupt, or another file)")
    if not _same_settings(st.get("config_key"), cfg):
        raise ValueError(f"{state_path} belongs to a run with other settings: {_settings_diff(st.get('config_key'), cfg)}; "
                         "resume with the run's settings, or start a new run (another --out)")
    r.semantics = st.get("semantics", 1)  # checked before training on (check_semantics)
    saved, now = st.get("inputs"), inputs_fingerprint(cfg, r)
    if isinstance(saved, dict):  # states from before they held it: the settings check only
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(f"{state_path} was written with other inputs under the same names: {', '.join(changed)} "
                             f"changed since (was {saved.get(changed[0])}, now {now[changed[0]]}); resuming would "
                             "mix them: start a new run (another --out), or put the old file back")
    with torch.no_grad():
        for n, p in r.params.items():
            p.copy_(st["params"][n])
    load_ema_weights(r.ema, r.params, st["ema"])
    r.opt.load_state_dict(st["optimizer"])
    r.sched.load_state_dict(st["scheduler"])
    r.history, r.best, r.start_epoch, r.elapsed = st["history"], st["best"], st["epoch"] + 1, st["elapsed"]
    r.saved_epoch = st["epoch"]
    log(f"resuming {state_path.parent} at epoch {r.start_epoch}")
    threads = st.get("intra_op_threads")
    if threads is not None and threads != torch.get_num_threads():
        log(f"note: {state_path} was written with {threads} intra-op threads, this process has "
            f"{torch.get_num_threads()}: float sums group differently, so the result can differ from an "
            f"uninterrupted run in the last bits (set OMP_NUM_THREADS={threads} to continue it to the bit)")


# --------------------------------------------------------------------------------------- reading
def prepare(model, e0s, method: str, rank: int, seed: int, source: str = "the E0s", adapter_options=None):
    """The base model set up for training or loading: ``e0s`` in, ``method`` applied (seeded, with
    the adapters' ``adapter_options``); returns the method's ``{parameter group: count}``."""
    set_e0s(model, e0s, source)
    return apply_method(model, method, rank=rank, seed=seed, **(adapter_options or {}))


def _read_checkpoint(path: pathlib.Path) -> dict:
    ckpt = safe_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file (found {got!r})")
    for key in ("method", "rank", "model", "base_fingerprint", "e0s", "trainable", "seed", "dtype"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} is missing the key {key!r} (corrupt or truncated)")
    if ckpt["dtype"] not in DTYPES:
        raise ValueError(f"checkpoint {path}: unknown dtype {ckpt['dtype']!r}")
    check_fields(ckpt, path)
    return ckpt


def read_checkpoint(checkpoint) -> dict:
    """The checkpoint's dict, read weights-only and checked as :func:`load_finetuned` reads it,
    without building the model (what a command can refuse before it spends seconds on that)."""
    return _read_checkpoint(pathlib.Path(checkpoint))


def _needs_same_base(ckpt: dict) -> bool:
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


def _is_missing_file(spec) -> bool:
    return isinstance(spec, str) and not spec.startswith(_NAMED_MODELS) and not os.path.exists(spec)


def base_files(ckpt: dict) -> tuple:
    """(model spec, model config) a checkpoint names: by absolute path, or where that file is gone (the
    project moved) as given at training, if that names a file from here."""
    spec, config = ckpt["model"], ckpt.get("model_config")
    given, given_config = ckpt.get("model_as_given"), ckpt.get("model_config_as_given")
    if _is_missing_file(spec) and given is not None and not _is_missing_file(given):
        spec = given
    if _is_missing_file(config) and given_config is not None and not _is_missing_file(given_config):
        config = given_config
    return spec, config


def load_finetuned(checkpoint, model: Optional[str] = None, model_config=None, dtype: Optional[str] = None,
                   trust_pickle: bool = False, device: str = "cpu"):
    """(model, checkpoint dict): the base model (``model`` overrides the spec stored in the
    checkpoint) set up with the checkpoint's method and loaded with its weights, on ``device``
    (:func:`~.device.resolve_device`: cpu, cuda, cuda:N or auto). Raises when the base model is not
    the one the checkpoint was trained on (fingerprint, or the checkpoint's own reference
    prediction, recomputed on ``device``), or the checkpoint is unreadable. The checkpoint is read
    with ``weights_only=True``; ``trust_pickle`` only concerns a whole pickled base model that the
    caller names (``model``): the base the checkpoint names is read weights-only, whatever
    ``trust_pickle`` says."""
    if dtype is not None and dtype not in DTYPES:  # torch.float32, "double", ...: the names the checkpoint stores
        raise ValueError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    path = pathlib.Path(checkpoint)
    ckpt = _read_checkpoint(path)
    spec, config = (model, model_config) if model else base_files(ckpt)
    try:  # a base the checkpoint names is never unpickled: a checkpoint cannot vouch for another file
        net = load_model(spec, config,
                         dtype=DTYPES[dtype or ckpt["dtype"]], trust_pickle=trust_pickle and model is not None,
                         unused_config="ignore",  # older checkpoints kept a --model-config that nothing read
                         head=ckpt.get("head"))
    except FileNotFoundError as exc:
        if model is not None:
            raise
        if not _is_missing_file(spec) and not _is_missing_file(config):  # a name that names nothing (builtin:x)
            raise FileNotFoundError(f"checkpoint {path} names the base model {spec!r}: {exc}") from None
        what = (f"the base model {spec!r}" if _is_missing_file(spec) else f"the base model's config {config!r}")
        raise FileNotFoundError(f"checkpoint {path} names {what}, which is not there ({exc}); if it was moved, name "
                                "it: --model PATH (and --model-config PATH for a bare state dict; API: model=..., "
                                "model_config=...); the weights are checked against the checkpoint's fingerprint") from None
    except UnsafeFileError:
        if model is not None:
            raise
        raise UnsafeFileError(f"checkpoint {path} names the base model {spec!r}, which only full unpickling reads "
                              "(it runs whatever code the file names); a base named by a checkpoint is never "
                              f"unpickled: if you trust that file, name it yourself: --model {spec} --trust-pickle "
                              "(API: model=..., trust_pickle=True)") from None
    fp = fingerprint(net)
    prepare(net, ckpt["e0s"], ckpt["method"], ckpt["rank"], ckpt["seed"], source=f"checkpoint {path}",
            adapter_options=ckpt.get("adapter_options"))
    if _needs_same_base(ckpt) and fp != ckpt["base_fingerprint"]:
        raise ValueError(f"checkpoint {path} was trained on base model {ckpt['model']!r} (fingerprint "
                         f"{ckpt['base_fingerprint']}), but {spec!r} has fingerprint {fp}: not the same weights")
    _load_tensors(net, ckpt, path, spec)
    net.to(dev)
    if "probe" in ckpt:
        verify_probe(net, ckpt["probe"], str(path), spec)
    return net.eval(), ckpt


def evaluate_checkpoint(checkpoint, data: str, model: Optional[str] = None, energy_key: Optional[str] = None,
                        forces_key: Optional[str] = None, batch_size: int = 50, dtype: Optional[str] = None,
                        trust_pickle: bool = False, checks: Optional[DataChecks] = None, device: str = "cpu",
                        stress_key: Optional[str] = None, stress: bool = True,
                        max_atoms: Optional[int] = EVAL_MAX_ATOMS) -> dict:
    """Errors of a fine-tuned checkpoint on a labelled data file (``path[@index]``), after the data
    checks of :mod:`.checks`, computed on ``device``; stress errors too for a checkpoint trained on
    stresses (labels under its key) or with ``stress_key`` (any checkpoint; periodic data with stress
    labels under that key). The loss is the run's (its ``w_energy``, ``w_forces``, ``w_stress``;
    checkpoints from before they held the first two: the defaults 1 and 1000). Warns
    (:class:`.e0s.E0OffsetWarning`) when frames have a composition outside the span of those the
    checkpoint's E0s were fitted on: their energy errors then include an unknown per-element offset.
    ``stress=False`` (``--no-stress``): no stress errors, also for a checkpoint trained on stresses
    (molecules, frames without stress labels). Batches of ``batch_size`` frames and at most
    ``max_atoms`` atoms (a larger frame alone; None: no limit), collated one at a time."""
    from .e0s import warn_outside_span

    check_batch_size(batch_size, max_atoms)
    ckpt = _read_checkpoint(pathlib.Path(checkpoint))
    ek, fk = energy_key or ckpt.get("energy_key", "REF_energy"), forces_key or ckpt.get("forces_key", "REF_forces")
    w_s = float(ckpt.get("w_stress", 0.0))
    if not stress and stress_key is not None:
        raise ValueError(f"--stress-key {stress_key} asks for stress errors, --no-stress (stress=False) for none")
    sk = (stress_key or (ckpt.get("stress_key", "REF_stress") if w_s > 0 else None)) if stress else None
    frames = read_frames(data, ek, fk, stress_key=sk)  # bad data is reported before the model is built
    check_mace_conventions(frames, str(data), ek, isolated=False)  # the loss it reports weighs frames
    warn_outside_span(ckpt.get("e0_span"), frames, str(data))
    net, ckpt = load_finetuned(checkpoint, model, dtype=dtype, trust_pickle=trust_pickle, device=device)
    z, r_max = model_info(net)
    checks, where, dtype, dev = checks or DataChecks(), str(data), next(net.parameters()).dtype, module_device(net)
    from ..integrations.mace import check_elements

    check_elements(frames, z, where)  # every frame's data first, so a bad frame stops the run before any evaluation
    check_labels(frames, where, ek, fk, sk)
    check_geometry(frames, where, r_max, checks)

    def batches():  # the graphs of one chunk at a time (frame_chunks), numbered as in the file
        for start, part in frame_chunks(frames, max(batch_size, 256), 16 * (max_atoms or EVAL_MAX_ATOMS)):
            graphs = checked_graphs(part, z, r_max, where, ek, fk, dtype=dtype, checks=checks, stress_key=sk,
                                    frame_numbers=range(start, start + len(part)))
            yield from iter_batches(graphs, batch_size, dev, max_atoms)

    res = errors(net, batches(), float(ckpt.get("w_energy", 1.0)),
                 float(ckpt.get("w_forces", 1000.0)), w_stress=w_s, stress=sk is not None)
    bad = sorted(k for k, v in res.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:  # weights that overflow (finite, absurd): no NaN result with exit 0
        raise ValueError(f"checkpoint {checkpoint} on {where}: non-finite errors "
                         f"({', '.join(bad)}): the model gives non-finite predictions (a corrupt or altered checkpoint?)")
    res["frames"] = len(frames)
    return res
