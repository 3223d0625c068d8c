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
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["AddReferenceEnergies", "sevennet_lammps_model", "sevennet_lammps_parallel_models", "run_like_pair_e3gnn",
           "run_like_pair_e3gnn_parallel", "PAIR_STYLE", "PAIR_STYLE_PARALLEL"]

PAIR_STYLE = "e3gnn"
PAIR_STYLE_PARALLEL = "e3gnn/parallel"


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


def _deploy_net(model: nn.Module):
    """``(net, metadata)``: the SevenNet network of a float32 copy of ``model`` as the pair styles
    run it (no force module, type indices in "x", one graph, frozen weights, the fine-tuned reference
    energies added after the rescale), and the metadata both pair styles read."""
    import sevenn
    import sevenn._keys as KEY
    from ase.data import chemical_symbols

    from .export import check_scriptable_model
    from .sevenn import SevenNetAsMACE, _OnehotInDtype

    if not isinstance(model, SevenNetAsMACE):
        raise TypeError(f"SevenNet's LAMMPS export takes a SevenNetAsMACE, got {type(model).__name__}")
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
    return net.eval(), metadata


def _script(net: nn.Module, kernels: str = "aten") -> torch.jit.ScriptModule:
    import e3nn.util.jit

    from ..nn.scriptable import script_kernels

    with script_kernels(kernels, net):
        return torch.jit.freeze(e3nn.util.jit.script(net.eval()))


def sevennet_lammps_model(model: nn.Module, kernels: str = "aten") -> Tuple[torch.jit.ScriptModule, Dict[str, str]]:
    """``(module, metadata)``: the frozen TorchScript of a copy of ``model`` (a
    :class:`~mmea_kernels.integrations.sevenn.SevenNetAsMACE`, adapted or not) for ``pair_style
    e3gnn``, and the extra files to save with it (``module.save(path, _extra_files=metadata)``;
    :func:`torch.jit.save` takes them the same way). ``model`` itself is left as it was.
    ``kernels="cpp"``: MMEA adapters as one op of this package's C++ extension
    (:func:`~mmea_kernels.nn.scriptable.script_kernels`; the e3gnn plugins of ``lammps-build`` load it)."""
    net, metadata = _deploy_net(model)
    return _script(net, kernels), metadata


_GHOST_LAYERS = ("onehot_to_feature_x", "0_self_interaction_1")  # as sevenn's deploy_parallel


def _ghost_copy(layer: nn.Module) -> nn.Module:
    """``layer`` (a linear of the node features, adapted or not) on the ghost atoms' features."""
    import sevenn._keys as KEY

    ghost = copy.deepcopy(layer)
    ghost.key_input = ghost.key_output = KEY.NODE_FEATURE_GHOST
    return ghost


def _segments(net: nn.Module) -> list:
    """The deploy-ready ``net`` cut as ``sevenn``'s parallel model builder cuts a SevenNet network
    (``model_build._to_parallel_model``): ghost copies of the first embedding and self-interaction
    after their originals, the convolutions in parallel mode (they take the ghosts' features from
    "x_ghost" and keep the local rows), and a cut after each ``{i}_self_interaction_1``
    (i >= 1), each segment after the first starting with a copy of the edge embedding. Every layer is a copy
    of ``net``'s own, adapters and FusedGates included."""
    import sevenn._keys as KEY
    from sevenn.nn.node_embedding import OnehotEmbedding
    from sevenn.nn.sequential import AtomGraphSequential

    layers = net._modules
    convs = sorted(int(n.split("_")[0]) for n in layers if n.split("_", 1)[-1] == "convolution" and n[0].isdigit())
    need = dict.fromkeys(["edge_embedding", "onehot_idx_to_onehot", *_GHOST_LAYERS]
                         + [f"{i}_self_interaction_1" for i in convs])  # in order, once each
    missing = [n for n in need if n not in layers]
    if not convs or missing:
        raise ValueError("this SevenNet network cannot be cut as sevenn's parallel model: it lacks "
                         f"{missing or 'convolutions'}")
    cuts = {f"{i}_self_interaction_1" for i in convs[1:]}
    segments, current = [], []
    for name, layer in layers.items():  # net is _deploy_net's own copy: its layers can be used as they are
        if name.endswith("_convolution"):
            layer.is_parallel = True
        current.append((name, layer))
        if name == "onehot_to_feature_x":
            current.append(("one_hot_ghost", OnehotEmbedding(num_classes=layers["onehot_idx_to_onehot"].num_classes,
                                                             data_key_x=KEY.NODE_FEATURE_GHOST)))
        if name in _GHOST_LAYERS:
            current.append((f"ghost_{name}", _ghost_copy(layer)))
        if name in cuts:
            segments.append(current)
            current = [("edge_embedding", copy.deepcopy(layers["edge_embedding"]))]
    segments.append(current)
    out = []
    for seg in segments:
        part = AtomGraphSequential(OrderedDict(seg), cutoff=net.cutoff, type_map=net.type_map,
                                   modal_map=getattr(net, "modal_map", None), eval_type_map=False)
        part.set_is_batch_data(False)
        out.append(part.eval())
    return out


def sevennet_lammps_parallel_models(model: nn.Module,
                                    kernels: str = "aten") -> Tuple[List[torch.jit.ScriptModule], Dict[str, str]]:
    """``(modules, metadata)``: the files of ``pair_style e3gnn/parallel`` (LAMMPS with domain
    decomposition, one segment per message-passing layer) for a copy of ``model``, built as
    ``sevenn.scripts.deploy.deploy_parallel`` builds them, adapters, FusedGates and reference
    energies inside; save ``modules[i]`` as ``<dir>/deployed_parallel_<i>.pt`` with ``metadata``
    (it adds ``comm_size``, the widest node feature the pair communicates)."""
    net, metadata = _deploy_net(model)
    parts = _segments(net)
    comm = max(int(part._modules[f"{t}_convolution"]._comm_size) for t, part in enumerate(parts))
    return [_script(part, kernels) for part in parts], dict(metadata, comm_size=str(comm))


def _local_and_ghost_graph(atoms, cutoff: float):
    """:func:`~mmea_kernels.integrations.ghosts.one_process_graph` with float32 edge vectors (as
    ``pair_e3gnn_parallel.cpp`` passes them): ``(src, dst, edge_vec, owner of each ghost)``."""
    from .ghosts import one_process_graph

    src, dst, vec, owner = one_process_graph(atoms, cutoff)
    return src, dst, torch.as_tensor(vec, dtype=torch.float32), owner


def run_like_pair_e3gnn_parallel(modules, atoms, metadata: Dict[str, str], virial: bool = False):
    """``(energy, forces [N, 3], virial [3, 3] or None)`` of the ``pair_style e3gnn/parallel``
    files ``modules`` on ASE ``atoms``, computed as ``pair_e3gnn_parallel.cpp`` computes them
    for a process whose neighbours in other periodic images are ghost atoms owned elsewhere (as
    neighbours owned by other processes are): the segments run in turn, the ghosts' features of
    each ("x_ghost") copied from their owners' (the forward communication), the backward run segment
    by segment from ``dE/d(x, self_cont_tmp, x_ghost)``, the ghosts' gradients added to their
    owners' (the reverse communication), ``dE/d edge_vec`` summed over the segments and scattered
    to forces on local and ghost atoms, which LAMMPS adds to their owners. (On one real process the
    pair maps every image to its local atom by tag and has no ghosts: the serial graph, which
    :func:`run_like_pair_e3gnn` gives; the same numbers, without exercising the communication.)"""
    symbols = metadata["chemical_symbols_to_index"].split()
    index = {s: k for k, s in enumerate(symbols)}
    missing = sorted(set(atoms.get_chemical_symbols()) - set(index))
    if missing:
        raise ValueError(f"the files know the elements {symbols}, not {missing}")
    n = len(atoms)
    src, dst, vec, owner = _local_and_ghost_graph(atoms, float(metadata["cutoff"]))
    types = torch.tensor([index[s] for s in atoms.get_chemical_symbols()], dtype=torch.int64)
    vec.requires_grad_(True)
    count = torch.tensor([n], dtype=torch.int64)
    data = {"x": types, "x_ghost": types[owner], "edge_index": torch.stack([src, dst]), "edge_vec": vec,
            "num_atoms": count, "nlocal": count}
    wrt = [[vec]]
    out = modules[0](data)
    for part in modules[1:]:
        x_ghost = out["x"].detach()[owner].requires_grad_(True)  # forward communication
        out["x_ghost"] = x_ghost
        out["edge_vec"] = out["edge_vec"].clone()
        wrt.append([out["edge_vec"], out["x"], out["self_cont_tmp"], x_ghost])
        out = part(out)
    energy = out["inferred_total_energy"].squeeze()
    de_dr = torch.zeros_like(vec)
    of, grad_out = [energy], None
    for k in range(len(wrt) - 1, -1, -1):
        grads = torch.autograd.grad(of, wrt[k], grad_out)
        de_dr = de_dr + grads[0]
        if k == 0:
            break
        dx = grads[1].clone().index_add_(0, owner, grads[3])  # reverse communication
        of, grad_out = [wrt[k][1], wrt[k][2]], [dx, grads[2]]
    forces = torch.zeros(n + len(owner), 3, dtype=torch.float32).index_add_(0, src, de_dr).index_add_(0, dst, -de_dr)
    forces = forces[:n].index_add_(0, owner, forces[n:])
    w = -(vec.detach().unsqueeze(2) * de_dr.unsqueeze(1)).sum(0) if virial else None
    return (energy.detach().double(), forces.double(), None if w is None else w.double())


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
