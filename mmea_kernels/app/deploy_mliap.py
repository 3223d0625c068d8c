"""``mmea-kernels export --format lammps-mliap``: a MACE checkpoint for LAMMPS' ML-IAP interface
(``pair_style mliap unified``; several processes or GPUs), as mace-torch's ``create_lammps_model
--format mliap`` makes it (:mod:`mmea_kernels.integrations.mace_mliap`).

The file is a pickle of ``LAMMPS_MLIAP_MACE`` (mace-torch's format): LAMMPS' Python loads it, with
mace-torch and mmea_kernels importable there. Before it takes the name it is loaded back and run as
LAMMPS runs it (:func:`~mmea_kernels.integrations.mace_mliap.run_like_mliap`) on the checkpoint's
reference frame and on a periodic copy where atoms see images of each other (ghost atoms, exchanged
between the layers; the virial), against the eager model it wraps (float64: 1e-9 relative, float32:
2e-5; ``deploy.TOLERANCE``). In the cuEquivariance form (the default, as mace-torch's) that model is mace-torch's
conversion of the checkpoint's model with the adapters carried over; its difference from the
checkpoint's e3nn model is reported (``conversion_max_rel_diff``) and bounded (float64: 1e-6,
float32: 5e-5): mace-torch's own conversion of the shipped model differs by ~1e-8 relative in
float64 (that file stores the symmetric contractions' U matrices in float32; cuEquivariance computes
its own).
"""
from __future__ import annotations

import pathlib
from typing import Optional

import torch

from .deploy import TOLERANCE, _SCRIPT_ERRORS, _cluster, _crowded, _eager_frames, _fold_parametrizations, _rel_diff
from .deploy_pickle import write_checked_pickle
from ..integrations.heads import head_summary

FORMAT = "lammps-mliap"


def _pairs(frame: dict, r_max: float) -> int:
    from ..integrations.ghosts import one_process_graph
    from ..train.selfcheck import probe_atoms

    return len(one_process_graph(probe_atoms(frame), r_max)[0])


def _largest(got, want, dtype: torch.dtype) -> float:
    return max(_rel_diff(g, w, dtype) for (_, g), (_, w) in zip(got, want))


def export_mliap(net, ckpt: dict, out: pathlib.Path, dtype: torch.dtype, backend: Optional[str]) -> dict:
    """Write the ML-IAP file of the fine-tuned MACE ``net`` to ``out`` (checked; see the module)."""
    from ase.data import chemical_symbols

    from ..integrations.mace_mliap import BACKENDS, mliap_model, run_like_mliap
    from ..train.foundation import model_info

    backend = backend or "cueq"
    if backend not in BACKENDS:
        raise ValueError(f"unknown --mliap-backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    net = net.to(dtype).eval()
    z, r_max = model_info(net)
    probe = ckpt.get("probe") or _cluster(z)
    if _pairs(probe, r_max) < 2:  # e.g. an isolated atom first in the training set: mace-torch skips such frames
        probe = _cluster(z)
    frames = [probe, _crowded(probe, r_max)]
    reference = _eager_frames(net, frames)  # the checkpoint's model, before anything is folded or converted
    folded = _fold_parametrizations(net)
    try:
        obj = mliap_model(net, dtype=dtype, backend=backend)
    except ImportError as exc:
        raise ValueError(f"--format {FORMAT} with --mliap-backend cueq needs cuequivariance-torch "
                         f"(pip install 'mmea_kernels[cueq]'), or pass --mliap-backend e3nn ({exc})") from exc
    except _SCRIPT_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"this model does not convert for --format {FORMAT} ({type(exc).__name__}: {first})") from exc
    tol = TOLERANCE[dtype][0]
    wrapped = _eager_frames(obj.model.model, frames)
    conversion = _largest(wrapped, reference, dtype)
    limit = 1e-6 if dtype == torch.float64 else 5e-5
    if not conversion <= limit:
        raise ValueError(f"the {backend} form of the checkpoint's model differs from it by {conversion:.3g} "
                         f"(relative, > {limit:g}); nothing was written")

    def difference(loaded):
        got = [(atoms, run_like_mliap(loaded, atoms, virial=want[2] is not None)) for atoms, want in wrapped]
        return _largest(got, wrapped, dtype)

    rel, _ = write_checked_pickle(out, obj, FORMAT, tol, difference)
    elements = " ".join(chemical_symbols[int(v)] for v in z)
    return {"out": str(out), "format": FORMAT, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
            "method": ckpt["method"], "base_model": ckpt["model"], "atomic_numbers": [int(v) for v in z],
            "r_max": float(r_max), "folded_parametrizations": folded, "conversion_max_rel_diff": conversion,
            "verified_max_rel_diff": rel, **head_summary(net, FORMAT),
            "lammps": f"pair_style mliap unified {out} 0; pair_coeff * * <one element per atom type, of {elements}> "
                      "(LAMMPS with KOKKOS, ML-IAP and Python, as mace-torch's ML-IAP wrapper needs; mace-torch and "
                      "mmea_kernels importable by LAMMPS' Python)"}
