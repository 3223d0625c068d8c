"""SevenNet-0 (and other single-modal SevenNet checkpoints) as a foundation model for the
fine-tuning workflow: :func:`load_sevennet` builds the pretrained network with sevenn's own
checkpoint loader (offline: only checkpoints already on disk, e.g. the ones the ``sevenn`` wheel
ships) and wraps it in :class:`SevenNetAsMACE`, which takes the batch dicts of
:func:`mmea_kernels.integrations.mace.atoms_to_batch` and returns ``{"energy", "forces"}`` like a
mace-torch model, so :mod:`mmea_kernels.train` and :func:`mmea_kernels.inject_adapters` work on
it unchanged (SevenNet's ``IrrepsLinear`` / ``SelfConnectionLinearIntro`` hold e3nn ``o3.Linear``
layers and only call them, so they can be wrapped in place).

Imports sevenn lazily (an optional dependency, MIT licence).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["load_sevennet", "SevenNetAsMACE", "PRETRAINED", "to_sevennet"]

_W3J = re.compile(r"_w3j_(\d+)_(\d+)_(\d+)")

# name -> attribute of sevenn._const holding the checkpoint path (the ones sevenn knows by name)
PRETRAINED = {
    "7net-0": "SEVENNET_0_11Jul2024",
    "sevennet-0": "SEVENNET_0_11Jul2024",
    "7net-0_11jul2024": "SEVENNET_0_11Jul2024",
    "7net-0_22may2024": "SEVENNET_0_22May2024",
    "7net-l3i5": "SEVENNET_l3i5",
}


def _checkpoint_path(name: str, trust_pickle: bool = False) -> str:
    """A local checkpoint file for ``name`` (a pretrained name, looked up first and found in the
    sevenn wheel; or a path, with ``trust_pickle``); never downloads. sevenn reads a checkpoint by
    full unpickling, which runs whatever code the file names: a path is read only when the user
    vouches for it, and a bare name never means a file of that name in the current directory."""
    from sevenn import _const

    from .files import UnsafeFileError

    key = PRETRAINED.get(name.lower())
    if key is None:
        if not os.path.isfile(name):
            raise ValueError(f"unknown SevenNet model {name!r}: give one of {sorted(PRETRAINED)} or a checkpoint path")
        if not trust_pickle:
            raise UnsafeFileError(f"SevenNet checkpoint {name} is read by sevenn with full unpickling, which runs whatever "
                             "code the file names: if you trust where the file comes from, pass --trust-pickle "
                             f"(API: trust_pickle=True); the pretrained models ({', '.join(sorted(PRETRAINED))}) "
                             "need no such step")
        return name
    path = getattr(_const, key)
    for cand in (path, path.replace(_const._prefix, os.path.expanduser("~/.cache/sevennet"))):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"SevenNet checkpoint for {name!r} not found at {path} (this loader does not download)")


class _OnehotInDtype(nn.Module):
    """SevenNet's ``OnehotEmbedding`` casts the one-hot to float32 (``.float()``); this one casts it
    to the dtype of the edge vectors, so the model also runs in float64. Same keys, same values."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, data):
        import sevenn._keys as KEY

        data = self.inner(data)
        dtype = data[KEY.EDGE_VEC].dtype
        for key in (self.inner.key_output, self.inner.key_additional_output):
            if key is not None:
                data[key] = data[key].to(dtype)
        return data


class SevenNetAsMACE(nn.Module):
    """A SevenNet ``AtomGraphSequential`` behind the interface the fine-tuning loop uses for
    mace-torch models.

    ``forward(batch, training=False, compute_force=True)`` takes a mace batch dict (positions,
    edge_index ``[sender, receiver]``, shifts, node_attrs one-hot over :attr:`atomic_numbers`,
    batch, ptr), builds SevenNet's input (edge vectors ``pos[receiver] - pos[sender] + shift``, as
    SevenNet's own graph builder makes them) and returns ``energy`` ``[B]`` (SevenNet's total
    energy plus ``Σ_atoms atomic_energies_fn.atomic_energies[Z]``) and ``forces = -dE/dpositions``
    ``[N, 3]`` (with ``create_graph=training``, so a loss on the forces can be differentiated).

    Attributes as in mace-torch: ``atomic_numbers`` (sorted Z the model knows, buffer), ``r_max``
    (SevenNet's cutoff, 0-dim buffer), ``atomic_energies_fn.atomic_energies`` (per-element reference
    energies added to SevenNet's energy, zeros at load; the fine-tuning workflow re-fits them).
    """

    def __init__(self, sevennet: nn.Module, type_map: Dict[int, int], cutoff: float, name: str = "sevennet"):
        super().__init__()
        if getattr(sevennet, "modal_map", None):
            raise ValueError(f"{name} is a multi-modal SevenNet ({sorted(sevennet.modal_map)}); only "
                             "single-modal models are supported")
        if "force_output" in sevennet._modules:
            sevennet.delete_module_by_key("force_output")  # forces are taken w.r.t. positions here
        onehot = sevennet._modules.get("onehot_idx_to_onehot")
        if onehot is not None and not isinstance(onehot, _OnehotInDtype):
            sevennet._modules["onehot_idx_to_onehot"] = _OnehotInDtype(onehot)
        sevennet.key_grad = None  # edge vectors are computed from positions (which carry the gradient)
        sevennet.set_is_batch_data(True)
        self.sevennet = sevennet
        self.name = name
        zs = sorted(int(z) for z in type_map)
        self.register_buffer("atomic_numbers", torch.tensor(zs, dtype=torch.int64))
        self.register_buffer("r_max", torch.tensor(float(cutoff), dtype=torch.get_default_dtype()))
        self.atomic_energies_fn = nn.Module()
        self.atomic_energies_fn.register_buffer("atomic_energies",
                                                torch.zeros(len(zs), dtype=torch.get_default_dtype()))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._exact_wigner_3j()
        return out

    @torch.no_grad()
    def _exact_wigner_3j(self) -> None:
        """The checkpoint stores e3nn's Wigner-3j constants (``_w3j_l1_l2_l3`` buffers of the tensor
        products) in float32; converted to float64 they would stay rounded to float32 and break
        rotation equivariance at ~1e-9. In float64 they are recomputed exactly (same sign as
        stored; rounded back to float32 they equal the stored values, so fingerprints agree)."""
        from e3nn import o3

        for mod in self.sevennet.modules():
            for name, buf in mod._buffers.items():
                m = _W3J.fullmatch(name)
                if m is None or buf is None or buf.dtype != torch.float64:
                    continue
                w = o3.wigner_3j(*(int(v) for v in m.groups()), dtype=torch.float64, device=buf.device)
                if w.shape != buf.shape:
                    continue
                for sign in (1.0, -1.0):
                    if torch.allclose(buf, sign * w, rtol=0, atol=1e-6):
                        buf.copy_(torch.where(buf == 0, buf, sign * w))  # keep the stored (signed) zeros
                        break

    def _energy(self, batch: dict, positions: torch.Tensor, shifts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        import sevenn._keys as KEY

        edge_index = batch["edge_index"]
        node_attrs = batch["node_attrs"]
        n_graphs = int(batch["ptr"].numel() - 1)
        idx = node_attrs.argmax(dim=-1)
        z = self.atomic_numbers[idx]
        edge_vec = positions[edge_index[1]] - positions[edge_index[0]] + shifts
        counts = (batch["ptr"][1:] - batch["ptr"][:-1]).to(torch.int64)
        data = {
            KEY.NODE_FEATURE: z.clone(),  # replaced by the type index in SevenNet's _preprocess
            KEY.ATOMIC_NUMBERS: z,
            KEY.POS: positions,
            KEY.EDGE_IDX: edge_index,
            KEY.EDGE_VEC: edge_vec,
            KEY.BATCH: batch["batch"],
            KEY.NUM_ATOMS: counts,
        }
        out = self.sevennet(data)
        # SevenNet's own reduction sizes by batch.max() + 1; sum the atomic energies per graph here
        atomic = out[KEY.ATOMIC_ENERGY].reshape(-1)
        e0 = node_attrs.to(atomic.dtype) @ self.atomic_energies_fn.atomic_energies.to(atomic.dtype)
        energy = torch.zeros(n_graphs, dtype=atomic.dtype, device=atomic.device)
        return energy.index_add(0, batch["batch"], atomic + e0), atomic + e0

    def forward(self, batch: dict, training: bool = False, compute_force: bool = True,
                compute_stress: bool = False) -> dict:
        """``{"energy", "node_energy", "forces", "stress"}`` as mace-torch's models give them (per-atom
        energies with E0s, forces ``-dE/dr``,
        stress ``(1/V) dE/dε`` per graph ``[B, 3, 3]`` (eV/Å³, ASE's sign) from a symmetric strain
        ``ε`` applied to positions and cell shifts (None unless ``compute_stress``)."""
        positions = batch["positions"]
        if compute_force and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        with torch.enable_grad() if compute_force or compute_stress or training else torch.no_grad():
            shifts, strained, strain = batch["shifts"].to(positions.dtype), positions, None
            if compute_stress:
                strain = torch.zeros(int(batch["ptr"].numel() - 1), 3, 3, dtype=positions.dtype,
                                     device=positions.device, requires_grad=True)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                graph = batch["batch"]
                strained = positions + torch.einsum("ni,nij->nj", positions, sym[graph])
                shifts = shifts + torch.einsum("ei,eij->ej", shifts, sym[graph[batch["edge_index"][0]]])
            energy, node_energy = self._energy(batch, strained, shifts)
            wrt = ([positions] if compute_force else []) + ([strain] if compute_stress else [])
            grads = torch.autograd.grad(energy.sum(), wrt, create_graph=training, retain_graph=training,
                                        allow_unused=True) if wrt else []
            forces = stress = None
            if compute_force:
                forces = -grads[0] if grads[0] is not None else torch.zeros_like(positions)
            if compute_stress:
                d = grads[-1] if grads[-1] is not None else torch.zeros_like(strain)
                volume = torch.linalg.det(batch["cell"].reshape(-1, 3, 3).to(d.dtype)).abs()
                stress = d / volume.reshape(-1, 1, 1)
        if not training:
            energy, node_energy = energy.detach(), node_energy.detach()
            forces = forces.detach() if forces is not None else None
            stress = stress.detach() if stress is not None else None
        return {"energy": energy, "node_energy": node_energy, "forces": forces, "stress": stress}


def load_sevennet(name: str = "7net-0", dtype: Optional[torch.dtype] = None,
                  fused_gate: bool = True, trust_pickle: bool = False) -> SevenNetAsMACE:
    """The pretrained SevenNet ``name`` (``7net-0`` = SevenNet-0, 11 Jul 2024, shipped with the
    sevenn wheel; or a checkpoint path, which sevenn unpickles: only with ``trust_pickle``) as a
    :class:`SevenNetAsMACE`, in eval mode, on the CPU.
    Built by ``sevenn.checkpoint.SevenNetCheckpoint.build_model`` (plain e3nn backend).

    ``fused_gate=True`` (default) swaps SevenNet's e3nn ``Gate`` modules for
    :class:`mmea_kernels.nn.FusedGate` (:func:`mmea_kernels.replace_gates`: same numbers, same
    state dict, fused kernels); ``False`` keeps e3nn's gates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor product accelerator", torch.jit deprecations etc.
        try:
            import sevenn._keys as KEY
            from sevenn.checkpoint import SevenNetCheckpoint
        except ImportError:
            raise ImportError("the sevenn package is needed for SevenNet models (pip install sevenn)") from None
        cp = SevenNetCheckpoint(_checkpoint_path(str(name), trust_pickle))
        net = cp.build_model(enable_cueq=False, enable_flash=False, enable_oeq=False)
    model = SevenNetAsMACE(net, cp.config[KEY.TYPE_MAP], float(cp.config[KEY.CUTOFF]), name=str(name))
    if dtype is not None:
        model = model.to(dtype)
    if fused_gate:
        from ..nn.gate_swap import replace_gates

        replace_gates(model)
    return model.eval()


def to_sevennet(model: SevenNetAsMACE) -> nn.Module:
    """A copy of the SevenNet inside ``model`` as sevenn's own tools take a model object: adapters,
    FusedGates and every weight as they are in ``model``, sevenn's force/stress output put back
    (``SevenNetAsMACE`` takes forces from positions instead), sevenn's float32 one-hot, and
    ``model``'s per-element reference energies (which the fine-tuning re-fits and which live outside
    SevenNet's network) added to its per-species energy shift, so that its energies are ``model``'s.
    In float32, as sevenn runs. ``model`` is not changed.

    For ``sevenn.calculator.SevenNetCalculator(model=to_sevennet(model), file_type="model_instance")``
    or sevenn's ``Trainer``. The adapters stay this package's modules (``mmea_kernels`` must be
    importable wherever the object goes)."""
    import copy

    from sevenn.nn.force_output import ForceStressOutputFromEdge

    if not isinstance(model, SevenNetAsMACE):
        raise TypeError(f"to_sevennet takes a SevenNetAsMACE (load_sevennet, load_finetuned of a SevenNet "
                        f"checkpoint), got {type(model).__name__}")
    net = copy.deepcopy(model.sevennet).float()
    onehot = net._modules.get("onehot_idx_to_onehot")
    if isinstance(onehot, _OnehotInDtype):
        net._modules["onehot_idx_to_onehot"] = onehot.inner
    output = ForceStressOutputFromEdge()
    net._modules["force_output"] = output  # last, where sevenn's builder puts it
    net.key_grad = output.get_grad_key()
    _fold_reference_energies(net, model)
    return net.eval()


@torch.no_grad()
def _fold_reference_energies(net: nn.Module, model: SevenNetAsMACE) -> None:
    e0 = model.atomic_energies_fn.atomic_energies.detach().double()
    if not bool(e0.any()):
        return
    rescale = net._modules.get("rescale_atomic_energy")
    shift = getattr(rescale, "shift", None)
    if shift is None or shift.numel() == 1:
        if shift is not None and bool((e0 == e0[0]).all()):
            shift.add_(float(e0[0]))
            return
        raise ValueError(f"{model.name}: its energy shift is one number for every species "
                         f"({type(rescale).__name__}), so the per-element reference energies of the fine-tuned "
                         "model cannot be folded into it; run the model through this package's calculator")
    zs = [int(z) for z in model.atomic_numbers]
    for z, index in net.type_map.items():
        if int(z) in zs:
            shift[int(index)] += e0[zs.index(int(z))].to(shift.dtype)
