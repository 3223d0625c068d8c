"""Geometry optimisation with a (fine-tuned) model through ASE: the positions, and for a structure
periodic in all three directions optionally the cell (``cell=True``: ASE's ``FrechetCellFilter``,
driven by the model's stress toward a target pressure), until every force (and the cell's
generalised force) is below ``fmax``. What MD usually starts from."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import numpy as np

from .files import check_outputs
from .md import _clean_copy, _periodic
from .trajfile import WholeFrameTrajectory

__all__ = ["RelaxSettings", "relax", "OPTIMIZERS"]

OPTIMIZERS = ("auto", "bfgs", "lbfgs", "fire")
BFGS_MAX_ATOMS = 300  # "auto": BFGS up to here, LBFGS above (BFGS keeps a dense 3N x 3N Hessian, eigh each step)


@dataclasses.dataclass
class RelaxSettings:
    """``fmax`` (eV/Å): the convergence threshold on the largest force; ``steps``: the most
    optimiser steps; ``cell``: relax the cell too (3-D periodic structures); ``pressure_bar``: the
    target pressure of a cell relaxation (default 0; given without ``cell``: refused, like md's); ``stress_tol_bar``: with ``cell``, converged also needs
    every component of stress + pressure within this (default: ASE's cell criterion, the virial over
    N below ``fmax``, i.e. within ``fmax·N/V``; a looser value keeps ASE's; the summary reports the one applied); ``out``: the final structure (extended XYZ, with energy,
    forces and, when periodic, stress); ``trajectory``: every step (``.traj``); ``log``: the
    optimiser's log (``"-"``: standard output). Existing files are refused unless ``overwrite``.
    ``optimizer``: ASE's BFGS, LBFGS or FIRE; ``"auto"`` (default) BFGS up to ``BFGS_MAX_ATOMS`` atoms and
    LBFGS above (BFGS's dense Hessian costs O(N²) memory and an O(N³) eigendecomposition every step:
    15 s a step at 1,536 atoms on a 2-core CPU, where the model took 5 s)."""

    fmax: float = 0.01
    steps: int = 500
    optimizer: str = "auto"
    cell: bool = False
    pressure_bar: Optional[float] = None
    stress_tol_bar: Optional[float] = None
    out: Optional[str] = None
    trajectory: Optional[str] = None
    log: Optional[str] = None
    overwrite: bool = False

    def check(self, inputs: Optional[dict] = None) -> None:
        """``ValueError`` for a setting that cannot be run, an output file refused (exists without
        ``overwrite``, or is one of ``inputs``, ``{option: path}``: the files the run reads)."""
        if not (math.isfinite(self.fmax) and self.fmax > 0):
            raise ValueError(f"--fmax must be a force > 0 eV/Å, got {self.fmax}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"--steps must be a whole number >= 1, got {self.steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown --optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.pressure_bar is not None:
            if not math.isfinite(self.pressure_bar):
                raise ValueError(f"--pressure must be finite, got {self.pressure_bar}")
            if not self.cell:
                raise ValueError("--pressure acts on the cell: it needs --cell")
        if self.stress_tol_bar is not None:
            if not (math.isfinite(self.stress_tol_bar) and self.stress_tol_bar > 0):
                raise ValueError(f"--stress-tol must be a stress > 0 bar, got {self.stress_tol_bar}")
            if not self.cell:
                raise ValueError("--stress-tol is a criterion on the cell: it needs --cell")
        if self.out is not None and os.path.splitext(self.out)[1].lower() not in (".xyz", ".extxyz"):
            raise ValueError(f"--out {self.out}: the final structure is written as extended XYZ; name it *.xyz or "
                             "*.extxyz")
        if self.trajectory is not None and not self.trajectory.lower().endswith(".traj"):
            raise ValueError(f"--trajectory {self.trajectory}: the name must end in .traj")
        check_outputs({"--out": self.out, "--trajectory": self.trajectory, "--log": self.log}, self.overwrite,
                      inputs)


def _chosen(s: RelaxSettings, atoms) -> str:
    """The optimiser that runs: ``s.optimizer``, or for "auto" BFGS up to ``BFGS_MAX_ATOMS`` atoms, LBFGS above."""
    if s.optimizer != "auto":
        return s.optimizer
    return "bfgs" if len(atoms) <= BFGS_MAX_ATOMS else "lbfgs"


def _optimizer(name: str):
    from ase import optimize

    return {"bfgs": optimize.BFGS, "lbfgs": optimize.LBFGS, "fire": optimize.FIRE}[name]


def relax(atoms, calculator, settings: Optional[RelaxSettings] = None, where: str = "the structure", **kw):
    """(relaxed copy of ``atoms`` (numbers, positions, cell, pbc, constraints; not its labels),
    summary). The summary: converged (every force below fmax, and with ``cell`` the cell criterion,
    both checked on the final structure itself), steps taken, energies before and after (eV), the
    largest force after (eV/Å), and for periodic structures the stress and volume after. Raises
    ``ValueError`` for settings it cannot run and when the energy turns non-finite.

    A cell relaxation runs ASE's ``FrechetCellFilter``, whose convergence test sees the forces
    through the cell's deformation since the start: after a cell has shrunk by 30 % it reports
    convergence while forces are still 1.4x ``fmax``. When the final structure fails the test
    itself, the optimiser starts again from it with a fresh filter, within the same ``steps``."""
    from ase import units

    s = dataclasses.replace(settings or RelaxSettings(), **kw)
    s.check()
    if s.cell and not _periodic(atoms):
        raise ValueError(f"--cell needs a structure periodic in all three directions with a 3-D cell; {where} has "
                         f"pbc={np.asarray(atoms.pbc).tolist()} and cell volume {abs(atoms.cell.volume):.3g} Å³")
    atoms = _clean_copy(atoms, keep_momenta=False)  # no labels of the input frame beside the relaxed one
    atoms.calc = calculator
    e0 = atoms.get_potential_energy()
    if s.trajectory and os.path.exists(s.trajectory):
        os.remove(s.trajectory)  # s.check() refused it unless overwrite
    log = open(s.log, "w") if s.log not in (None, "-") else s.log
    steps, rounds = 0, 0
    try:
        while True:
            traj = WholeFrameTrajectory(s.trajectory, "a" if rounds else "w") if s.trajectory else None
            opt = _optimizer(_chosen(s, atoms))(_target(atoms, s), logfile=log, trajectory=traj)
            opt.attach(_finite(atoms, opt), interval=1)
            try:
                # ASE's test (the filter's forces below fmax); with stress_tol_bar the run's own, on the
                # structure as it is after each step (ASE's optimiser would stop on its looser cell test)
                own = s.stress_tol_bar is not None
                for _ in opt.irun(fmax=0.0 if own else s.fmax, steps=s.steps - steps):
                    if own and _converged(atoms, s):
                        break
            finally:
                if traj is not None:
                    traj.close()  # each frame whole: an interrupt waits for it (app.trajfile)
            steps, rounds = steps + int(opt.nsteps), rounds + 1
            converged = _converged(atoms, s)
            if converged or steps >= s.steps or opt.nsteps == 0:
                break
    finally:
        if log not in (None, "-"):
            log.close()
    return atoms, _relax_summary(atoms, s, converged, steps, rounds, e0)


def _target(atoms, s: RelaxSettings):
    """What the optimiser moves: the atoms, or (``cell``) a fresh ``FrechetCellFilter`` on them with
    ASE's cell factor (the number of atoms). A tighter cell criterion (``stress_tol_bar``) is checked
    beside it (:func:`_converged`), never by lowering the factor: that made the optimiser's step in
    the cell coordinate a strain of ~0.9 (a review: a Cu box grew 2.4x in one step, past the cutoff,
    where zero forces and stress passed as converged)."""
    if not s.cell:
        return atoms
    from ase import units

    try:
        from ase.filters import FrechetCellFilter
    except ImportError:
        import ase

        raise ImportError(f"relax --cell needs ase.filters.FrechetCellFilter, which ASE {ase.__version__} "
                          "lacks; pip install 'ase>=3.23'") from None
    return FrechetCellFilter(atoms, scalar_pressure=(s.pressure_bar or 0.0) * units.bar)


def _stress_tol_bar(atoms, s: RelaxSettings) -> float:
    """The cell criterion the run applied (bar): ``stress_tol_bar`` or ASE's ``fmax·N/V``, whichever is
    tighter (:func:`_target` never loosens ASE's)."""
    from ase import units

    ase_tol = float(s.fmax * len(atoms) / atoms.get_volume() / units.bar)
    return ase_tol if s.stress_tol_bar is None else min(float(s.stress_tol_bar), ase_tol)


def _converged(atoms, s: RelaxSettings) -> bool:
    """The optimiser's own test on the structure as it is now (a fresh filter: no deformation) and,
    with ``stress_tol_bar``, every component of ``σ + p·I`` within it."""
    g = _target(atoms, s).get_forces()
    if not np.linalg.norm(g, axis=1).max(initial=0.0) <= s.fmax:
        return False
    return s.stress_tol_bar is None or _stress_residual_bar(atoms, s) <= s.stress_tol_bar


def _stress_residual_bar(atoms, s: RelaxSettings) -> float:
    """``max |σ + p·I|`` (bar): how far the cell is from the target pressure."""
    from ase import units

    residual = atoms.get_stress(voigt=False) + (s.pressure_bar or 0.0) * units.bar * np.eye(3)
    return float(np.abs(residual).max() / units.bar)


def _finite(atoms, opt):
    def check():
        e = atoms.get_potential_energy()
        if not math.isfinite(e):
            raise ValueError(f"relax stopped: the energy is {e} at step {opt.nsteps}; the structure or the model is "
                             "unstable there")
    return check


def _relax_summary(atoms, s: RelaxSettings, converged: bool, steps: int, rounds: int, e0: float) -> dict:
    from ase import units

    forces = atoms.get_forces()
    res = {"converged": converged, "steps": steps, "optimizer": _chosen(s, atoms), "cell": s.cell,
           "fmax": s.fmax, "atoms": len(atoms), "initial_energy_eV": float(e0),
           "final_energy_eV": float(atoms.get_potential_energy()),
           "max_force_eV_per_A": float(np.linalg.norm(forces, axis=1).max())}
    if _periodic(atoms):
        stress = atoms.get_stress()
        res.update(volume_A3=float(atoms.get_volume()), pressure_bar=float(-stress[:3].mean() / units.bar),
                   stress_eV_per_A3=[float(v) for v in stress])
    if s.cell:
        res.update(max_stress_residual_bar=_stress_residual_bar(atoms, s), optimizer_rounds=rounds,
                   stress_tol_bar=_stress_tol_bar(atoms, s))
    if s.out is not None:
        _write_atomically(s.out, atoms)
        res["out"] = s.out
    return res


def _write_atomically(path: str, atoms) -> None:
    """Write ``atoms`` (extended XYZ) to ``path`` whole or not at all (a temporary file renamed over
    it: a kill or a full disk mid-write leaves the previous file, or none; a symlink is written through)."""
    import io

    from ase.io import write

    from ..train.checkpoint import atomic_write_text

    text = io.StringIO()
    write(text, atoms, format="extxyz")
    atomic_write_text(path, text.getvalue())
