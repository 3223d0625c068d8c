"""mace-torch helpers: build ScaleShiftMACE models by preset, turn ASE atoms into MACE batches,
evaluate energies and forces. Imports mace lazily (it is an optional dependency)."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = ["MACEConfig", "PRESETS", "build_mace", "atoms_to_graphs", "collate", "atoms_to_batch",
           "energy_and_forces", "BatchCache", "centred", "molecule_neighbourhood"]


@dataclasses.dataclass
class MACEConfig:
    """The architecture of a ``ScaleShiftMACE`` (the fields mace-torch's CLI exposes)."""

    atomic_numbers: Sequence[int] = (1, 6, 8)
    hidden_irreps: str = "128x0e+128x1o"
    mlp_irreps: str = "16x0e"
    r_max: float = 5.0
    num_bessel: int = 8
    num_polynomial_cutoff: int = 5
    max_ell: int = 3
    correlation: int = 3
    num_interactions: int = 2
    radial_mlp: Sequence[int] = (64, 64, 64)
    avg_num_neighbors: float = 10.0
    atomic_energies: Optional[Sequence[float]] = None
    scale: float = 1.0
    shift: float = 0.0
    # mace-torch builds the symmetric-contraction basis with cuequivariance's reduced CG whenever
    # cuequivariance is importable (fewer weights), else with e3nn's: pin the choice so that a saved
    # model rebuilds with the same shapes in every environment. False = e3nn's basis.
    use_reduced_cg: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["atomic_numbers"] = list(d["atomic_numbers"])
        d["radial_mlp"] = list(d["radial_mlp"])
        if d["atomic_energies"] is not None:
            d["atomic_energies"] = [float(e) for e in d["atomic_energies"]]
        return d


PRESETS: Dict[str, MACEConfig] = {
    # The MACE-OFF23-medium architecture (elements restricted to H, C, O).
    "mace-off23-medium": MACEConfig(),
    # Small enough for float64 tests and CPU demos.
    "tiny": MACEConfig(hidden_irreps="8x0e+8x1o", mlp_irreps="8x0e", max_ell=2, correlation=2,
                       radial_mlp=(16, 16), num_bessel=6),
    # The project's own pretrained model (mmea_kernels/assets/mace-xtb-small.pt, scripts/pretrain.py):
    # H, C, N, O; small enough to fine-tune on 2 CPU cores.
    "xtb-small": MACEConfig(atomic_numbers=(1, 6, 7, 8), hidden_irreps="32x0e+32x1o", mlp_irreps="16x0e",
                            max_ell=2, correlation=3, radial_mlp=(32, 32, 32), num_bessel=8),
}


def build_mace(config="tiny", **overrides):
    """A ``mace.modules.ScaleShiftMACE`` from a preset name or :class:`MACEConfig` (plus overrides)."""
    from e3nn import o3
    from mace import modules

    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown MACE preset {config!r}; expected one of {sorted(PRESETS)}")
        config = PRESETS[config]
    cfg = dataclasses.replace(config, **overrides)
    z = list(cfg.atomic_numbers)
    e0 = np.zeros(len(z)) if cfg.atomic_energies is None else np.asarray(cfg.atomic_energies, dtype=float)
    if len(e0) != len(z):
        raise ValueError(f"{len(e0)} atomic energies for {len(z)} elements {z}")
    return modules.ScaleShiftMACE(
        r_max=cfg.r_max, num_bessel=cfg.num_bessel, num_polynomial_cutoff=cfg.num_polynomial_cutoff,
        max_ell=cfg.max_ell,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=cfg.num_interactions, num_elements=len(z), hidden_irreps=o3.Irreps(cfg.hidden_irreps),
        MLP_irreps=o3.Irreps(cfg.mlp_irreps), atomic_energies=e0, avg_num_neighbors=cfg.avg_num_neighbors,
        atomic_numbers=z, correlation=cfg.correlation, gate=torch.nn.functional.silu,
        radial_MLP=list(cfg.radial_mlp), radial_type="bessel", atomic_inter_scale=cfg.scale,
        atomic_inter_shift=cfg.shift, use_reduced_cg=cfg.use_reduced_cg,
    )


def check_elements(atoms_list: Sequence, atomic_numbers: Sequence[int], where: str = "the data",
                   frame_numbers: Optional[Sequence[int]] = None) -> None:
    """Raise, listing them and the first frame and atom with one (``frame_numbers``: the frames' numbers
    in the user's selection), if ``atoms_list`` holds elements outside ``atomic_numbers``."""
    from ase.data import chemical_symbols

    known = set(int(z) for z in atomic_numbers)
    unknown = sorted({int(z) for a in atoms_list for z in a.numbers} - known)
    if unknown:
        names = lambda zs: ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in zs)  # noqa: E731
        frame, atom = next((i, j) for i, a in enumerate(atoms_list) for j, z in enumerate(a.numbers) if z in unknown)
        told = (f"knows elements {names(sorted(known))}" if len(known) <= 20 else
                f"knows {len(known)} elements (Z {min(known)}..{max(known)}), not these")
        n = frame if frame_numbers is None else frame_numbers[frame]
        raise ValueError(f"{where}: frame {n}: atom {atom} is {names([int(atoms_list[frame].numbers[atom])])}; the data "
                         f"contains {names(unknown)}, which the model has no weights for (it {told})")


def atoms_to_graphs(atoms_list: Sequence, atomic_numbers: Sequence[int], r_max: float,
                    energy_key: str = "REF_energy", forces_key: str = "REF_forces",
                    dtype: Optional[torch.dtype] = None, where: str = "the data",
                    stress_key: Optional[str] = None) -> list:
    """One mace ``AtomicData`` graph per ASE ``Atoms`` (labels read from ``info[energy_key]`` and
    ``arrays[forces_key]``, and ``info[stress_key]`` when given, where present). Raises naming the
    elements the model does not know."""
    from mace import data, tools
    from mace.data.utils import KeySpecification

    check_elements(atoms_list, atomic_numbers, where)
    info = {"energy": energy_key} if stress_key is None else {"energy": energy_key, "stress": stress_key}
    keys = KeySpecification(info_keys=info, arrays_keys={"forces": forces_key})
    z_table = tools.AtomicNumberTable([int(z) for z in atomic_numbers])
    from .default_dtype import default_dtype

    with default_dtype(dtype):  # mace builds in the default dtype: set under a lock (threads), put back
        return [data.AtomicData.from_config(data.config_from_atoms(centred(a), key_specification=keys),
                                            z_table=z_table, cutoff=float(r_max)) for a in atoms_list]


def centred(atoms):
    """``atoms`` itself, or for a structure periodic in no direction a copy (calculator and labels kept)
    moved to put the mean of its positions at the origin: energies and forces do not change, and a
    molecule far from the origin keeps float32's precision (its edge vectors were differences of
    large float32 positions: force errors grew to 1.6e-2 eV/Å at 1e4 Å)."""
    if np.asarray(atoms.pbc, dtype=bool).any():
        return atoms
    moved = atoms.copy()
    moved.calc = atoms.calc
    moved.positions = atoms.positions - atoms.positions.mean(axis=0)
    return moved


def molecule_neighbourhood(positions: np.ndarray, cutoff: float):
    """mace's ``get_neighborhood`` for a structure periodic in no direction (``positions`` centred):
    the same edges (sender, receiver; every pair closer than ``cutoff``, both ways, sorted by sender
    then receiver), zero shifts and mace's cell, from a k-d tree rather than matscipy's bins over mace's
    vacuum box of 5 cutoffs per Å of extent, whose cost grew with the extent (seconds a call for a
    molecule flying apart in MD, 5 s for 9 atoms spread over 500 Å) and is 3-20x a k-d tree's anyway."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(positions).query_pairs(cutoff, output_type="ndarray")  # (P, 2) int64, i < j, distance <= cutoff
    i, j = pairs[:, 0], pairs[:, 1]
    keep = np.linalg.norm(positions[j] - positions[i], axis=1) < cutoff  # matscipy's strict bound
    sender, receiver = np.concatenate([i[keep], j[keep]]), np.concatenate([j[keep], i[keep]])
    order = np.lexsort((receiver, sender))
    edge_index = np.stack((sender[order], receiver[order])).astype(np.int64)
    cell = np.identity(3) * ((np.max(np.abs(positions)) + 1) * 5 * cutoff)
    zeros = np.zeros((edge_index.shape[1], 3))
    return edge_index, zeros, zeros.copy(), cell


def collate(graphs: Sequence, device="cpu") -> dict:
    """A MACE input dict from a list of ``AtomicData`` graphs."""
    from mace.tools import torch_geometric

    batch = torch_geometric.batch.Batch.from_data_list(list(graphs))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.to_dict().items()}


def atoms_to_batch(atoms_list: Sequence, atomic_numbers: Sequence[int], r_max: float,
                   energy_key: str = "REF_energy", forces_key: str = "REF_forces",
                   device="cpu", dtype: Optional[torch.dtype] = None) -> dict:
    """One MACE input dict for a list of ASE ``Atoms`` (see :func:`atoms_to_graphs`)."""
    return collate(atoms_to_graphs(atoms_list, atomic_numbers, r_max, energy_key, forces_key, dtype), device)


class BatchCache:
    """The one-frame MACE input dict of each structure in a sequence with the same atoms (an MD run,
    a relaxation), equal tensor for tensor to ``atoms_to_batch([atoms], ...)`` (a molecule: its edges possibly in another order) at a fraction of its
    host cost: the first frame (and any frame whose elements or pbc differ from the one before) goes
    through mace's ``AtomicData.from_config`` and ``Batch``; the others only get a new neighbour list
    (mace's ``get_neighborhood``, which ``from_config`` calls; a k-d tree for a molecule,
    :func:`molecule_neighbourhood`: the same edges) and the tensors that follow from the
    geometry (positions, edges, shifts, cell, its volume and reciprocal), the label placeholders and
    one-hot attributes being reused. Measured by hand: 0.84 -> 0.15 ms per 21-atom frame
    (``bench/md_step.py`` times whole MD steps, docs/benchmarks.md)."""

    _GEOMETRY = ("positions", "edge_index", "shifts", "unit_shifts", "cell", "volume", "rcell")

    def __init__(self, atomic_numbers: Sequence[int], r_max: float, device="cpu", dtype: Optional[torch.dtype] = None):
        self.z, self.r_max, self.device, self.dtype = list(atomic_numbers), float(r_max), device, dtype
        self._key, self._template = None, None

    def __call__(self, atoms) -> dict:
        from mace.data.neighborhood import get_neighborhood

        key = (np.asarray(atoms.numbers).tobytes(), tuple(bool(p) for p in atoms.pbc))
        if key != self._key:
            self._template = atoms_to_batch([atoms], self.z, self.r_max, energy_key="__none__",
                                            forces_key="__none__", device=self.device, dtype=self.dtype)
            self._key = key
        dt = self._template["positions"].dtype
        positions = atoms.get_positions()
        if any(key[1]):
            edge_index, shifts, unit_shifts, cell = get_neighborhood(
                positions=positions, cutoff=self.r_max, pbc=key[1], cell=np.array(atoms.get_cell()))
        else:  # a molecule: centred as atoms_to_graphs does (centred()), so float32 keeps its precision
            positions = positions - positions.mean(axis=0)
            edge_index, shifts, unit_shifts, cell = molecule_neighbourhood(positions, self.r_max)
        cell_t = torch.tensor(cell, dtype=dt)
        volume = torch.linalg.det(cell_t)
        rcell = 2 * torch.pi * torch.linalg.inv(cell_t.mT) if torch.abs(volume) > 0 else torch.zeros(3, 3, dtype=dt)
        geometry = (torch.tensor(positions, dtype=dt), torch.tensor(edge_index, dtype=torch.long),
                    torch.tensor(shifts, dtype=dt), torch.tensor(unit_shifts, dtype=dt), cell_t, volume.reshape(1),
                    rcell)
        out = dict(self._template)
        out.update({k: v.to(self.device) for k, v in zip(self._GEOMETRY, geometry)})
        return out


def energy_and_forces(model, batch: dict, training: bool = False):
    """(energies ``[B]``, forces ``[N, 3]``) of a MACE model on a batch dict (forces = -dE/dr,
    with ``create_graph=training`` so a loss on them can be differentiated)."""
    out = model(dict(batch), training=training, compute_force=True)
    return out["energy"], out["forces"]
