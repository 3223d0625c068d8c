"""The data of a fine-tuning run: labelled frames (:func:`read_frames`), the train / valid / test
splits and their checked graphs, and batches (shared out between data-parallel processes)."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .checks import checked_graphs

__all__ = ["read_frames", "read_splits", "split_graphs", "make_batches", "iter_batches", "overlap_note", "weights_note",
           "validation_split",
           "check_mace_conventions", "energy_weight",
           "EVAL_MAX_ATOMS", "check_batch_size", "frame_chunks"]


def read_frames(spec: str, energy_key: str, forces_key: str, labels: bool = True, stress_key=None) -> list:
    """Frames of an extended-XYZ file; ``path@index`` selects with ASE's index syntax
    (``data.xyz@:50``, ``data.xyz@50:100``). Every frame must carry both labels (and a stress under
    ``stress_key`` when given), finite (named in the error); an empty selection, a bad index or an
    unreadable file raise ``checks.DataError``."""
    from .checks import check_labels, read_structures

    frames = read_structures(spec)
    if labels:
        check_labels(frames, str(spec), energy_key, forces_key, stress_key)
    return frames


def _split_order(cfg, n: int):
    """(valid, train): the places in the training file's selection of the frames that go to each,
    when ``valid_fraction`` of them is split off (seeded)."""
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_va = max(1, int(round(cfg.valid_fraction * n)))
    if n_va >= n:
        raise ValueError(f"{cfg.train} has {n} frames: too few to split off a validation set")
    return [int(i) for i in perm[:n_va]], [int(i) for i in perm[n_va:]]


WEIGHT_KEYS = ("config_weight", "config_energy_weight", "config_forces_weight", "config_stress_weight")


def energy_weight(atoms) -> float:
    """A frame's energy loss weight as mace-torch reads it: ``config_weight`` x ``config_energy_weight``."""
    return float(atoms.info.get(WEIGHT_KEYS[0], 1.0)) * float(atoms.info.get(WEIGHT_KEYS[1], 1.0))


def check_mace_conventions(frames, where: str, energy_key: str, isolated: bool = True) -> None:
    """mace-torch's per-frame conventions that change what a frame means, checked before training:
    weights (:data:`WEIGHT_KEYS`, used by the loss as mace uses them) must be finite numbers >= 0;
    isolated-atom frames (one atom, ``config_type=IsolatedAtom``), which mace takes as E0s and does
    not train on, are refused with the ``--e0s`` file that says the same (``isolated``: training data;
    an evaluation evaluates them as frames)."""
    import json
    import math

    from .checks import DataError, read_label

    for i, a in enumerate(frames):
        for key in WEIGHT_KEYS:
            v = a.info.get(key)
            if v is not None and (isinstance(v, (bool, str)) or not isinstance(v, (int, float, np.number))
                                  or not math.isfinite(float(v)) or float(v) < 0):
                shown = float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else repr(v)
                raise DataError(f"{where}: frame {i}: {key}={shown}; a weight must be a finite number >= 0")
    iso = [(i, a) for i, a in enumerate(frames) if isolated and len(a) == 1 and a.info.get("config_type") == "IsolatedAtom"]
    if iso:
        e0s = {str(int(a.numbers[0])): read_label(a, "energy", energy_key)[0] for _, a in iso}
        raise DataError(
            f"{where}: frames {', '.join(str(i) for i, _ in iso[:8])}{' ...' if len(iso) > 8 else ''} are isolated atoms "
            f"(config_type=IsolatedAtom): mace-torch takes their energies as E0s and does not train on them. Take "
            f"them out of the file and give the energies with --e0s FILE.json, the file holding "
            f"{json.dumps(e0s)} (or mark them with another config_type to train on them as frames)")


def weights_note(frames: Dict[str, list]) -> str:
    """A line on the frames whose loss weights (:data:`WEIGHT_KEYS`) are not all 1; '' when none."""
    parts = []
    for split, fr in frames.items():
        n = sum(any(float(a.info.get(k, 1.0)) != 1.0 for k in WEIGHT_KEYS) for a in fr)
        if n:
            parts.append(f"{n} of {len(fr)} {split} frames")
    return (f"note: {' and '.join(parts)} carry loss weights other than 1 ({', '.join(WEIGHT_KEYS)}): the loss "
            "weighs their terms as mace-torch does; the errors count every frame alike") if parts else ""


def read_splits(cfg) -> Dict[str, list]:
    """``{"train", "valid", "test": frames}`` of a :class:`~.config.FinetuneConfig`; without a
    validation file, a seeded ``valid_fraction`` of the training frames. Each file is checked for
    mace-torch's per-frame conventions (:func:`check_mace_conventions`)."""
    train_frames = read_frames(cfg.train, cfg.energy_key, cfg.forces_key, stress_key=cfg.stress)
    check_mace_conventions(train_frames, str(cfg.train), cfg.energy_key)
    if cfg.valid:
        valid_frames = read_frames(cfg.valid, cfg.energy_key, cfg.forces_key, stress_key=cfg.stress)
        check_mace_conventions(valid_frames, str(cfg.valid), cfg.energy_key)
    else:
        va, tr = _split_order(cfg, len(train_frames))
        valid_frames = [train_frames[i] for i in va]
        train_frames = [train_frames[i] for i in tr]
    test_frames = read_frames(cfg.test, cfg.energy_key, cfg.forces_key, stress_key=cfg.stress) if cfg.test else []
    check_mace_conventions(test_frames, str(cfg.test), cfg.energy_key)
    return {"train": train_frames, "valid": valid_frames, "test": test_frames}


def frame_key(a) -> bytes:
    """Atoms and positions (rounded to 1e-6 Å) of a frame: equal for the same geometry written twice."""
    pos = np.round(np.asarray(a.positions, dtype=np.float64), 6) + 0.0  # + 0.0: -0.0 and 0.0 are one position
    return a.numbers.astype(np.int64).tobytes() + pos.tobytes()


def overlap_note(cfg, frames: Dict[str, list], counts: Dict[str, int]) -> str:
    """A line naming the validation / test frames that are training frames too, and the test frames
    that are validation frames (same atoms and positions; ``counts``: :func:`.provenance.overlap_counts`):
    their errors are then not held-out errors (validation picks the best epoch). '' when there are none."""
    src = {"valid": cfg.valid or f"split off {cfg.train}", "test": cfg.test}
    clauses = []
    for other, what in (("train", "training"), ("valid", "validation")):
        parts = [f"{counts[f'{split}_in_{other}']} of {len(frames[split])} {split} frames ({src[split]})"
                 for split in ("valid", "test") if counts.get(f"{split}_in_{other}")]
        if parts:
            clauses.append(f"{' and '.join(parts)} are also {what} frames")
    if not clauses:
        return ""
    return f"note: {'; '.join(clauses)} (same atoms and positions): their errors are not held-out errors"


def validation_split(cfg, frames: Dict[str, list]):
    """The places within ``--train``'s selection of the frames split off for validation (seeded; they
    depend on the order of the frames in the file), or None with a validation file."""
    if cfg.valid:
        return None
    return {"from": str(cfg.train), "seed": cfg.seed, "valid_fraction": cfg.valid_fraction,
            "positions": sorted(_split_order(cfg, len(frames["train"]) + len(frames["valid"]))[0])}


def split_graphs(cfg, frames: Dict[str, list], z, r_max: float, dtype) -> Dict[str, list]:
    """The graphs of every split, after the data checks (:mod:`.checks`); their messages number the
    frames as in the file (selection) they came from, also those of a split-off validation set."""
    numbers = {"train": None, "valid": None, "test": None}
    if not cfg.valid:  # frames["train"] and ["valid"] are the training file's, shuffled (read_splits)
        numbers["valid"], numbers["train"] = _split_order(cfg, len(frames["train"]) + len(frames["valid"]))
    return {split: checked_graphs(frames[split], z, r_max, str(src), cfg.energy_key, cfg.forces_key, dtype=dtype,
                                  checks=cfg.data_checks(), stress_key=cfg.stress, frame_numbers=numbers[split])
            for split, src in (("train", cfg.train), ("valid", cfg.valid or cfg.train), ("test", cfg.test))}


def make_batches(graphs, size, order=None, rank: int = 0, world: int = 1, device="cpu"):
    """Batches of ``size`` graphs in ``order``, on ``device``; with ``world`` processes, process
    ``rank`` gets its share (every ``world``-th graph) of each global batch. A process whose share
    of a short last batch is empty gets the batch's first graph marked ``_dummy`` (its loss counts
    zero; it still takes part in the gradient average), so no frame is left out."""
    from ..integrations.mace import collate

    idx = list(range(len(graphs))) if order is None else list(order)
    out = []
    for k in range(0, len(idx), size):
        full = idx[k:k + size]
        mine = full[rank::world]
        b = collate([graphs[i] for i in (mine or full[:1])], device)
        b["_global"] = (len(full), sum(int(graphs[i].num_nodes) for i in full))
        if not mine:
            b["_dummy"] = True
        out.append(b)
    return out


# atoms in one evaluation batch (evaluate, predict): a MACE forward + force backward holds of the order of
# a megabyte per atom in float64, so 50 frames of a 2,000-atom cell in one batch would need ~100 GB
EVAL_MAX_ATOMS = 4096


def check_batch_size(batch_size, max_atoms) -> None:
    """``ValueError`` naming ``--batch-size`` / ``--max-batch-atoms`` unless whole numbers >= 1 (the
    latter may be None: no limit)."""
    for option, v in (("--batch-size", batch_size), ("--max-batch-atoms", max_atoms)):
        if v is None and option == "--max-batch-atoms":
            continue
        whole = isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer())
        if isinstance(v, bool) or not whole or v < 1:
            raise ValueError(f"{option} must be a whole number >= 1, got {v!r}")


def iter_batches(graphs, size: int, device="cpu", max_atoms: Optional[int] = EVAL_MAX_ATOMS):
    """Batches of consecutive ``graphs`` for evaluation, collated one at a time (never all held): at most
    ``size`` graphs and, with ``max_atoms``, at most that many atoms (a graph larger than that alone)."""
    from ..integrations.mace import collate

    group, atoms = [], 0
    for g in graphs:
        n = int(g.num_nodes)
        if group and (len(group) == size or (max_atoms is not None and atoms + n > max_atoms)):
            yield collate(group, device)
            group, atoms = [], 0
        group.append(g)
        atoms += n
    if group:
        yield collate(group, device)


def frame_chunks(frames, max_frames: int = 256, max_atoms: int = 16 * EVAL_MAX_ATOMS):
    """``(start, frames)``: consecutive pieces of at most ``max_frames`` frames and ``max_atoms`` atoms
    (a larger frame alone), whose graphs are built and evaluated before the next's (``evaluate``,
    ``predict``: a file's graphs are never all held, about 5 KB per atom)."""
    start, atoms = 0, 0
    for i, a in enumerate(frames):
        if i > start and (i - start == max_frames or atoms + len(a) > max_atoms):
            yield start, frames[start:i]
            start, atoms = i, 0
        atoms += len(a)
    if start < len(frames):
        yield start, frames[start:]
