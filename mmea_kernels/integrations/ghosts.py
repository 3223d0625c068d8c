"""The graph LAMMPS' pair styles build on one process that owns every atom: pairs ``i -> j`` for every
neighbour within the cutoff, a neighbour in another periodic image being a *ghost atom* (one graph
node per image, numbered after the local atoms in order of first appearance). The emulations of
SevenNet's ``pair_style e3gnn/parallel`` and of LAMMPS' ML-IAP interface share it."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["one_process_graph"]


def one_process_graph(atoms, cutoff: float) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
    """``(src, dst, vec, owner)``: pair ends (int64; ``dst`` >= ``len(atoms)`` for a ghost), the
    vectors ``x_j - x_i`` (float64 numpy, images' positions included) and the atom each ghost is an
    image of."""
    from ase.neighborlist import neighbor_list

    i, j, shift = neighbor_list("ijS", atoms, cutoff)
    n = len(atoms)
    ghosts, owner = {}, []
    dst = np.empty(len(i), dtype=np.int64)
    for e, (jj, s) in enumerate(zip(j, map(tuple, shift))):
        if not any(s):
            dst[e] = jj
            continue
        if (jj, s) not in ghosts:
            ghosts[(jj, s)] = n + len(owner)
            owner.append(int(jj))
        dst[e] = ghosts[(jj, s)]
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    vec = pos[j] + shift @ np.asarray(atoms.get_cell(), dtype=np.float64) - pos[i]
    return (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(dst), vec,
            torch.as_tensor(owner, dtype=torch.int64))
