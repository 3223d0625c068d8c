"""torchrun: the process group, the check that every process runs the same job, and what a run says
when another process stops.

A review (2026-12-03) found two ways to a wrong result that was reported as finished: an ``--out``
that only rank 0 saw (node-local scratch; on ``--resume auto`` rank 0 resumed at epoch 3 while rank 1
started again at epoch 1 from the initial weights, and their gradients were averaged), and a
different training file on one node (same frame count: exit 0). Now every process compares a summary
of its settings, data, starting epoch and weights with rank 0's before the first step
(:func:`check_inputs`, :func:`check_start`). A process that dies or hangs ended the others with "internal error" after
gloo's 30 minutes; now after :data:`TIMEOUT_ENV` seconds (default 600), with a message that says
which epoch ``state.pt`` holds (:func:`peer_failure`)."""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Optional

import torch

from .foundation import state_digest

__all__ = ["dist_setup", "dist_timeout", "check_inputs", "check_start", "peer_failure", "PeerFailed", "TIMEOUT_ENV"]

TIMEOUT_ENV = "MMEA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class PeerFailed(ConnectionError):
    """Another process of a torchrun run stopped, stopped answering, or never joined."""


def dist_timeout() -> float:
    """Seconds a process waits for the others (:data:`TIMEOUT_ENV`, default 600)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < 1e7):
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected the seconds a process of a torchrun run waits for the "
                         f"others, a number > 0 (default {DEFAULT_TIMEOUT_S:g})")
    return value


def dist_setup(device: torch.device = torch.device("cpu")):
    """(rank, world size); initialises torch.distributed under torchrun: NCCL when the run's
    ``device`` is a GPU (this process's, made current first), gloo on the CPU; each collective waits
    at most :func:`dist_timeout` seconds."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        timeout = dist_timeout()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:  # torch's DistStoreError / DistNetworkError: nobody (else) there
            where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}"
            raise PeerFailed(f"WORLD_SIZE={world}: the processes did not all join within {timeout:g} s ({where}; "
                             f"{_first_line(exc)}): a process that stopped before joining says why in its own error; "
                             "without torchrun (WORLD_SIZE left in the environment by another launcher?) unset "
                             f"WORLD_SIZE to run in one process ({TIMEOUT_ENV} sets the wait)") from exc
    return dist.get_rank(), dist.get_world_size()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


_PLACES = ("out_dir", "progress", "train", "valid", "test")  # where files are may differ by node; data: by content
_FILES = ("model", "e0s", "model_config")  # compared by content when they name files


def _settings(cfg) -> dict:
    from ..integrations.files import file_sha256
    from .checks import split_spec

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _PLACES}
    for k in _FILES:
        v = settings.get(k)
        if isinstance(v, str) and os.path.isfile(v):
            settings[k] = f"a file with sha256 {file_sha256(v, 64)[:16]}"
    settings["selections"] = [split_spec(s)[1] if s else None for s in (cfg.train, cfg.valid, cfg.test)]
    return settings


def _gather(world: int, mine: dict) -> list:
    import torch.distributed as dist

    every = [None] * world
    try:
        dist.all_gather_object(every, mine)
    except RuntimeError as exc:
        raise PeerFailed(f"another process of this torchrun run stopped (or did not answer within {dist_timeout():g} s, "
                         f"{TIMEOUT_ENV}) before the first step ({_first_line(exc)}); its own error says why") from exc
    return every


def check_inputs(cfg, data_sha: dict, frames: dict, world: int) -> None:
    """Every process's settings (not where its files are: data, model, E0 and config files by content)
    and data (SHA-256, frame counts per split) equal rank 0's; ``ValueError`` naming the first
    difference otherwise (raised on every process). Before the model is wrapped for DDP, whose own
    collectives failed first, with torch's message, on a setting that changes a parameter's shape."""
    if world <= 1:
        return
    every = _gather(world, {"settings": _settings(cfg), "data": {"sha256": dict(data_sha), "frames": dict(frames)}})
    first = every[0]
    for k, other in enumerate(every):
        if other["settings"] != first["settings"]:
            diff = sorted(n for n in first["settings"] if first["settings"][n] != other["settings"].get(n))
            shown = "; ".join(f"{n}: rank 0 {first['settings'][n]!r}, rank {k} {other['settings'].get(n)!r}"
                              for n in diff[:3])
            raise ValueError(f"the processes of this torchrun run have different settings ({shown}): start every "
                             "process with the same command")
        if other["data"] != first["data"]:
            raise ValueError(f"the processes of this torchrun run read different data (rank 0: {_data_text(first['data'])}; "
                             f"rank {k}: {_data_text(other['data'])}): every process must read the same files (a stale "
                             "copy on one node?)")


def check_start(r, world: int, state_path) -> None:
    """Every process starts at rank 0's epoch from rank 0's weights (after a resume: from the same
    ``state.pt``); ``ValueError`` otherwise (raised on every process)."""
    if world <= 1:
        return
    every = _gather(world, {"start": r.start_epoch, "weights": state_digest(r.model, exact=True)})
    first = every[0]
    for k, other in enumerate(every):
        if other["start"] != first["start"]:
            raise ValueError(f"rank 0 starts at epoch {first['start']} but rank {k} at epoch {other['start']}: "
                             f"{state_path} is not the same file for every process; --out must be one directory "
                             "that every process sees (rank 0 writes state.pt there and every process reads it "
                             "back on --resume), not node-local scratch")
        if other["weights"] != first["weights"]:
            raise ValueError(f"rank {k} starts from other weights than rank 0 (digest {other['weights']} vs "
                             f"{first['weights']}, epoch {first['start']}): the processes must load the same base "
                             f"model and {state_path}; --out must be one directory that every process sees")


def _data_text(d: dict) -> str:
    shas = ", ".join(f"{opt} {sha[:12]}" for opt, sha in d["sha256"].items())
    frames = ", ".join(f"{n} {split}" for split, n in d["frames"].items())
    return f"{frames} frames; sha256 {shas}"


def peer_failure(exc: BaseException, world: int, state_path, saved_epoch: int) -> Optional[PeerFailed]:
    """A :class:`PeerFailed` for ``exc`` when it is a collective that failed because another process
    stopped or stopped answering (gloo's or NCCL's error, torch's DistError), saying what ``state.pt``
    holds; None for any other error."""
    if world <= 1 or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    dist_error = getattr(torch.distributed, "DistError", ())
    if not (isinstance(exc, dist_error) or "gloo" in text.lower() or "nccl" in text.lower()):
        return None
    kept = (f"{state_path} holds epoch {saved_epoch}: run again (every process) with --resume to continue from it"
            if saved_epoch > 0 and os.path.exists(state_path) else
            "no training state was saved yet: start the run again")
    return PeerFailed(f"another process of this torchrun run stopped or stopped answering within "
                      f"{dist_timeout():g} s ({TIMEOUT_ENV}) ({_first_line(exc)}); {kept}")
