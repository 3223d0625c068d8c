"""A checkpoint's own reference prediction: the energy and forces of one training frame computed
by the saved model when the checkpoint is written, recomputed when it is loaded. A model rebuilt
on another base (other weights, buffers such as scale/shift, or architecture settings that are not
tensors) does not reproduce them, and loading is refused instead of giving wrong numbers."""
from __future__ import annotations

import torch

__all__ = ["make_probe", "verify_probe", "probe_batch"]


def probe_atoms(probe: dict):
    """A probe's frame as ASE atoms."""
    import ase

    return ase.Atoms(numbers=probe["numbers"].tolist(), positions=probe["positions"].double().numpy(),
                     cell=probe["cell"].double().numpy(), pbc=torch.as_tensor(probe["pbc"]).tolist())


def probe_batch(model, probe: dict):
    """The model's input dict for a probe's frame, in the model's dtype and on its device."""
    from .device import module_device
    from .foundation import model_info
    from ..integrations.heads import head_index
    from ..integrations.mace import atoms_to_batch

    z, r_max = model_info(model)
    batch = atoms_to_batch([probe_atoms(probe)], z, r_max, energy_key="__none__", forces_key="__none__",
                           device=module_device(model), dtype=next(model.parameters()).dtype)
    batch["head"] = torch.full_like(batch["head"], head_index(model))  # a scripted copy has no HeadHook
    return batch


def _predict(model, probe):
    model.eval()
    out = model(probe_batch(model, probe), training=False, compute_force=True)
    return float(out["energy"].detach()[0]), out["forces"].detach().double().cpu()


def make_probe(model, atoms) -> dict:
    """The reference prediction of ``model`` on ``atoms`` (plain tensors and numbers only)."""
    probe = {"numbers": torch.tensor(atoms.numbers, dtype=torch.long),
             "positions": torch.tensor(atoms.positions, dtype=torch.float64),
             "cell": torch.tensor(atoms.cell.array, dtype=torch.float64),
             "pbc": torch.tensor(atoms.pbc, dtype=torch.bool)}
    e, f = _predict(model, probe)
    probe.update(energy=e, forces=f, dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    return probe


def verify_probe(model, probe: dict, source: str, spec: str) -> None:
    """Raise ``ValueError`` when ``model`` does not reproduce ``probe`` (tolerance set by the lower of
    the two precisions)."""
    e, f = _predict(model, probe)
    low = "float32" in (probe["dtype"], str(next(model.parameters()).dtype).replace("torch.", ""))
    n = len(probe["numbers"])
    # float32 on a 9-atom ethanol frame: energy within 3e-4 eV of |E| = 4209 eV, forces within 5e-6 eV/Å
    e_tol = (5e-7 * max(1.0, abs(probe["energy"])) + 1e-5 * n) if low else 1e-7 * max(1.0, abs(probe["energy"]))
    f_tol = 1e-3 if low else 1e-7
    de = abs(e - probe["energy"])
    df = float((f - probe["forces"]).abs().max()) if f.shape == probe["forces"].shape else float("inf")
    if not (de <= e_tol and df <= f_tol):
        raise ValueError(f"checkpoint {source} rebuilt on base model {spec!r} does not reproduce its own reference "
                         f"prediction (energy off by {de:.3g} eV, forces by up to {df:.3g} eV/Å): the base model "
                         "differs from the one it was trained on (weights, scale/shift or architecture); pass the "
                         "original with --model")
