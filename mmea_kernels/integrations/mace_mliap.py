"""A fine-tuned MACE for LAMMPS' ML-IAP interface (``pair_style mliap unified``), the deployment
mace-torch makes with ``create_lammps_model --format mliap`` for LAMMPS runs over several processes
or GPUs (domain decomposition, ghost atoms exchanged between the message-passing layers):

``model`` (float64 by default) -> cuEquivariance form (mace-torch's conversion; here
:func:`~mmea_kernels.integrations.cueq.convert_adapted_to_cueq`, which carries the adapters over) ->
``model.lammps_mliap = True`` -> ``mace.calculators.lammps_mliap_mace.LAMMPS_MLIAP_MACE(model)`` ->
``torch.save`` (a pickle: LAMMPS' Python loads it, so mace-torch and mmea_kernels must be importable
there). ``backend="e3nn"`` keeps the e3nn form (no cuEquivariance needed where LAMMPS runs).

The adapters need nothing else: they act on each row of the node features, local or ghost, and the
ghost exchange (``LAMMPS_MP``) happens between mace's blocks. :func:`run_like_mliap` evaluates such
an object the way LAMMPS' ML-IAP unified interface does on one process owning every atom (periodic
images within the cutoff are ghost atoms), which is how :mod:`mmea_kernels.app.deploy` checks a file
before it takes its name. LAMMPS itself is not run here.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

__all__ = ["mliap_model", "run_like_mliap", "BACKENDS"]

BACKENDS = ("cueq", "e3nn")


def mliap_model(model: nn.Module, dtype: torch.dtype = torch.float64, backend: str = "cueq",
                head: Optional[str] = None):
    """``LAMMPS_MLIAP_MACE`` of a copy of the (adapted) MACE ``model`` in ``dtype`` on the CPU, in
    the cuEquivariance form (``backend="cueq"``, mace-torch's choice for ML-IAP; layout ``ir_mul``) or
    the e3nn form; ``head``: the head of a multi-head model it runs (default: the one ``model`` runs,
    :mod:`.heads`). ``model`` is left as it was. Save it with ``torch.save(obj, path)``."""
    from mace.calculators.lammps_mliap_mace import LAMMPS_MLIAP_MACE

    if backend not in BACKENDS:
        raise ValueError(f"unknown ML-IAP backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    from .heads import model_heads, use_head, without_head_hook

    net = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
    hook = without_head_hook(net)  # the wrapper holds the head (its default would be the last)
    if head is None and len(model_heads(net)) > 1:
        head = hook.name if hook is not None else model_heads(net)[0]  # the head the eager model runs
    if backend == "cueq":
        net = _to_cueq(net).to(dtype).eval()
    net.lammps_mliap = True
    if head is not None and len(model_heads(net)) > 1:  # the wrapped model run on its own takes the head too
        use_head(net, head)
    return LAMMPS_MLIAP_MACE(net) if head is None else LAMMPS_MLIAP_MACE(net, head=head)


def _to_cueq(net: nn.Module) -> nn.Module:
    """The cuEquivariance form (``ir_mul``) of an e3nn MACE, adapters carried over
    (:func:`~mmea_kernels.integrations.cueq.convert_to_cueq`; mace-torch's own conversion for a
    model without adapters)."""
    from ..peft.inject import tensor_product_gates
    from .cueq import convert_to_cueq

    if tensor_product_gates(net):
        raise ValueError("the mmea-tp method's tensor-product gates have no cuEquivariance form: export it with "
                         "--mliap-backend e3nn (backend='e3nn')")
    return convert_to_cueq(net, layout="ir_mul", device="cpu")


class _OneProcessData:
    """What LAMMPS' ML-IAP unified interface hands ``compute_forces`` on one process that owns every
    atom: local atoms, then ghost atoms (periodic images within the cutoff, one per image, in order
    of first appearance), pairs ``i -> j`` with ``rij = x_j - x_i``, element indices of all atoms;
    ``forward_exchange`` copies each ghost's row from its owner, ``reverse_exchange`` (its adjoint)
    adds the ghosts' rows to their owners' and zeroes them."""

    def __init__(self, atoms, cutoff: float, symbols: list):
        from .ghosts import one_process_graph

        index = {s: k for k, s in enumerate(symbols)}
        missing = sorted(set(atoms.get_chemical_symbols()) - set(index))
        if missing:
            raise ValueError(f"the model knows the elements {symbols}, not {missing}")
        self.pair_i, self.pair_j, rij, self.owner = one_process_graph(atoms, cutoff)
        types = torch.tensor([index[s] for s in atoms.get_chemical_symbols()], dtype=torch.int64)
        n = len(atoms)
        self.nlocal, self.ntotal, self.npairs = n, n + len(self.owner), len(self.pair_i)
        self.elems = torch.cat([types, types[self.owner]])
        self.rij = torch.as_tensor(rij)
        self.eatoms = torch.zeros(n, dtype=torch.float64)
        self.energy = 0.0
        self.fij = None

    def forward_exchange(self, feats, out, vec_len):
        out.copy_(feats)
        out[self.nlocal:] = feats[self.owner]

    def reverse_exchange(self, grad, gout, vec_len):
        gout.copy_(grad)
        gout[self.nlocal:] = 0
        gout[:self.nlocal].index_add_(0, self.owner, grad[self.nlocal:])

    def update_pair_forces_gpu(self, fij):
        self.fij = fij.detach().double()


def run_like_mliap(obj, atoms, virial: bool = False):
    """``(energy, forces [N, 3], virial [3, 3] or None)`` (float64) of a ``LAMMPS_MLIAP_MACE``
    ``obj`` on ASE ``atoms``, as LAMMPS computes them from what ``compute_forces`` returns: the
    energy it sets, pair forces ``f_ij`` added to atom i and subtracted from atom j (forces on ghost
    atoms go to their owners) and the virial ``W = -Σ r_ij ⊗ f_ij`` (``PairMLIAP::v_tally``)."""
    data = _OneProcessData(atoms, 2.0 * float(obj.rcutfac), obj.element_types)
    obj.compute_forces(data)
    n = data.nlocal
    if data.fij is None:  # mace-torch skips frames with at most one pair
        raise ValueError(f"the ML-IAP model computed nothing for {atoms.get_chemical_formula()} "
                         f"({data.npairs} pairs within the cutoff; mace-torch needs at least two)")
    forces = torch.zeros(data.ntotal, 3, dtype=torch.float64)
    forces.index_add_(0, data.pair_i, data.fij).index_add_(0, data.pair_j, -data.fij)
    forces = forces[:n].index_add_(0, data.owner, forces[n:])
    rij = data.rij.detach()  # mace-torch marks it requires_grad in place
    w = -(rij.unsqueeze(2) * data.fij.unsqueeze(1)).sum(0) if virial else None
    return torch.tensor(float(data.energy), dtype=torch.float64), forces, w
