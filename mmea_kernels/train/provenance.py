"""What a run's result files record beyond its settings, for a reader who wants to reproduce them (a
reproducibility review): the versions of the packages that computed it, the intra-op threads (float
sums, and so the last bits of a full fine-tuning run, depend on them), the command line, each data
file's full SHA-256 and absolute path, the frames split off for validation, and which held-out frames
are not held out. Kept in ``metrics.json`` and ``checkpoint.pt`` (plain types: weights-only readable)."""
from __future__ import annotations

import os
import platform
import sys
from typing import Dict, Optional

import torch

__all__ = ["provenance", "overlap_counts", "data_hashes"]


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("mmea_kernels", "torch", "e3nn", "mace-torch", "sevenn", "cuequivariance-torch", "ase", "numpy",
                 "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    # the build (+cpu, +cu126), which the metadata may not carry; a plain str (TorchVersion is no
    # weights-only type: a checkpoint holding it would be refused)
    out["torch"] = str(torch.__version__)
    return out


def data_hashes(cfg) -> Dict[str, str]:
    """The full SHA-256 of each data file of ``cfg`` (``--train``, ``--valid``, ``--test``), read once
    per run: the record and every saved training state take theirs from it."""
    from ..integrations.files import file_sha256
    from .checks import split_spec

    return {opt: file_sha256(split_spec(spec)[0], 64)
            for opt, spec in (("--train", cfg.train), ("--valid", cfg.valid), ("--test", cfg.test)) if spec}


def provenance(cfg, split: Optional[dict] = None, overlap: Optional[dict] = None,
               hashes: Optional[Dict[str, str]] = None) -> dict:
    """The record of a run of ``cfg`` (:class:`~.config.FinetuneConfig`): versions, threads, command,
    data files (``hashes``: :func:`data_hashes`, read here when not given), ``split`` (the places of
    the validation frames within ``--train``'s selection, when they were split off it) and ``overlap``
    (:func:`overlap_counts`)."""
    from .checks import split_spec

    hashes = data_hashes(cfg) if hashes is None else hashes
    data = {}
    for opt, spec in (("--train", cfg.train), ("--valid", cfg.valid), ("--test", cfg.test)):
        if spec:
            path, selection = split_spec(spec)
            data[opt] = {"path": os.path.abspath(path), "selection": selection, "sha256": hashes[opt]}
    return {"versions": _versions(), "intra_op_threads": torch.get_num_threads(), "command": list(sys.argv),
            "data": data, "validation_split": split, "overlap": overlap or {}}


def overlap_counts(frames: dict, key) -> Dict[str, int]:
    """How many valid / test frames are training frames, and test frames validation frames (the same
    atoms and positions, ``key``: :func:`~.data.frame_key`); only the pairs that share frames."""
    train, valid = ({key(a) for a in frames[s]} for s in ("train", "valid"))
    counts = {"valid_in_train": sum(key(a) in train for a in frames["valid"]),
              "test_in_train": sum(key(a) in train for a in frames["test"]),
              "test_in_valid": sum(key(a) in valid for a in frames["test"])}
    return {k: v for k, v in counts.items() if v}
