"""ASE calculator for a (fine-tuned) MACE or SevenNet model (molecular dynamics with it: :mod:`.md`)."""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch

from .md import check_md_settings, nve_drift  # noqa: F401 - importable from here, their home before md.py

__all__ = ["MMEACalculator", "nve_drift", "check_md_settings", "check_structure"]


@functools.lru_cache(maxsize=None)
def _make_calculator():
    from ase.calculators.calculator import Calculator, all_changes

    class _Calc(Calculator):
        """Energies (eV), forces (eV/Å) and, for a structure periodic in all three directions,
        the stress (eV/Å³, ASE's Voigt order and sign: ``(1/V) dE/dε``) from a MACE (or SevenNet)
        model, adapted or not.

        ``MMEACalculator(checkpoint="run/checkpoint.pt")`` rebuilds the fine-tuned model (base from the
        checkpoint, or ``model=`` to point at it elsewhere); ``MMEACalculator(module=net)`` wraps a model
        you have (on its device; multi-head: its head chosen, ``use_head``). ``device`` (cpu, cuda, cuda:N,
        auto): where a checkpoint's model runs. The checkpoint is read with ``weights_only=True``; a base
        model that is a whole pickled model needs ``trust_pickle=True`` (it runs code from the file).

        A checkpoint whose E0s were fitted on the training compositions holds their span
        (``e0_span``; ``None`` for ``module=``, given E0s and older checkpoints): the first structure
        with a composition outside it gets an :class:`~mmea_kernels.train.e0s.E0OffsetWarning`
        (once per calculator): its energy carries an unknown per-element offset, its forces do not.

        Per-atom energies as mace-torch's calculator gives them: ``energies`` (eV, summing to the
        energy; ``atoms.get_potential_energies()``) and ``node_energy`` (the same less each atom's E0).
        They are a partition of the energy, not an observable: another model splits it otherwise.

        ``checks`` (:class:`~mmea_kernels.train.checks.DataChecks`): each new lattice is checked against the
        cutoff before a neighbour list is built (a tiny or shrinking cell ran out of memory or hung). The
        default bounds the neighbours per atom (500) and accepts cells narrower than the cutoff (primitive
        bulk cells, as in ASE); md and relax pass ``--max-neighbors``/``--allow-small-cells``."""

        implemented_properties = ["energy", "free_energy", "energies", "node_energy", "forces", "stress"]

        def __init__(self, checkpoint: Optional[str] = None, module: Optional[torch.nn.Module] = None,
                     model: Optional[str] = None, dtype: Optional[str] = None, trust_pickle: bool = False,
                     device: str = "cpu", checks=None, **kwargs):
            super().__init__(**kwargs)
            from ..train.device import module_device
            from ..train.foundation import model_info

            if (checkpoint is None) == (module is None):
                raise ValueError("give exactly one of checkpoint= (a fine-tuning checkpoint) or module= (a model)")
            unused = [k for k, v in (("model", model), ("dtype", dtype), ("trust_pickle", trust_pickle)) if v]
            if module is not None and (unused or device != "cpu"):
                raise ValueError(f"{', '.join(unused + (['device'] if device != 'cpu' else []))}= are for checkpoint=; "
                                 "module= runs as it is (its own dtype and device: move it with .to() first)")
            self.checks = _lattice_checks(checks)
            self.e0_span, self._e0_seen, self._e0_warned = None, None, False
            if checkpoint is not None:
                from ..train import load_finetuned

                module, ckpt = load_finetuned(checkpoint, model, dtype=dtype, trust_pickle=trust_pickle, device=device)
                self.e0_span = ckpt.get("e0_span")
            from ..integrations.heads import head_chosen
            head_chosen(module, "MMEACalculator(module=...)")
            self.net = module.eval()
            self.z, self.r_max = model_info(module)
            self.dtype, self.device = next(module.parameters()).dtype, module_device(module)
            from ..integrations.mace import BatchCache

            self._batches = BatchCache(self.z, self.r_max, self.device, self.dtype)  # MD: new geometry, same atoms

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            a, periodic = _checked_copy(self, properties)
            _check_composition(self, a)
            batch = self._batches(a)
            out = self.net(batch, training=False, compute_force=True, **({"compute_stress": True} if periodic else {}))
            e = float(out["energy"].detach()[0])
            f = out["forces"].detach().to(torch.float64).cpu().numpy()
            stress = out["stress"].detach().to(torch.float64).cpu().numpy()[0] if periodic else np.zeros(0)
            if not (math.isfinite(e) and np.isfinite(f).all() and np.isfinite(stress).all()):
                raise ValueError(f"MMEACalculator: the model gives a non-finite energy ({e}) or forces"
                                 f"{' or stress' if periodic else ''} for this structure; {_closest_pair(batch)}")
            self.results = {"energy": e, "free_energy": e, "forces": f, **_per_atom(self, out, batch)}
            if periodic:
                from ase.stress import full_3x3_to_voigt_6_stress

                self.results["stress"] = full_3x3_to_voigt_6_stress(stress)

    # picklable (multiprocessing, ASE's .traj name): found as the module's MMEACalculator
    _Calc.__name__ = _Calc.__qualname__ = "MMEACalculator"
    return _Calc


def _lattice_checks(checks):
    from ..train.checks import DataChecks

    if checks is not None and not isinstance(checks, DataChecks):
        raise TypeError(f"checks= must be a DataChecks, got {type(checks).__name__}")
    return checks if checks is not None else DataChecks(allow_small_cells=True)


def _per_atom(calc, out: dict, batch: dict) -> dict:
    """``energies`` and ``node_energy`` (float64 arrays) from a model output with ``node_energy``
    (E0 included, as mace-torch's models and the SevenNet wrapper give it); empty otherwise."""
    node = out.get("node_energy")
    if node is None:
        return {}
    from ..integrations.heads import head_e0s

    node = node.detach().to(torch.float64)
    e0 = batch["node_attrs"].to(torch.float64) @ head_e0s(calc.net).detach().to(torch.float64)
    return {"energies": node.cpu().numpy(), "node_energy": (node - e0).cpu().numpy()}


def _checked_copy(calc, properties):
    """(a copy of the calculator's atoms without calculator, whether it is 3-D periodic), checked:
    atoms, finite positions and the model's elements on every call (an MD run that blows up must
    stop, not run on an empty neighbour list); the lattice when it changes (a periodic direction
    without a lattice vector would be read by mace's neighbour list as a 1 Å period)."""
    from ..train.checks import check_geometry, check_positions

    a = calc.atoms.copy()
    a.calc = None
    if len(a) == 0:
        raise ValueError("MMEACalculator: the structure has no atoms")
    check_positions([a], "MMEACalculator")
    if a.numbers.tobytes() != getattr(calc, "_checked_numbers", None):
        from ..integrations.mace import check_elements

        check_elements([a], calc.z, "MMEACalculator")
        calc._checked_numbers = a.numbers.tobytes()
    lattice = (a.cell.array.tobytes(), a.pbc.tobytes())
    if lattice != getattr(calc, "_checked_lattice", None):
        check_geometry([a], "MMEACalculator", calc.r_max, calc.checks)
        calc._checked_lattice = lattice
    periodic = bool(a.pbc.all()) and abs(a.cell.volume) > 1e-9  # stress with every evaluation there (NPT, relaxation)
    if "stress" in properties and not periodic:
        from ase.calculators.calculator import PropertyNotImplementedError

        raise PropertyNotImplementedError(
            f"MMEACalculator: stress needs a structure periodic in all three directions with a 3-D cell; "
            f"this one has pbc={a.pbc.tolist()} and cell volume {abs(a.cell.volume):.3g} Å³")
    return a, periodic


def _check_composition(calc, a) -> None:
    """Warn once per calculator when ``a``'s composition lies outside the span the checkpoint's E0s
    were fitted on (``calc.e0_span``; checked when the atoms change)."""
    key = a.numbers.tobytes()
    if calc.e0_span is None or calc._e0_warned or key == calc._e0_seen:
        return
    calc._e0_seen = key
    from ..train.e0s import warn_outside_span

    calc._e0_warned = bool(warn_outside_span(calc.e0_span, [a], "MMEACalculator", stacklevel=4))


def _closest_pair(batch) -> str:
    snd, rcv = batch["edge_index"]
    if snd.numel() == 0:
        return "no two atoms are within the cutoff"
    d = (batch["positions"][rcv] - batch["positions"][snd] + batch["shifts"]).detach().norm(dim=-1)
    k = int(torch.argmin(d))
    return f"the closest atoms, {int(snd[k])} and {int(rcv[k])}, are {float(d[k]):.3g} Å apart"


def __getattr__(name):  # build the ASE subclass lazily (ase is imported only when used)
    if name == "MMEACalculator":
        return _make_calculator()
    raise AttributeError(name)


def check_structure(atoms, calculator, where: str, checks=None) -> None:
    """The geometry checks of :mod:`.checks` (finite positions, lattice, cell width, coincident atoms,
    neighbour count) and the element check, for the model behind ``calculator``."""
    from ..train.checks import DataChecks, checked_graphs

    checked_graphs([atoms], calculator.z, calculator.r_max, where, dtype=calculator.dtype,
                   checks=checks or DataChecks(), labels=False)
