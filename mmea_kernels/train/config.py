"""The settings of a fine-tuning run (:class:`FinetuneConfig`), their checks, and the key that ties
a saved training state (``state.pt``) to the settings that shape the trajectory."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Optional, Union

import torch

from .checks import DataChecks
from .device import check_device_name
from .foundation import DEFAULT_MODEL
from .methods import ADAPTER_METHODS, METHODS

__all__ = ["FinetuneConfig", "DTYPES", "DEFAULT_LR", "config_key", "absolute_paths"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# learning rate when none is given: 1e-2 (mace-torch's), except plain MMEA, whose ablation
# (bench/ablation.py, 2026-11-29: xtb-small base, ethanol and toluene, two seeds) found 5e-3 better on
# validation on every molecule and seed (by 0.2-0.7 meV/Å force MAE) and no other setting that was
DEFAULT_LR = {"mmea": 5e-3}


@dataclasses.dataclass
class FinetuneConfig:
    train: str
    valid: Optional[str] = None
    test: Optional[str] = None
    out_dir: str = "runs/finetune"
    model: str = DEFAULT_MODEL
    model_config: Optional[str] = None
    head: Optional[str] = None  # a multi-head mace base: the head to fine-tune (None: its only one, or Default)
    method: str = "mmea"
    rank: int = 16
    adapter_options: dict = dataclasses.field(default_factory=dict)  # MMEA phi/init/init_std, ELoRA alpha
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    stress_key: str = "REF_stress"  # info key of the stress labels (eV/Å³), read when w_stress > 0
    dtype: str = "float64"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (train.device; the command line defaults to auto)
    e0s: str = "lstsq"  # lstsq | average | keep | path to a JSON {Z: eV}
    refit_e0s_after: bool = False  # re-fit the E0s with the trained model (lstsq on the training frames)
    epochs: int = 100
    batch_size: int = 5
    lr: Optional[float] = None  # None: DEFAULT_LR of the method, else 1e-2
    w_energy: float = 1.0
    w_forces: float = 1000.0
    w_stress: float = 0.0  # > 0: stresses of periodic frames in the loss and the metrics
    ema_decay: float = 0.99
    clip_grad: float = 10.0
    patience: int = 30
    plateau_patience: int = 5
    plateau_factor: float = 0.8
    valid_fraction: float = 0.1
    seed: int = 0
    # False: a new run (an existing state.pt is refused); True: continue from state.pt when out_dir has one,
    # else start (a finished run is finished again); "auto": the same, but a finished run with no epoch left
    # to train is left as it is (its metrics.json returned); the command line's plain --resume is True and
    # needs the state.pt, its --resume auto is "auto"
    resume: Union[bool, str] = False
    progress: bool = True
    eval_batch_size: int = 50
    stop_after: Optional[int] = None  # stop (resumably) after this many epochs in this call
    trust_pickle: bool = False  # allow a whole pickled base model (runs code from the file)
    fused_gate: bool = True  # SevenNet: FusedGate in place of e3nn's Gate (same numbers)
    min_distance: float = 0.1  # Å: closer atoms are refused (checks.DataChecks)
    max_neighbors: int = 500  # neighbours per atom within the cutoff
    allow_small_cells: bool = False  # accept periodic cells narrower than the cutoff

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.method, 1e-2)
        for name in _PATH_FIELDS:  # pathlib.Path and other os.PathLike as their str (settings are stored as JSON)
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    def _check_types(self) -> None:
        """``TypeError`` naming a setting of the wrong type (a string for a number, Atoms for a file)."""
        for name in _PATH_FIELDS:
            v = getattr(self, name)
            if not (v is None and name not in ("train", "out_dir") or isinstance(v, str)
                    or name == "model_config" and isinstance(v, dict)):
                raise TypeError(f"{name} must be a file path (str or pathlib.Path; data as 'path' or 'path@index'), "
                                f"got {type(v).__name__}" + ("; frames in memory: write them first with "
                                                             "ase.io.write(path, frames)" if isinstance(v, (list, tuple)) else ""))
        if not (self.head is None or isinstance(self.head, str)):
            raise TypeError(f"head must be the name of a head of the base model (str), got {self.head!r}")
        for name, kind in _NUMBER_FIELDS.items():
            v = getattr(self, name)
            ok = isinstance(v, numbers.Integral if kind is int else numbers.Real) and not isinstance(v, bool)
            if not ok and not (v is None and name == "stop_after"):
                raise TypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r} "
                                f"({type(v).__name__})")

    @property
    def stress(self) -> Optional[str]:
        """The stress label key when the run trains on stresses, else None."""
        return self.stress_key if self.w_stress > 0 else None

    def data_checks(self) -> DataChecks:
        return DataChecks(self.min_distance, self.max_neighbors, self.allow_small_cells)

    def _check_numbers(self) -> None:
        """The loss weights and the schedule's numbers (as the command line names them)."""
        for name in ("w_energy", "w_forces", "w_stress", "clip_grad"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}"
                                 + (" (0 turns clipping off)" if name == "clip_grad" else ""))
        if self.w_energy == 0 and self.w_forces == 0 and self.w_stress == 0:
            raise ValueError("--w-energy, --w-forces and --w-stress are all 0: the loss would have no term")
        for name in ("patience", "plateau_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 epochs, got {getattr(self, name)}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"--plateau-factor must be in (0, 1) (the learning rate is multiplied by it on a "
                             f"plateau), got {self.plateau_factor}")
        if not 0 < self.valid_fraction < 1:
            raise ValueError(f"--valid-fraction must be in (0, 1) (the share of the training frames held out "
                             f"for validation when there is no --valid), got {self.valid_fraction}")

    def check(self) -> None:
        self._check_types()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected float32 or float64")
        check_device_name(self.device)
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise ValueError(f"resume must be False, True or 'auto' (--resume auto), got {self.resume!r}")
        for name in ("epochs", "batch_size", "rank", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        self._check_numbers()
        if self.stress_key != _DEFAULT_STRESS_KEY:  # given (the API cannot tell the default given)
            check_stress_key(self.stress_key, self.w_stress)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.adapter_options:
            if self.method not in ADAPTER_METHODS:
                raise ValueError(f"adapter_options {self.adapter_options} given, but method {self.method!r} has no adapters")
            from ..nn import ADAPTERS

            known = ADAPTERS["elora" if self.method == "elora" else "mmea"].option_names
            bad = sorted(set(self.adapter_options) - set(known))
            if bad:
                raise ValueError(f"unknown adapter option(s) {bad} for method {self.method!r}; expected some of {list(known)}")
        self.data_checks()


# the settings that name files, and how absolute_paths reads each (out_dir is no setting of a run's key)
_PATH_KINDS = {"train": "data", "valid": "data", "test": "data", "model": "model", "model_config": "file", "e0s": "e0s"}
_PATH_FIELDS = (*_PATH_KINDS, "out_dir")
_NUMBER_FIELDS = {**dict.fromkeys(("epochs", "batch_size", "rank", "eval_batch_size", "patience", "plateau_patience",
                                   "seed", "max_neighbors", "stop_after"), int),
                  **dict.fromkeys(("lr", "w_energy", "w_forces", "w_stress", "clip_grad", "ema_decay", "plateau_factor",
                                   "valid_fraction", "min_distance"), float)}
_NAMED_MODELS = ("builtin:", "preset:", "mace-off:", "mace-mp:", "sevenn:")  # foundation.load_model's names
_E0_MODES = ("lstsq", "average", "keep")


def _absolute_path(spec, kind: str):
    """``spec`` with its file path made absolute (resolved against the working directory; ``./``,
    ``..``, repeated and trailing slashes normalised; symbolic links *not* followed: a requeued job
    whose data link points at a new scratch copy names the same setting, the files' SHA-256 being
    checked anyway); a data selection (``path@:50``), a named model (``builtin:``, ``mace-off:``, ...)
    and an E0 mode kept as they are."""
    if not isinstance(spec, str) or not spec or (kind == "model" and spec.startswith(_NAMED_MODELS)) \
            or (kind == "e0s" and spec in _E0_MODES):
        return spec
    from .checks import split_spec

    path = split_spec(spec)[0] if kind == "data" else spec
    return os.path.normpath(os.path.abspath(path)) + spec[len(path):]


def absolute_paths(settings: dict) -> dict:
    """``settings`` (:func:`config_key`'s fields) with the files named by absolute path (:func:`_absolute_path`),
    so that one file named relative in one run and absolute (or with ``./``) in the other is one setting."""
    return {k: _absolute_path(v, _PATH_KINDS[k]) if k in _PATH_KINDS else v for k, v in settings.items()}


_DEFAULT_STRESS_KEY = FinetuneConfig.stress_key


def check_stress_key(stress_key: str, w_stress: float) -> None:
    """``ValueError`` for a stress key given to a run that reads no stresses (a setting it would not use)."""
    if not w_stress > 0:
        raise ValueError(f"--stress-key {stress_key} names the stress labels of a run on stresses; with --w-stress "
                         f"{w_stress:g} stresses are not read: give --w-stress > 0, or leave it out")


def config_key(cfg: FinetuneConfig) -> str:
    """The settings that decide the training trajectory, as a string stored in ``state.pt``: a
    resumed run must have the same key."""
    d = dataclasses.asdict(cfg)
    if not d["adapter_options"]:  # runs from before the option existed keep their key
        d.pop("adapter_options")
    if d["head"] is None:  # and runs that chose no head (the setting came later)
        d.pop("head")
    if not d["w_stress"]:  # as do runs without stresses (the stress settings came later)
        d.pop("w_stress"), d.pop("stress_key")
    # settings that do not change the trajectory (and did not exist in earlier runs' state.pt) stay out; the
    # device changes it only by rounding, and a run may resume on another one
    for k in ("resume", "progress", "stop_after", "out_dir", "epochs", "eval_batch_size", "trust_pickle",
              "min_distance", "max_neighbors", "allow_small_cells", "fused_gate", "refit_e0s_after", "device"):
        d.pop(k)
    # the files by absolute path: only compared (a resume reads the files it is given and checks their SHA-256),
    # so a run resumed from another working directory, naming the same files, has the same key
    return json.dumps(absolute_paths(d), sort_keys=True)
