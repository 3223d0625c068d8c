"""A fine-tuned SevenNet model as the TorchScript file of SevenNet's LAMMPS pair style
(``pair_style e3gnn``, serial), built the way ``sevenn.scripts.deploy.deploy`` builds it from a
SevenNet checkpoint: the ``AtomGraphSequential`` without its force module, fed type indices
(``eval_type_map = False``) and one graph (``set_is_batch_data(False)``), scripted with e3nn's
``jit.script``, frozen, float32, and saved with the metadata the pair style reads
(``chemical_symbols_to_index``, ``cutoff``, ``num_species``, ...).

What fine-tuning adds to SevenNet goes in with it: the adapters (in their TorchScript form,
:mod:`mmea_kernels.nn.scriptable`), FusedGate modules (scriptable likewise), and the per-element
reference energies the workflow re-fits, which :class:`~mmea_kernels.integrations.sevenn.SevenNetAsMACE`
adds outside SevenNet: here they are added to the atomic energies right after SevenNet's own
rescale (:class:`AddReferenceEnergies`), so ``inferred_total_energy`` and ``atomic_energy`` (the
pair's ``eatom``) include them.

:func:`run_like_pair_e3gnn` evaluates such a file the way ``pair_e3gnn.cpp`` does (edges i -> j
within the cutoff with vectors ``x_j - x_i``, float32; forces and the virial from
``dE/d edge_vec``), which is how :func:`mmea_kernels.app.deploy.export_checkpoint` checks a file
before it takes its name. The pair style itself needs SevenNet's patched LAMMPS
(``sevenn_patch_lammps``), which is not run here.
"""
from __future__ import annotations

import copy
import datetime
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["AddReferenceEnergies", "sevennet_lammps_model", "run_like_pair_e3gnn", "PAIR_STYLE"]

PAIR_STYLE = "e3gnn"


class AddReferenceEnergies(nn.Module):
    """``inner`` (SevenNet's atomic-energy rescale), then ``data[key_energy] += e0[data[key_type]]``:
    the fine-tuned per-element reference energies, indexed by SevenNet's type index."""

    def __init__(self, inner: nn.Module, e0_by_type: torch.Tensor, key_energy: str, key_type: str):
        super().__init__()
        self.inner = inner
        self.register_buffer("e0", e0_by_type.detach().clone())
        self.key_energy = key_energy
        self.key_type = key_type

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        data = self.inner(data)
        energy = data[self.key_energy]
        data[self.key_energy] = energy + self.e0.index_select(0, data[self.key_type]).to(energy.dtype).view(
            energy.shape)
        return data


def _type_order(type_map: Dict[int, int]) -> list:
    """Atomic numbers in SevenNet's type-index order (index 0 first)."""
    order = sorted(type_map.items(), key=lambda kv: kv[1])
    if [i for _, i in order] != list(range(len(order))):
        raise ValueError(f"SevenNet's type map {type_map} does not number its types 0..{len(order) - 1}")
    return [int(z) for z, _ in order]


def sevennet_lammps_model(model: nn.Module) -> Tuple[torch.jit.ScriptModule, Dict[str, str]]:
    """``(module, metadata)``: the frozen TorchScript of a copy of ``model`` (a
    :class:`~mmea_kernels.integrations.sevenn.SevenNetAsMACE`, adapted or not) for ``pair_style
    e3gnn``, and the extra files to save with it (``module.save(path, _extra_files=metadata)``;
    :func:`torch.jit.save` takes them the same way). ``model`` itself is left as it was."""
    import e3nn.util.jit
    import sevenn
    import sevenn._keys as KEY
    from ase.data import chemical_symbols

    from .export import check_scriptable_model
    from .sevenn import SevenNetAsMACE, _OnehotInDtype

    if not isinstance(model, SevenNetAsMACE):
        raise TypeError(f"sevennet_lammps_model takes a SevenNetAsMACE, got {type(model).__name__}")
    check_scriptable_model(model)
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    net = model.sevennet
    types = _type_order(net.type_map)
    onehot = net._modules.get("onehot_idx_to_onehot")
    if isinstance(onehot, _OnehotInDtype):  # float32 here: SevenNet's own module casts to float32 already
        net._modules["onehot_idx_to_onehot"] = onehot.inner
    net.delete_module_by_key("force_output")
    net.set_is_batch_data(False)
    net.eval_type_map = False  # the pair style passes type indices in "x"
    net.key_grad = None  # and differentiates with respect to the edge vectors it passes
    z_sorted = [int(z) for z in model.atomic_numbers]
    e0 = model.atomic_energies_fn.atomic_energies.detach().to(torch.float64)
    e0_by_type = torch.tensor([float(e0[z_sorted.index(z)]) for z in types], dtype=torch.float32)
    if bool((e0_by_type != 0).any()):
        rescale = net._modules.get("rescale_atomic_energy")
        if rescale is None:
            raise ValueError("this SevenNet model has no 'rescale_atomic_energy' module to add the fine-tuned "
                             "reference energies after")
        net._modules["rescale_atomic_energy"] = AddReferenceEnergies(rescale, e0_by_type, KEY.ATOMIC_ENERGY,
                                                                     KEY.ATOM_TYPE)
    for p in net.parameters():
        p.requires_grad_(False)
    module = torch.jit.freeze(e3nn.util.jit.script(net.eval()))
    metadata = {
        "chemical_symbols_to_index": " ".join(chemical_symbols[z] for z in types),
        "cutoff": str(float(model.r_max)),
        "num_species": str(len(types)),
        "flashTP": "no",
        "oeq": "no",
        "model_type": "E3_equivariant_model",
        "version": str(sevenn.__version__),
        "dtype": "single",
        "time": datetime.date.today().isoformat(),
    }
    return module, metadata


def run_like_pair_e3gnn(module, atoms, metadata: Dict[str, str], virial: bool = False):
    """``(energy, forces [N, 3], virial [3, 3] or None)`` (float64 copies of float32 results) of a
    ``pair_style e3gnn`` file on ASE ``atoms``, computed as ``pair_e3gnn.cpp`` computes them:
    edges i -> j for every neighbour within the cutoff (periodic images included), edge vectors
    ``x_j - x_i`` in float32, ``inferred_total_energy``, ``dE/d edge_vec`` scattered to forces
    (``+`` on i, ``-`` on j) and the virial ``W = -Σ edge_vec ⊗ dE/d edge_vec`` (LAMMPS's sign)."""
    from ase.neighborlist import neighbor_list

    symbols = metadata["chemical_symbols_to_index"].split()
    index = {s: k for k, s in enumerate(symbols)}
    missing = sorted(set(atoms.get_chemical_symbols()) - set(index))
    if missing:
        raise ValueError(f"the file knows the elements {symbols}, not {missing}")
    i, j, d = neighbor_list("ijD", atoms, float(metadata["cutoff"]))
    n = len(atoms)
    x = torch.tensor([index[s] for s in atoms.get_chemical_symbols()], dtype=torch.int64)
    src, dst = torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)
    vec = torch.as_tensor(np.asarray(d), dtype=torch.float32).requires_grad_(True)
    count = torch.tensor([n], dtype=torch.int64)
    data = {"x": x, "edge_index": torch.stack([src, dst]), "edge_vec": vec, "num_atoms": count, "nlocal": count}
    energy = module(data)["inferred_total_energy"].squeeze()
    (de_dr,) = torch.autograd.grad(energy, [vec])
    forces = torch.zeros(n, 3, dtype=torch.float32).index_add_(0, src, de_dr).index_add_(0, dst, -de_dr)
    w = -(vec.detach().unsqueeze(2) * de_dr.unsqueeze(1)).sum(0) if virial else None
    return (energy.detach().double(), forces.double(), None if w is None else w.double())
