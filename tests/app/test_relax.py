"""Geometry optimisation (``mmea_kernels.app.relax``, ``mmea-kernels relax``) with the shipped MACE
and random MMEA adapters (float64): the relaxed structure, re-evaluated by a fresh calculator from
the written file, has every force below fmax and a lower energy, and three optimisers find the
same minimum; a cell relaxation ends with the stress at the target pressure within what fmax
allows (ASE's FrechetCellFilter: |σ + p|·V/N < fmax, or within --stress-tol), compresses under
20 kbar, and is judged on the final structure's own forces; refusals are
named, and the command line exits 3, with the last structure written, when it does not converge."""
import json

import numpy as np
import pytest

pytest.importorskip("mace")
from ase import units  # noqa: E402
from ase.io import read  # noqa: E402

from helpers import REPO  # noqa: E402
from mmea_kernels.app.relax import relax  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # ``calc``: tests/app/conftest.py
ETHANOL = REPO / "mmea_kernels" / "assets" / "ethanol_pbe" / "test.xyz"


def _fresh(path, calc):
    """The written structure, evaluated anew (not the values stored in the file)."""
    a = read(str(path))
    stored = a.get_potential_energy()
    a.calc = calc
    assert a.get_potential_energy() == pytest.approx(stored, abs=1e-6)
    return a


def test_relaxed_molecule_has_every_force_below_fmax(calc, tmp_path):
    mol = read(str(ETHANOL), 0)
    energies = {}
    for opt in ("bfgs", "lbfgs", "fire"):
        out = tmp_path / f"{opt}.xyz"
        _, res = relax(mol, calc, optimizer=opt, fmax=0.01, steps=1000, out=str(out))
        a = _fresh(out, calc)
        assert res["converged"] and np.linalg.norm(a.get_forces(), axis=1).max() < 0.01
        assert a.get_potential_energy() < res["initial_energy_eV"] - 0.1  # a thermal frame relaxes by ~0.7 eV
        np.testing.assert_allclose(a.get_positions(), read(str(out)).get_positions())
        written = read(str(out))  # the relaxed frame's own numbers only, not the thermal start's labels
        assert "REF_energy" not in written.info and "REF_forces" not in written.arrays
        assert "momenta" not in written.arrays
        energies[opt] = a.get_potential_energy()
    assert max(energies.values()) - min(energies.values()) < 1e-3, energies  # one minimum, three ways


def test_cell_relaxation_reaches_the_target_pressure(calc, tmp_path):
    box = read(str(ETHANOL), 0)
    box.cell = np.array([[5.5, 0, 0], [0.4, 5.0, 0], [0.3, 0.2, 4.5]])
    box.pbc = True
    vols = {}
    for p in (0.0, 20000.0):
        out = tmp_path / f"p{p:g}.xyz"
        _, res = relax(box, calc, cell=True, pressure_bar=p, fmax=0.05, steps=400, out=str(out))
        a = _fresh(out, calc)
        sigma = a.get_stress(voigt=False) + p * units.bar * np.eye(3)
        assert res["converged"] and np.abs(sigma).max() * a.get_volume() / len(a) < 0.05, sigma
        # judged on its own forces (the shrink under the default criterion, the only one here: 20 kbar takes
        # a second round; test_a_shrinking_cell_is_converged_on_its_own_forces_and_stress runs --stress-tol)
        assert np.linalg.norm(a.get_forces(), axis=1).max() <= 0.05
        assert res["optimizer_rounds"] >= 2 or p == 0.0, res
        assert res["volume_A3"] == pytest.approx(a.get_volume(), rel=1e-6)
        vols[p] = a.get_volume()
    assert vols[20000.0] < 0.8 * box.get_volume() and vols[20000.0] < 0.8 * vols[0.0], vols


def test_a_shrinking_cell_is_converged_on_its_own_forces_and_stress(calc, tmp_path):
    """One ethanol in a 6.5 Å box under 5 kbar: the volume falls by ~2/3, and ASE's
    FrechetCellFilter, which sees the forces through that deformation, once called it converged
    with forces 1.4x fmax (found in review). The written structure, evaluated anew, has every force
    below fmax, after a second optimiser round from it; with --stress-tol every stress component is
    within it of the target too, where the default criterion (fmax·N/V, reported) is ~15x looser. The
    box is relaxed once, at 200 bar (--stress-tol is checked on the structure itself after every
    step, beside ASE's test: test_a_tight_stress_tol_never_blows_the_cell_up). The default criterion and a --stress-tol looser
    than it (1e6), which keeps it, are judged from that relaxed cell, which meets both: 0 steps (from
    the box the default run took another ~190 steps, half the test's time, through the same rounds;
    a cell shrinking under the default criterion, 2 rounds, is
    test_cell_relaxation_reaches_the_target_pressure's)."""
    box = read(str(ETHANOL), 0)
    box.cell, box.pbc = np.eye(3) * 6.5, True
    box.center()
    for tol in (200.0, None, 1e6):
        out = tmp_path / f"tol{tol}.xyz"
        first = box if tol == 200.0 else read(str(tmp_path / "tol200.0.xyz"))
        _, res = relax(first, calc, cell=True, pressure_bar=5000.0, fmax=0.02, steps=300, stress_tol_bar=tol,
                       out=str(out))
        a = _fresh(out, calc)
        assert res["converged"] and a.get_volume() < 0.4 * box.get_volume(), res
        assert np.linalg.norm(a.get_forces(), axis=1).max() <= 0.02
        residual = np.abs(a.get_stress(voigt=False) + 5000.0 * units.bar * np.eye(3)).max() / units.bar
        assert residual == pytest.approx(res["max_stress_residual_bar"], abs=0.1)  # the file: 8 decimals
        if tol != 200.0:
            assert res["stress_tol_bar"] == pytest.approx(0.02 * len(a) / a.get_volume() / units.bar)
            assert 14 * 200.0 < res["stress_tol_bar"] < 1e5 and residual <= res["stress_tol_bar"]
        else:
            assert residual <= tol and res["stress_tol_bar"] == tol


def test_a_periodic_direction_without_a_lattice_is_refused(calc):
    """mace's neighbour list reads a zero lattice vector as a 1 Å period (the shipped model then
    gave 7.9e17 eV, found in review): the calculator refuses it by name."""
    mol = read(str(ETHANOL), 0)
    mol.calc = calc
    for pbc in ([True, False, False], True):
        mol.pbc = pbc
        with pytest.raises(ValueError, match="periodic along a.* but has no \\(or a degenerate\\) lattice"):
            mol.get_potential_energy()
        with pytest.raises(ValueError, match="has no \\(or a degenerate\\) lattice"):
            relax(mol, calc, steps=2)


def test_relax_refusals(calc, tmp_path):
    mol = read(str(ETHANOL), 0)
    (tmp_path / "old.xyz").write_text("keep")
    cases = [(dict(cell=True), ValueError, r"--cell needs a structure periodic in all three directions.*pbc=\["),
             (dict(pressure_bar=100.0), ValueError, "--pressure acts on the cell: it needs --cell"),
             (dict(pressure_bar=0.0), ValueError, "--pressure acts on the cell: it needs --cell"),
             (dict(fmax=0.0), ValueError, "--fmax must be a force > 0"),
             (dict(optimizer="cg"), ValueError, "unknown --optimizer 'cg'"),
             (dict(out=str(tmp_path / "x.pdb")), ValueError, "name it \\*.xyz or \\*.extxyz"),
             (dict(out=str(tmp_path / "old.xyz")), FileExistsError, "old.xyz exists; pass --overwrite"),
             (dict(trajectory=str(tmp_path / "t.xyz")), ValueError, "must end in .traj"),
             (dict(steps=0), ValueError, "--steps must be a whole number >= 1, got 0"),
             (dict(cell=True, pressure_bar=float("inf")), ValueError, "--pressure must be finite"),
             (dict(stress_tol_bar=100.0), ValueError, "--stress-tol is a criterion on the cell: it needs --cell"),
             (dict(cell=True, stress_tol_bar=0.0), ValueError, "--stress-tol must be a stress > 0 bar"),
             (dict(out=str(tmp_path / "d.xyz")), IsADirectoryError, "d.xyz is a directory")]
    (tmp_path / "d.xyz").mkdir()
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            relax(mol, calc, **{"steps": 2, **kw})
    assert (tmp_path / "old.xyz").read_text() == "keep"


def test_relax_stops_when_the_energy_turns_non_finite():
    from ase import Atoms
    from ase.calculators.calculator import Calculator, all_changes

    class Blows(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            far = float(np.linalg.norm(self.atoms.positions[1] - self.atoms.positions[0]))
            f = np.zeros((2, 3))
            f[0, 0], f[1, 0] = -1.0, 1.0  # pushes the atoms apart; past 1.5 Å the energy is NaN
            self.results = {"energy": float("nan") if far > 1.5 else -far, "forces": f}

    with pytest.raises(ValueError, match=r"relax stopped: the energy is nan at step \d+"):
        relax(Atoms("H2", positions=[(0, 0, 0), (0.8, 0, 0)]), Blows(), fmax=1e-3, steps=200, optimizer="fire")


def test_relax_command_exits_3_when_it_does_not_converge(train_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.xyz"
    args = ["relax", "--checkpoint", str(train_checkpoint), "--structure", f"{ETHANOL}@0", "--out", str(out),
            "--device", "cpu"]
    from mmea_kernels.app.cli import main

    capsys.readouterr()
    assert main(args + ["--steps", "2", "--fmax", "1e-4"]) == 3
    cap = capsys.readouterr()
    assert not json.loads(cap.out)["converged"] and "not converged within 2 steps" in cap.err
    assert len(read(str(out), ":")) == 1
    assert main(args + ["--fmax", "0.05"]) == 2 and "r.xyz exists; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--fmax", "0.05", "--overwrite", "--trajectory", str(tmp_path / "r.traj")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["converged"] and len(read(str(tmp_path / "r.traj"), ":")) == res["steps"] + 1


def test_a_trajectory_frame_interrupted_half_way_is_finished_first(calc, tmp_path, monkeypatch):
    """Ctrl-C (or the command line's SIGTERM) inside a ``--trajectory`` frame: ASE's optimisers open the
    file for every frame and closing it completes a half frame with whatever the file held. Now the
    interrupt waits for the frame to end: every frame read back equals the uninterrupted run's."""
    from helpers import interrupted_in_third_traj_frame

    mol = read(str(ETHANOL), 0)
    relax(mol, calc, optimizer="bfgs", fmax=0.01, steps=6, trajectory=str(tmp_path / "whole.traj"))
    whole = read(str(tmp_path / "whole.traj"), ":")
    sent = interrupted_in_third_traj_frame(monkeypatch, lambda: relax(mol, calc, optimizer="bfgs", fmax=0.01, steps=6,
                                                                      trajectory=str(tmp_path / "t.traj")))
    got = read(str(tmp_path / "t.traj"), ":")
    assert sent and len(got) == 3 and len(whole) > 3
    for a, b in zip(got, whole):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.get_forces(), b.get_forces())


def test_the_default_optimizer_is_bfgs_for_small_structures_and_lbfgs_for_large_ones(calc):
    """``--optimizer auto`` (default): ASE's BFGS keeps a dense 3N x 3N Hessian and diagonalises it every
    step (15 s a step at 1,536 atoms, a review: three times the model's time), so above 300 atoms
    LBFGS runs; the summary names the optimiser that ran. Each takes its step as ASE's own would."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.optimize import LBFGS

    from mmea_kernels.app.relax import BFGS_MAX_ATOMS

    mol = read(str(ETHANOL), 0)
    assert relax(mol, calc, steps=1)[1]["optimizer"] == "bfgs"
    big = bulk("Cu", cubic=True).repeat((5, 4, 4))  # 320 atoms
    assert len(big) > BFGS_MAX_ATOMS
    big.rattle(0.05, seed=1)
    got, res = relax(big, EMT(), steps=2)
    assert res["optimizer"] == "lbfgs"
    ref = big.copy()
    ref.calc = EMT()
    LBFGS(ref, logfile=None).run(fmax=0.01, steps=2)
    np.testing.assert_allclose(got.positions, ref.positions, rtol=0, atol=1e-12)
    assert relax(big, EMT(), steps=1, optimizer="bfgs")[1]["optimizer"] == "bfgs"  # asked for: as asked


def test_a_tight_stress_tol_never_blows_the_cell_up():
    """A review (2026-12-03): --stress-tol used to lower the filter's cell factor to tol·V/fmax, so
    the optimiser's step in the cell coordinate became a strain of ~0.9; a rattled Cu box (EMT) at
    10 bar grew from a = 3.55 to 8.65 Å in one step, past EMT's cutoff, where zero forces and stress
    passed as converged. Now every start ends at EMT's own lattice constant (a fit of its energy on
    a volume scan, ase.eos), every stress component within the tolerance, evaluated anew."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.eos import EquationOfState

    cells = [bulk("Cu", "fcc", a=a, cubic=True) for a in np.linspace(3.5, 3.7, 9)]
    for c in cells:
        c.calc = EMT()
    v0, _, _ = EquationOfState([c.get_volume() for c in cells], [c.get_potential_energy() for c in cells]).fit()
    a0 = v0 ** (1 / 3)  # the conventional cubic cell: V = a³
    for start in (3.55, 3.80):
        box = bulk("Cu", "fcc", a=start, cubic=True).repeat((2, 2, 2))
        box.rattle(0.02, seed=2)
        out, res = relax(box, EMT(), cell=True, fmax=0.01, stress_tol_bar=10.0, steps=300)
        a = (out.get_volume() / 8) ** (1 / 3)
        assert res["converged"] and a == pytest.approx(a0, abs=2e-3), (start, a, a0, res)
        fresh = out.copy()
        fresh.calc = EMT()
        assert np.abs(fresh.get_stress(voigt=False)).max() / units.bar <= 10.0
        assert np.linalg.norm(fresh.get_forces(), axis=1).max() <= 0.01
        assert res["final_energy_eV"] < res["initial_energy_eV"]

