"""What keeps a fine-tuning run from leaving wrong or half-done results: a non-finite loss, gradient
or weight stops training before anything of that epoch is saved (``state.pt`` keeps the last good
epoch and stays resumable); an output directory the run created is removed again when the run
fails before writing anything into it; the interrupt message says what was really saved."""
from __future__ import annotations

import math
import pathlib
from typing import Iterable, List, Optional

import torch

__all__ = ["TrainingDiverged", "check_finite", "check_finite_tensors", "created_dirs", "remove_created_dirs",
           "interrupt_message"]


class TrainingDiverged(ValueError):
    """The loss, a gradient or a weight became NaN or infinite."""


def _kept(state_path: pathlib.Path, saved_epoch: int) -> str:
    if saved_epoch > 0 and state_path.exists():
        return (f"{state_path} keeps epoch {saved_epoch}, the last good state (resumable with --resume); "
                "nothing of the failed epoch was saved")
    return "no training state was saved (it failed before the first epoch ended)"


def check_finite(value: float, what: str, epoch: int, batch: Optional[int], state_path: pathlib.Path,
                 saved_epoch: int) -> None:
    """Raise :class:`TrainingDiverged` when ``value`` (a loss or a gradient norm) is NaN or infinite."""
    if math.isfinite(value):
        return
    where = f"epoch {epoch}" + (f", batch {batch}" if batch is not None else "")
    raise TrainingDiverged(f"training stopped: {what} is {value} in {where}; {_kept(state_path, saved_epoch)}. "
                           "Check the data, or start a new run with a lower --lr or --clip-grad")


def check_finite_tensors(named: Iterable, what: str, epoch: int, state_path: pathlib.Path, saved_epoch: int) -> None:
    """Raise :class:`TrainingDiverged` naming the first non-finite tensor of ``named`` ((name, tensor) pairs)."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingDiverged(f"training stopped: {what} {name} became non-finite in epoch {epoch}; "
                                   f"{_kept(state_path, saved_epoch)}. Check the data, or start a new run with a "
                                   "lower --lr")


def created_dirs(out: pathlib.Path) -> List[pathlib.Path]:
    """The directories ``out.mkdir(parents=True)`` would create, deepest first."""
    made, p = [], pathlib.Path(out).absolute()
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    return made


def remove_created_dirs(made: List[pathlib.Path]) -> None:
    """Remove the directories of :func:`created_dirs` that are (still) empty, deepest first."""
    for d in made:
        try:
            d.rmdir()
        except OSError:  # not empty (something was written) or already gone
            return


def interrupt_message(epoch: int, state_path: pathlib.Path, saved_epoch: int) -> str:
    if saved_epoch > 0 and state_path.exists():
        return (f"interrupted in epoch {epoch}; {state_path} holds epoch {saved_epoch}: run again with --resume "
                "to continue")
    return f"interrupted in epoch {epoch}, before any epoch finished: no state was saved, nothing to resume"
