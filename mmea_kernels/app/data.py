"""Where the data comes from: the rMD17 splits beside the project (configurable), extended-XYZ
reading with label checks, and a small self-made labelled set for machines without either."""
from __future__ import annotations

import os
import pathlib
from typing import Optional, Sequence

import numpy as np

__all__ = ["find_rmd17", "read_xyz", "toy_molecules"]

_REPO = pathlib.Path(__file__).resolve().parents[2]


def find_rmd17(path: Optional[str] = None, molecules: Sequence[str] = ("ethanol",)) -> Optional[pathlib.Path]:
    """The rMD17 directory holding ``<molecule>/train.xyz`` for every one of ``molecules``:
    ``path``, else ``$MMEA_RMD17_DIR``, else ``../shared/data/rmd17`` next to the repository or the
    working directory. ``None`` when none exists; an explicit ``path`` without them raises, naming
    the missing molecules and the ones it has."""
    molecules = tuple(molecules)
    cands = [path] if path is not None else [os.environ.get("MMEA_RMD17_DIR"), _REPO.parent / "shared" / "data" / "rmd17",
                                              pathlib.Path.cwd().parent / "shared" / "data" / "rmd17"]
    for c in cands:
        if c and all((pathlib.Path(c) / m / "train.xyz").is_file() for m in molecules):
            return pathlib.Path(c)
    if path is not None:
        p = pathlib.Path(path)
        missing = [m for m in molecules if not (p / m / "train.xyz").is_file()]
        have = sorted(d.name for d in p.iterdir() if (d / "train.xyz").is_file()) if p.is_dir() else []
        raise FileNotFoundError(f"no rMD17 splits for {', '.join(missing)} at {path} (expected {path}/<molecule>/"
                                f"train.xyz; it has {', '.join(have) or 'none'})")
    return None


def read_xyz(path, index=":", energy_key: str = "REF_energy", forces_key: str = "REF_forces") -> list:
    """Frames of an extended-XYZ file, each checked for finite energy and forces labels
    (:func:`checks.read_structures`, :func:`checks.check_labels`: errors name file, frame and key)."""
    from ..train.checks import check_labels, read_structures

    spec = f"{path}@{index}" if str(index) not in ("", ":") else str(path)
    frames = read_structures(spec)
    check_labels(frames, spec, energy_key, forces_key)
    return frames


# Equilibrium-like geometries (Å) of two rMD17 molecules, for the self-made fallback set.
_GEOMETRIES = {
    "ethanol": ("CCOHHHHHH", [
        (-0.433, 0.031, 0.353), (-0.308, 1.058, -0.793), (0.675, -0.958, 0.448), (-0.268, 0.418, 1.367),
        (-1.407, -0.447, 0.100), (-0.990, 1.870, -0.580), (0.654, 1.529, -0.846), (-0.502, 0.592, -1.789),
        (0.633, -1.726, -0.122)]),
    "toluene": ("CCCCCCCHHHHHHHH", [
        (2.419, -0.198, 0.168), (0.936, -0.060, 0.125), (0.391, 1.095, -0.466), (-0.976, 1.147, -0.618),
        (-1.849, 0.252, 0.005), (-1.295, -0.996, 0.387), (0.043, -1.209, 0.391), (2.912, -0.232, -0.823),
        (2.929, 0.523, 0.735), (2.806, -1.146, 0.675), (1.010, 1.935, -0.783), (-1.377, 2.023, -1.193),
        (-2.984, 0.378, -0.062), (-1.943, -1.828, 0.600), (0.433, -2.137, 0.772)]),
}


def toy_molecules(molecule: str, n: int, level: str = "A", seed: int = 0, sigma: float = 0.06) -> list:
    """``n`` jittered copies of a built-in geometry labelled with a Morse pair potential.

    Two parameter sets, ``level="A"`` and ``"B"``, stand in for two levels of theory. Energies
    (eV) and forces (eV/Å, exact gradients) are stored under ``REF_energy`` / ``REF_forces``."""
    import ase
    import torch

    if molecule not in _GEOMETRIES:
        raise ValueError(f"no built-in geometry for {molecule!r}; have {sorted(_GEOMETRIES)}")
    symbols, pos0 = _GEOMETRIES[molecule]
    rng = np.random.default_rng(seed)
    base = ase.Atoms(symbols, positions=pos0)
    z = torch.tensor(base.numbers)
    depth = {"A": 4.0, "B": 4.4}[level]
    width = {"A": 1.8, "B": 1.6}[level]
    r0 = (torch.tensor([0.0, 0.31, 0, 0, 0, 0, 0.76, 0, 0.66], dtype=torch.float64))[z]  # covalent radii
    frames = []
    for _ in range(n):
        pos = torch.tensor(pos0, dtype=torch.float64) + torch.tensor(rng.normal(0, sigma, (len(z), 3)))
        pos.requires_grad_(True)
        i, j = torch.triu_indices(len(z), len(z), 1)
        d = (pos[i] - pos[j]).norm(dim=-1)
        req = r0[i] + r0[j]
        e = (depth * (1 - torch.exp(-width * (d - req))) ** 2 - depth).sum() - 0.5 * len(z)
        (g,) = torch.autograd.grad(e, pos)
        a = base.copy()
        a.positions = pos.detach().numpy()
        a.info["REF_energy"] = float(e.detach())
        a.arrays["REF_forces"] = (-g).numpy()
        frames.append(a)
    return frames
