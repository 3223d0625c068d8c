"""Which device a run uses: ``--device auto | cpu | cuda | cuda:N`` (:func:`resolve_device`).

``auto`` is the GPU where torch sees one, else the CPU. Under ``torchrun`` every process takes the
GPU of its ``LOCAL_RANK`` (``cuda`` or ``auto``); an explicit ``cuda:N`` would put every process of a
node on one GPU, which NCCL refuses, so it is an error there (not with one process per node). A device that does not exist is an error that
says why (a CPU-only torch build, no GPU visible, an index past the last GPU), never a silent CPU run.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

__all__ = ["DEVICES_HELP", "check_device_name", "resolve_device", "module_device"]

DEVICES_HELP = "auto (the GPU where there is one, else the CPU), cpu, cuda or cuda:N"
_FORM = re.compile(r"^(?:auto|cpu|cuda(?::\d+)?)$")


def _no_cuda(spec: str) -> ValueError:
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        why = f"torch (CUDA {torch.version.cuda}) sees no GPU (driver, CUDA_VISIBLE_DEVICES?)"
    return ValueError(f"device {spec!r} asked for, but {why}; use --device cpu (or auto)")


def check_device_name(spec: str) -> str:
    """``spec`` normalised (lower case, stripped); ``ValueError`` naming it when it is none of the forms."""
    text = str(spec).strip().lower()
    if not _FORM.match(text):
        raise ValueError(f"unknown device {spec!r}; expected {DEVICES_HELP}")
    return text


def resolve_device(spec: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """The ``torch.device`` of ``spec`` (see the module docstring). ``local_rank``: this process's
    ``LOCAL_RANK`` under ``torchrun`` (read from the environment when ``WORLD_SIZE > 1`` and not
    given). Raises ``ValueError`` naming the problem."""
    kind, _, index = check_device_name(spec).partition(":")
    if local_rank is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise _no_cuda(str(spec))
    count = torch.cuda.device_count()
    if index and local_rank is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "2") or 2) > 1:
        raise ValueError(f"device {spec!r} under torchrun would put every process of a node on one GPU; pass --device "
                         "cuda (each process takes the GPU of its LOCAL_RANK)")
    k = int(index) if index else (local_rank or 0)
    if k >= count:
        what = f"device {spec!r}" if index else f"process LOCAL_RANK {k}"
        hint = "" if index else (f": start at most {count} process(es) per node (torchrun --nproc_per_node), or pass "
                                 "--device cpu")
        raise ValueError(f"{what}: torch sees {count} GPU(s) (cuda:0..cuda:{count - 1}){hint}")
    return torch.device("cuda", k)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
