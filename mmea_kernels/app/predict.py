"""``mmea-kernels predict``: a fine-tuned model's energies, forces and (for frames periodic in all
three directions) stresses on every frame of a structure file, written as extended XYZ next to
whatever the frames already carry (mace-torch's ``mace_eval_configs`` does the same for MACE files).

The frames are read, checked (as training data, without labels) and evaluated in batches of
``batch_size``; the output is written under a temporary name and renamed at the end, so an error
half-way leaves no partial file under the name asked for (a symlink is written through)."""
from __future__ import annotations

import pathlib
from typing import Optional

from ..train.data import EVAL_MAX_ATOMS

__all__ = ["predict"]


def _evaluate(net, frames, where: str, batch_size: int, checks, start: int, max_atoms: Optional[int]):
    """(energies, forces per frame, stresses per frame or None) for ``frames`` (a chunk starting at
    frame ``start`` of the file, for the messages)."""
    import torch

    from ..train.checks import checked_graphs
    from ..train.data import iter_batches
    from ..train.device import module_device
    from ..train.foundation import model_info
    from .md import _periodic

    z, r_max = model_info(net)
    graphs = checked_graphs(frames, z, r_max, f"{where} [frame numbers below count from frame {start} of the "
                                              "selection]" if start else where,
                            dtype=next(net.parameters()).dtype, checks=checks, labels=False)
    periodic = [_periodic(a) for a in frames]
    energies, forces, stresses = [], [], []
    for batch in iter_batches(graphs, batch_size, module_device(net), max_atoms):
        out = net(batch, training=False, compute_force=True, **({"compute_stress": True} if any(periodic) else {}))
        ptr = batch["ptr"].tolist()
        e = out["energy"].detach().to(torch.float64).cpu().numpy()
        f = out["forces"].detach().to(torch.float64).cpu().numpy()
        s = out["stress"].detach().to(torch.float64).cpu().numpy() if any(periodic) else None
        for g in range(len(ptr) - 1):
            k = len(energies)  # the frame's place in the chunk (a non-periodic frame's stress is not used)
            _check_finite(e[g], f[ptr[g]:ptr[g + 1]], s[g] if s is not None and periodic[k] else None, where, start + k)
            energies.append(float(e[g]))
            forces.append(f[ptr[g]:ptr[g + 1]])
            stresses.append(None if s is None else s[g])
    return energies, forces, [s if p else None for s, p in zip(stresses, periodic)]


def _check_finite(e, f, s, where: str, i: int) -> None:
    """``ValueError`` for a non-finite prediction (as :class:`~mmea_kernels.app.calculator.MMEACalculator`
    refuses one): weights that overflow (a corrupt or altered checkpoint) would otherwise be written as
    NaN or inf energies and forces with exit 0."""
    import numpy as np

    if not (np.isfinite(e) and np.isfinite(f).all() and (s is None or np.isfinite(s).all())):
        raise ValueError(f"{where}: frame {i}: the model gives a non-finite energy ({float(e)}) or forces"
                         f"{'' if s is None else ' or stress'}; its weights are not usable (a corrupt or altered "
                         "checkpoint?); nothing was written")


def _keys(prefix: str) -> list:
    return [f"{prefix}{k}" for k in ("energy", "forces", "stress")]


def _check_prefix(frames, prefix: str, data: str) -> None:
    """``ValueError`` when a frame already holds a key the predictions would be written under (a
    label such as REF_energy would be replaced by the prediction), suggesting a free prefix."""
    held = [(i, k) for i, a in enumerate(frames) for k in _keys(prefix) if k in a.info or k in a.arrays]
    if held:
        free = next((p for p in ("MMEA_", "PRED_", "MMEA_PRED_") if not any(
            k in a.info or k in a.arrays for a in frames for k in _keys(p))), None)
        i, key = held[0]
        raise ValueError(f"--prefix {prefix}: {data} frame {i} already holds {key}, which the predictions would "
                         f"replace; choose another --prefix" + (f" (e.g. --prefix {free})" if free else ""))


def predict(checkpoint, data: str, out, model: Optional[str] = None, batch_size: int = 16,
            prefix: str = "MMEA_", dtype: Optional[str] = None, device: str = "cpu", trust_pickle: bool = False,
            checks=None, overwrite: bool = False, max_atoms: Optional[int] = EVAL_MAX_ATOMS) -> dict:
    """Write every frame of ``data`` (``path[@index]``) to ``out`` with ``info[prefix + "energy"]``
    (eV), ``arrays[prefix + "forces"]`` (eV/Å) and, for 3-D periodic frames, ``info[prefix + "stress"]``
    (eV/Å³, ASE's Voigt order and sign). Batches of ``batch_size`` frames and at most ``max_atoms``
    atoms (a larger frame alone; None: no limit). Returns a summary."""
    import ase.io
    from ase.stress import full_3x3_to_voigt_6_stress

    from ..train import load_finetuned
    from ..train.atomic import atomic_path, is_stream
    from ..train.checks import DataChecks, read_structures
    from ..train.data import check_batch_size, frame_chunks
    from ..train.e0s import warn_outside_span
    from .files import check_outputs, checkpoint_inputs

    out = pathlib.Path(out)
    check_batch_size(batch_size, max_atoms)
    if out.suffix.lower() not in (".xyz", ".extxyz"):
        raise ValueError(f"--out {out}: predictions are written as extended XYZ; name it *.xyz or *.extxyz")
    if not prefix or not prefix.replace("_", "").isalnum():
        raise ValueError(f"--prefix {prefix!r}: letters, digits and underscores only (the keys are "
                         f"{prefix}energy, {prefix}forces, {prefix}stress)")
    check_outputs({"--out": str(out)}, overwrite, {**checkpoint_inputs(checkpoint, model), "--data": data})
    frames = read_structures(data, "data file")
    _check_prefix(frames, prefix, data)
    net, ckpt = load_finetuned(checkpoint, model, dtype=dtype, trust_pickle=trust_pickle, device=device)
    warn_outside_span(ckpt.get("e0_span"), frames, str(data))  # energies there carry an unknown offset
    checks = checks or DataChecks()
    n_stress = 0
    # one open file for every chunk (a FIFO's reader sees one stream); an error or an interrupt half-way:
    # no partial file left (a stream such as /dev/stdout is appended to)
    with atomic_path(out, suffix=".part") as tmp, open(tmp, "a" if is_stream(out) else "w") as fh:
        for start, part in frame_chunks(frames, max(batch_size, 256), 16 * (max_atoms or EVAL_MAX_ATOMS)):
            energies, forces, stresses = _evaluate(net, part, str(data), batch_size, checks, start, max_atoms)
            for a, e, f, s in zip(part, energies, forces, stresses):
                a.info[f"{prefix}energy"] = e
                a.arrays[f"{prefix}forces"] = f
                if s is not None:
                    a.info[f"{prefix}stress"] = full_3x3_to_voigt_6_stress(s)
                    n_stress += 1
            ase.io.write(fh, part, format="extxyz")
            fh.flush()
    return {"out": str(out), "frames": len(frames), "with_stress": n_stress, "method": ckpt["method"],
            "keys": [f"{prefix}energy", f"{prefix}forces"] + ([f"{prefix}stress"] if n_stress else []),
            "dtype": str(next(net.parameters()).dtype).replace("torch.", "")}
