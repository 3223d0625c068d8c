"""Molecular dynamics (``mmea_kernels.app.md``) with the shipped pretrained MACE (a smooth H, C, N, O
potential) carrying random MMEA adapters, in float64: each thermostat brings a hot start to its
target while NVE stays hot; the quantity each integrator conserves (Bussi: total energy minus the
energy the thermostat put in; Nosé–Hoover and MTK: the extended Hamiltonian, whose barostat part
uses the model's stress) stays put while the total energy itself changes 20-100x more; the barostat
compresses under a high target pressure and expands a gas-like box at 1 bar; trajectory frames hold
what the calculator gives for them, and a run continued from its last frame ends where one
uninterrupted run ends."""
import numpy as np
import pytest

pytest.importorskip("mace")
from ase import Atoms  # noqa: E402
from ase.io import read  # noqa: E402

from helpers import CUDA_AVAILABLE, REPO  # noqa: E402
from mmea_kernels.app.calculator import MMEACalculator  # noqa: E402
from mmea_kernels.app.md import MDSettings, run_md, temperature  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ETHANOL = REPO / "mmea_kernels" / "assets" / "ethanol_pbe" / "test.xyz"  # ``calc``: tests/app/conftest.py


def _molecules(n, spacing, cell=None):
    """``n`` ethanol frames of the shipped PBE data on a 2x2x2 grid ``spacing`` Å apart; periodic
    in a cubic ``cell`` (Å) when given."""
    out = Atoms()
    for i in range(n):
        m = read(str(ETHANOL), i)
        m.positions += np.array([i % 2, (i // 2) % 2, i // 4]) * spacing
        out += m
    if cell is not None:
        out.cell, out.pbc = np.eye(3) * cell, True
    return out


def _hot(atoms, temperature_K, seed):
    from ase.md import velocitydistribution as vd

    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    vd.Stationary(atoms)
    vd.ZeroRotation(atoms)
    return atoms


def _frames(path, dof):
    fr = read(str(path), ":")
    temps = np.array([temperature(f, dof) for f in fr])
    etot = np.array([f.get_potential_energy() + f.get_kinetic_energy() for f in fr])
    return fr, temps, etot


@pytest.mark.parametrize("ensemble,thermostat", [("nve", None), ("nvt", "langevin"), ("nvt", "bussi"),
                                                 ("nvt", "nose-hoover")])
def test_thermostats_bring_a_hot_start_to_the_target(calc, ensemble, thermostat, tmp_path):
    """4 ethanol molecules (36 atoms) started at ~1100 K, target 300 K, tdamp 15 fs, 100 fs: the mean
    temperature of the second half is within 25 % of 300 K (NVE: above 600 K; a tdamp 10x longer
    would leave it above 550 K). The conserved
    quantity moves < 5 % of the total energy's change (the thermostat's bookkeeping is right)."""
    start = _hot(_molecules(4, 6.0), 1200.0, seed=0)
    traj = tmp_path / "t.traj"
    res = run_md(start, calc, steps=100, dt_fs=1.0, temperature_K=300.0, ensemble=ensemble, thermostat=thermostat,
                 velocities="file", trajectory=str(traj), interval=4, **({} if ensemble == "nve" else {"tdamp_fs": 15.0}))
    fr, temps, etot = _frames(traj, res["degrees_of_freedom"])
    assert len(fr) == 100 // 4 + 1 and temps[0] > 1000
    assert res["degrees_of_freedom"] == 3 * 36 - (3 if thermostat == "langevin" else 6)
    late = temps[len(temps) // 2:].mean()
    if ensemble == "nve":
        assert late > 600, late
    else:
        assert 225 < late < 375, (late, temps)
    if thermostat == "langevin":
        assert "drift_meV_per_atom_per_ps" not in res  # nothing is conserved
        return
    change = 1000 * np.ptp(etot) / len(start)  # meV/atom
    if ensemble != "nve":
        assert change > 50 and res["max_deviation_meV_per_atom"] < 0.05 * change, (res, change)
    else:  # velocity Verlet at 1 fs: the total energy is the conserved quantity, within a few meV/atom
        assert res["max_deviation_meV_per_atom"] == pytest.approx(
            1000 * np.abs(etot - etot[0]).max() / len(start), rel=0.5)
        assert res["max_deviation_meV_per_atom"] < 5.0


def test_barostat_follows_the_target_pressure_and_conserves_its_hamiltonian(calc, tmp_path):
    """8 ethanol molecules in a periodic 10 Å box (a gas-like 0.61 g/cm³): at 1 bar it expands, at
    20 kbar it shrinks below both. The MTK extended Hamiltonian (kinetic + potential + the
    barostat's p·V, which uses the model's stress) moves < 5 % of the total energy's change. Each
    frame's stored energy, forces and stress are what the calculator gives for it."""
    box = _molecules(8, 5.0, cell=10.0)
    v0 = box.get_volume()
    final, runs = {}, {}
    for p in (1.0, 20000.0):
        traj = tmp_path / f"p{p:g}.traj"
        runs[p] = run_md(box, calc, steps=60, dt_fs=0.5, temperature_K=300.0, ensemble="npt", pressure_bar=p,
                         pdamp_fs=50.0, tdamp_fs=25.0, trajectory=str(traj), interval=6)
        fr, _, etot = _frames(traj, runs[p]["degrees_of_freedom"])
        final[p] = fr[-1].get_volume()
        change = 1000 * np.ptp(etot) / len(box)
        assert runs[p]["max_deviation_meV_per_atom"] < 0.05 * change, (runs[p], change)
        assert runs[p]["final_volume_A3"] == pytest.approx(final[p], rel=1e-12)
    assert final[1.0] > 1.05 * v0 and final[20000.0] < 0.85 * v0, (v0, final)
    assert runs[20000.0]["mean_density_g_per_cm3"] > runs[1.0]["mean_density_g_per_cm3"]
    run_md(box, calc, steps=3, ensemble="nvt", thermostat="langevin", trajectory=str(tmp_path / "l.traj"))
    assert read(str(tmp_path / "l.traj"), -1).constraints  # Langevin's FixCom is in its frames ...
    res = run_md(read(str(tmp_path / "l.traj"), -1), calc, steps=3, ensemble="npt", velocities="file")
    assert res["steps"] == 3  # ... and an NPT run continues from them (MTK takes no constraints)
    last = fr[-1]
    e, f, s = last.get_potential_energy(), last.get_forces(), last.get_stress()
    last.calc = calc
    assert last.get_potential_energy() == pytest.approx(e, rel=1e-12)
    np.testing.assert_allclose(last.get_forces(), f, atol=1e-10)
    np.testing.assert_allclose(last.get_stress(), s, atol=1e-12)


def test_npt_samples_the_target_temperature_over_the_moving_degrees_of_freedom():
    """4 Cu atoms (ASE's EMT: fast), NPT at 600 K for 2 ps: the mean temperature over 3N - 3 = 9
    degrees of freedom is 600 ± 80 K (seeds 0-19: 564-617 K; over 6 ps seeds 0-3 gave 577-599 K).
    ASE's MTK couples to 3N and ran N/(N-1) hot: 742-782 K over 2 ps (seeds 0-7; 772-792 K over
    6 ps), which fails."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    res = run_md(bulk("Cu", cubic=True), EMT(), steps=1000, dt_fs=2.0, temperature_K=600.0, ensemble="npt",
                 tdamp_fs=20.0, pdamp_fs=200.0, seed=0)
    assert res["degrees_of_freedom"] == 9
    assert 520 < res["mean_temperature_K"] < 680, res
    assert res["max_deviation_meV_per_atom"] < 5.0


@pytest.mark.parametrize("thermostat", ["bussi", "nose-hoover"])
def test_a_molecule_samples_the_target_temperature_over_its_moving_degrees_of_freedom(calc, thermostat):
    """A water molecule, its centre-of-mass motion and rotation removed at the start and conserved by
    the global thermostats: its kinetic energy is shared among 3N - 6 = 3 degrees of freedom, and over
    300 fs at tdamp 10 fs the mean temperature over them is within 150–550 K of a 300 K target
    (seeds 0–2 gave 231–405 K). ASE's Bussi and Nosé–Hoover couple to 3N = 9 by default, which puts
    ~3x the energy in them: 832 and 878 K (fails)."""
    from ase.build import molecule

    res = run_md(molecule("H2O"), calc, steps=600, dt_fs=0.5, temperature_K=300.0, ensemble="nvt",
                 thermostat=thermostat, tdamp_fs=10.0, seed=0)
    assert res["degrees_of_freedom"] == 3
    assert 150 < res["mean_temperature_K"] < 550, res


def test_constraints_stay_and_labels_go(calc, tmp_path):
    """A frame with fixed atoms: Langevin runs with them still (their positions do not move, the
    temperature counts the free degrees of freedom), Nosé–Hoover is refused by name; the written
    frames carry the run's energies and forces, not the input frame's labels."""
    from ase.constraints import FixAtoms

    mol = read(str(ETHANOL), 0)
    assert "REF_energy" in mol.info and "REF_forces" in mol.arrays
    mol.set_constraint(FixAtoms(indices=[0, 1]))
    res = run_md(mol, calc, steps=20, ensemble="nvt", thermostat="langevin", trajectory=str(tmp_path / "t.xyz"),
                 interval=10)
    assert res["degrees_of_freedom"] == 3 * 9 - 6
    frames = read(str(tmp_path / "t.xyz"), ":")
    np.testing.assert_allclose(frames[-1].positions[:2], mol.positions[:2], atol=1e-12)
    assert np.abs(frames[-1].positions[2:] - mol.positions[2:]).max() > 1e-4
    for f in frames:
        assert "REF_energy" not in f.info and "REF_forces" not in f.arrays and "xtb_energy" not in f.info
    with pytest.raises(ValueError, match=r"has constraints \(FixAtoms\), which ASE's Nosé–Hoover"):
        run_md(mol, calc, steps=2, ensemble="nvt", thermostat="nose-hoover")


@pytest.mark.parametrize("suffix,tol", [(".traj", 1e-12), (".extxyz", 1e-6)])
def test_a_run_continued_from_its_trajectory_ends_where_one_run_ends(calc, suffix, tol, tmp_path):
    """NVE, 2 x 10 steps (the second from the first one's last frame, ``velocities="file"``) against
    20 steps at once: the same final frame (exact through .traj; extxyz stores 8 decimals)."""
    mol = read(str(ETHANOL), 0)
    s = MDSettings(steps=20, dt_fs=0.5, interval=10, seed=3)
    run_md(mol, calc, s, trajectory=str(tmp_path / f"one{suffix}"))
    run_md(mol, calc, s, steps=10, trajectory=str(tmp_path / f"a{suffix}"))
    half = read(str(tmp_path / f"a{suffix}"), -1)
    assert np.abs(half.get_momenta()).max() > 0
    run_md(half, calc, s, steps=10, velocities="file", trajectory=str(tmp_path / f"b{suffix}"))
    one, two = read(str(tmp_path / f"one{suffix}"), -1), read(str(tmp_path / f"b{suffix}"), -1)
    assert len(read(str(tmp_path / f"one{suffix}"), ":")) == 3
    np.testing.assert_allclose(two.positions, one.positions, atol=tol)
    np.testing.assert_allclose(two.get_momenta(), one.get_momenta(), atol=tol)
    assert two.get_potential_energy() == pytest.approx(one.get_potential_energy(), abs=100 * tol)


def test_md_settings_and_structures_it_refuses(calc, tmp_path):
    mol = read(str(ETHANOL), 0)
    del mol.arrays["momenta"]  # the shipped frames carry the momenta of their PBE MD
    (tmp_path / "old.traj").write_text("keep")
    cases = [(dict(ensemble="nvp"), ValueError, "unknown --ensemble 'nvp'"),
             (dict(thermostat="bussi"), ValueError, "--thermostat bussi needs --ensemble nvt or npt"),
             (dict(ensemble="npt", thermostat="langevin"), ValueError, "npt runs Nosé–Hoover chains"),
             (dict(ensemble="nvt", temperature_K=0.0), ValueError, "needs a temperature > 0 K"),
             (dict(ensemble="nvt", tdamp_fs=-1.0), ValueError, "--tdamp must be a time > 0 fs"),
             (dict(interval=0), ValueError, "--interval must be a whole number of steps >= 1"),
             (dict(dt_fs=0.0), ValueError, "time step > 0 fs, got --dt 0.0"),
             (dict(trajectory=str(tmp_path / "t.pdb")), ValueError, "must end in one of .traj, .xyz, .extxyz"),
             (dict(trajectory=str(tmp_path / "old.traj")), FileExistsError, "exists; pass --overwrite"),
             (dict(log=str(tmp_path / "nodir" / "md.log")), FileNotFoundError, "nodir does not exist"),
             (dict(velocities="file"), ValueError, "carries no momenta"),
             (dict(ensemble="npt", pressure_bar=float("nan")), ValueError, "--pressure must be finite"),
             (dict(velocities="restart"), ValueError, "--velocities must be maxwell or file"),
             (dict(ensemble="nvt", pressure_bar=5000.0), ValueError, "pressure_bar is for ensemble='npt'; this run"),
             (dict(ensemble="nvt", pdamp_fs=50.0), ValueError, "pdamp_fs is for ensemble='npt'"),
             (dict(tdamp_fs=50.0), ValueError, r"tdamp_fs is for a thermostat \(ensemble='nvt' or 'npt'\)"),
             (dict(save_state_every=5), ValueError, "save_state_every is for save_state;"),
             (dict(trajectory=str(tmp_path / "a.xyz"), log=str(tmp_path / "a.xyz")), ValueError,
              "two outputs are the same file"),
             (dict(ensemble="npt"), ValueError, r"npt needs a structure periodic in all three directions.*pbc=\[")]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            run_md(mol, calc, steps=2, **kw)
    hot = mol.copy()
    hot.set_momenta(np.full((len(mol), 3), np.nan))
    with pytest.raises(ValueError, match="the momenta in the file are not finite"):
        run_md(hot, calc, steps=2, velocities="file")
    assert (tmp_path / "old.traj").read_text() == "keep"  # nothing overwritten
    run_md(mol, calc, steps=2, trajectory=str(tmp_path / "old.traj"), overwrite=True)
    assert len(read(str(tmp_path / "old.traj"), ":")) == 2  # steps 0 and 2: the last frame is always written
    run_md(mol, calc, steps=2, trajectory=tmp_path / "path.traj", log=tmp_path / "md.log")  # pathlib.Path outputs
    assert len(read(str(tmp_path / "path.traj"), ":")) == 2 and (tmp_path / "md.log").is_file()
    for steps in (2.5, "3", True, 0):  # a float, a string, a bool: named as they are
        with pytest.raises(ValueError, match=rf"md needs at least 1 step, a whole number, got --steps {steps!r}"):
            run_md(mol, calc, steps=steps)


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device on this machine")
def test_md_on_cuda_follows_the_cpu_run(calc, tmp_path):
    """The same NVE (molecule) and NPT (periodic box) runs with the model on the GPU: the same
    frames as on the CPU (float64; short enough for the chaotic dynamics to stay within 1e-8 Å)."""
    import copy

    gpu = MMEACalculator(module=copy.deepcopy(calc.net).to("cuda"))
    for i, (atoms, kw) in enumerate(((read(str(ETHANOL), 0), dict(steps=10)),
                                     (_molecules(8, 5.0, cell=10.0),
                                      dict(steps=5, ensemble="npt", pdamp_fs=50.0, tdamp_fs=25.0)))):
        frames = {}
        for name, c in (("cpu", calc), ("cuda", gpu)):
            run_md(atoms, c, interval=1, trajectory=str(tmp_path / f"{i}-{name}.traj"), **kw)
            frames[name] = read(str(tmp_path / f"{i}-{name}.traj"), ":")
        assert len(frames["cuda"]) == len(frames["cpu"]) == kw["steps"] + 1
        for a, b in zip(frames["cuda"], frames["cpu"]):
            np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-8)
            np.testing.assert_allclose(a.cell.array, b.cell.array, rtol=0, atol=1e-8)
            np.testing.assert_allclose(a.get_forces(), b.get_forces(), rtol=0, atol=1e-7)
