"""A fine-tuned MACE, exported by ``mmea-kernels export --format lammps`` (mace-torch's LAMMPS_MACE,
float64), in a real LAMMPS with our ``pair_style mace`` plugin (``mmea-kernels lammps-build``; skipped
where it has not been built): one process without domain decomposition (edges to images as periodic
shifts), and with domain decomposition (owned + ghost atoms as nodes, ghosts reaching
num_interactions × r_max) at 1, 2 and 4 MPI processes, give the checkpoint's float64 eager model's
energy, forces, virial and per-atom energies to ~1e-10 (molecules in a box, atoms among their own
images, a rattled triclinic crystal, a box of 18 ethanol molecules split over processes); NVE
trajectories follow ASE's velocity Verlet with the eager model; bad input is a LAMMPS error that
names it."""
import contextlib
import io
import json
import os
import pathlib
from typing import Dict, Optional

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
from mmea_kernels.integrations.lammps import find_lammps, lammps_available, run_lammps  # noqa: E402

from helpers import LAMMPS_SPLIT_IN_TWO, REPO, load_bench, molecules_in_a_row  # noqa: E402

LAMMPS_DIR = os.environ.get("MMEA_LAMMPS_DIR") or str(REPO / ".lammps")
NOT_BUILT = lammps_available(LAMMPS_DIR)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(NOT_BUILT is not None, reason=f"no LAMMPS: {NOT_BUILT}")]
SERIAL, DECOMPOSED = "mace no_domain_decomposition", "mace"


def _structures():
    """Ethanol alone in a box; ethanol among its own images; a rattled triclinic diamond cell."""
    import ase.build

    from mmea_kernels.app.data import toy_molecules

    alone, crowded = toy_molecules("ethanol", 2, seed=21)
    alone.set_cell([16.0, 16.0, 16.0])
    crowded.set_cell([6.5, 7.0, 7.5])
    for a in (alone, crowded):
        a.pbc = True
        a.center()
    diamond = ase.build.bulk("C", "diamond", a=3.57) * (2, 2, 2)
    diamond.rattle(0.05, seed=1)
    return {"ethanol": alone, "crowded": crowded, "triclinic": diamond}


def _liquid():
    """18 randomly rotated ethanol molecules in an 18 × 18 × 12 Å box (split 2 × 2 × 1 on 4 processes)."""
    from mmea_kernels.app.data import toy_molecules

    return load_bench("lammps_sevenn").molecular_box(toy_molecules("ethanol", 18, seed=5), (3, 3, 2), 6.0, seed=7)


def _row():
    """3 ethanol molecules in a row, the middle one split between 2 processes (helpers.molecules_in_a_row),
    as the liquid is split through a row of molecules; the ghost shell (12 Å) is wider than the box."""
    from mmea_kernels.app.data import toy_molecules

    return molecules_in_a_row(toy_molecules("ethanol", 3, seed=5))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny MACE preset fine-tuned with MMEA (float64, a few epochs at a high rate), exported for
    LAMMPS through the command line; its eager model and the base model."""
    import ase.io

    from mmea_kernels.app.cli import main
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import PRESETS, build_mace
    from mmea_kernels.train import FinetuneConfig, finetune, load_finetuned
    from mmea_kernels.train.foundation import save_model

    tmp = tmp_path_factory.mktemp("lammps-mace")
    torch.manual_seed(0)
    base = build_mace(PRESETS["tiny"])
    save_model(base, PRESETS["tiny"], tmp / "base.pt")
    ase.io.write(str(tmp / "train.xyz"), toy_molecules("ethanol", 8, "B", seed=1))
    ase.io.write(str(tmp / "valid.xyz"), toy_molecules("ethanol", 2, "B", seed=3))
    finetune(FinetuneConfig(train=str(tmp / "train.xyz"), valid=str(tmp / "valid.xyz"), model=str(tmp / "base.pt"),
                            out_dir=str(tmp / "run"), method="mmea", epochs=3, batch_size=4, lr=0.05,
                            progress=False, dtype="float64"), log=lambda *a: None)
    with contextlib.redirect_stdout(io.StringIO()) as s:
        assert main(["export", "--checkpoint", str(tmp / "run" / "checkpoint.pt"), "--out", str(tmp / "m.pt")]) == 0
    res = json.loads(s.getvalue())
    assert res["dtype"] == "float64" and "plugin load DIR/mace.so" in res["lammps"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--checkpoint", str(tmp / "run" / "checkpoint.pt"), "--out", str(tmp / "m32.pt"),
                     "--dtype", "float32"]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--checkpoint", str(tmp / "run" / "checkpoint.pt"), "--out", str(tmp / "mcpp.pt"),
                     "--kernels", "cpp"]) == 0
    net, _ = load_finetuned(tmp / "run" / "checkpoint.pt", dtype="float64")
    return dict(net=net, base=base.double(), file=res["out"], file32=str(tmp / "m32.pt"), file_cpp=str(tmp / "mcpp.pt"),
                tmp=tmp)


def _eager(net, atoms):
    return load_bench("lammps_sevenn").eager(net, atoms)


def _assert_matches(got, want, what, rtol=(1e-10, 1e-10, 1e-10)):
    """Relative to the largest value (floored at 1): energy, forces, virial."""
    e, f, w = want
    assert abs(got["energy"] - e) <= rtol[0] * max(1.0, abs(e)), (what, got["energy"], e)
    assert np.abs(got["forces"] - f).max() <= rtol[1] * max(1.0, np.abs(f).max()), what
    assert np.abs(got["virial"] - w).max() <= rtol[2] * max(1.0, np.abs(w).max()), what


def test_one_process_with_and_without_domain_decomposition(exported):
    """The float64 file to 1e-10; the float32 one (``--dtype float32``) to SevenNet's files' bounds.
    The fine-tuned forces differ from the base model's by far more than the tolerance (asserted),
    so a file without the adapters fails."""
    setup = find_lammps(LAMMPS_DIR)
    for name, atoms in _structures().items():
        want = _eager(exported["net"], atoms)
        if name == "ethanol":
            assert np.abs(_eager(exported["base"], atoms)[1] - want[1]).max() > 1e-3
        for style in (SERIAL, DECOMPOSED):
            got = run_lammps(atoms, style, f"* * {exported['file']} {{species}}", setup,
                             exported["tmp"] / f"{name}-{style.split()[-1]}")
            _assert_matches(got, want, f"{name}, {style}")
    crowded = _structures()["crowded"]
    want = _eager(exported["net"], crowded)
    for style in (SERIAL, DECOMPOSED):  # a float32 file (--dtype float32): SevenNet's files' bounds
        got = run_lammps(crowded, style, f"* * {exported['file32']} {{species}}", setup,
                         exported["tmp"] / f"float32-{style.split()[-1]}")
        _assert_matches(got, want, f"float32, {style}", rtol=(1e-6, 2e-5, 1e-4))


def test_file_with_the_fused_cpp_adapters(exported, tmp_path):
    """``--kernels cpp`` (each adapter one op of this package's kernels, loaded by the plugin from
    mmea_ops.so beside it): the eager model's numbers without decomposition (crowded, triclinic)
    and with it on 2 processes; a plugin directory without mmea_ops.so is an error that says what
    to do."""
    import shutil

    from mmea_kernels.integrations.lammps import LammpsSetup

    setup = find_lammps(LAMMPS_DIR)
    if not (pathlib.Path(LAMMPS_DIR) / "mmea_ops.so").is_file():
        pytest.skip(f"{LAMMPS_DIR} has no mmea_ops.so (built without csrc/)")
    cases = [("crowded", SERIAL, 1), ("triclinic", DECOMPOSED, 1), ("liquid", DECOMPOSED, 2)]
    for name, style, n in cases:
        atoms = _liquid() if name == "liquid" else _structures()[name]
        got = run_lammps(atoms, style, f"* * {exported['file_cpp']} {{species}}", setup, tmp_path / f"{name}-{n}",
                         nprocs=n)
        _assert_matches(got, _eager(exported["net"], atoms), f"cpp kernels, {name}, {style}, {n}")
    alone = tmp_path / "plugin"
    alone.mkdir()
    shutil.copy(setup.plugin("mace"), alone / "mace.so")
    bare = LammpsSetup(setup.lmp, setup.mpirun, (("mace", str(alone / "mace.so")),))
    with pytest.raises(RuntimeError, match="exported with --kernels cpp and needs this package's kernels.*mmea_ops.so"):
        run_lammps(_structures()["crowded"], SERIAL, f"* * {exported['file_cpp']} {{species}}", bare, tmp_path / "bare")
    # a Python process holding LAMMPS' copy of the kernels (the plugin loaded mmea_ops.so): the package
    # does not load mmea_kernels._C on top (the same ops twice abort the process) and the file runs
    import subprocess
    import sys

    script = ("import ctypes, torch\n"
              f"ctypes.CDLL({str(pathlib.Path(LAMMPS_DIR) / 'mmea_ops.so')!r}, mode=ctypes.RTLD_GLOBAL)\n"
              "import mmea_kernels\nfrom mmea_kernels.ops.gate import cpp\nmmea_kernels.load_kernels()\n"
              f"m = torch.jit.load({exported['file_cpp']!r})\n"
              "print('OK', cpp.available(torch.device('cpu'))[1])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and "OK" in proc.stdout and "registered in this process by another library" in \
        proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def _per_atom_energies(work, n):
    lines = (work / "pe.dump").read_text().splitlines()
    start = max(k for k, line in enumerate(lines) if line.startswith("ITEM: ATOMS"))
    return np.array([float(line.split()[1]) for line in lines[start + 1:start + 1 + n]])


def test_domain_decomposition_at_one_two_and_four_processes(exported):
    """A box of molecules split over processes (the ghost shell, 2 × r_max + skin = 12 Å, wider
    than the 9 Å sides of the sub-domains at 2 and 4 processes): energy, forces, virial and the per-atom energies (compute pe/atom, against
    the eager model's node energies)."""
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.train.foundation import model_info

    setup = find_lammps(LAMMPS_DIR)
    liquid = _liquid()
    want = _eager(exported["net"], liquid)
    z, r_max = model_info(exported["net"])
    batch = atoms_to_batch([liquid], z, r_max, energy_key="__none__", forces_key="__none__", dtype=torch.float64)
    node_e = exported["net"](batch, training=False, compute_force=False)["node_energy"].detach().numpy()
    per_atom = ["compute pea all pe/atom", 'dump pe all custom 1 "{}" id c_pea',
                "dump_modify pe sort id format float %.17g"]
    for n in (1, 2, 4):
        work = exported["tmp"] / f"liquid-{n}"
        extra = [line.format(work / "pe.dump") for line in per_atom]
        got = run_lammps(liquid, DECOMPOSED, f"* * {exported['file']} {{species}}", setup, work, nprocs=n, extra=extra)
        _assert_matches(got, want, f"{n} processes")
        assert np.abs(_per_atom_energies(work, len(liquid)) - node_e).max() <= 1e-10 * np.abs(node_e).max(), n


def test_nve_trajectories_follow_the_eager_model(exported):
    """20 velocity-Verlet steps of 0.5 fs from 300 K, in LAMMPS (one process without decomposition;
    two with, so the forces on atoms near the split add ghost atoms' partial forces) and in ASE: the same
    positions (to 1e-7 Å: LAMMPS' and ASE's unit constants, the data file's velocities) and energies.
    On the 3 molecules in a row, the middle one split between the 2 processes, since 2026-12-02 (the
    liquid's 162 atoms before: the test cost ~2 × as much); atoms move by 0.5 Å, a time step 0.1 % off
    in LAMMPS' input puts the positions 5e-4 Å off, ghost atoms' partial forces 0.1 % off put the
    2-process run's 1.5e-5 Å off (2.7e-5 Å on the liquid)."""
    from ase import units
    from ase.geometry import find_mic
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    from mmea_kernels.app.calculator import MMEACalculator

    setup = find_lammps(LAMMPS_DIR)
    row = _row()
    (getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution)(
        row, temperature_K=300, rng=np.random.default_rng(3))
    ref = row.copy()
    ref.calc = MMEACalculator(module=exported["net"])
    pe = []
    dyn = VelocityVerlet(ref, 0.5 * units.fs)
    dyn.attach(lambda: pe.append(ref.get_potential_energy()))
    dyn.run(20)
    for style, n in ((SERIAL, 1), (DECOMPOSED, 2)):
        work = exported["tmp"] / f"nve-{n}"
        got = run_lammps(row, style, f"* * {exported['file']} {{species}}", setup, work, nprocs=n, steps=20,
                         velocities=True)
        assert n == 1 or LAMMPS_SPLIT_IN_TWO in (work / "log.lammps").read_text()
        moved = np.abs(find_mic(ref.positions - row.positions, row.cell)[0]).max()
        off = np.abs(find_mic(got["positions"] - ref.positions, row.cell)[0]).max()
        assert moved > 1e-1 and off < 1e-7, (style, moved, off)  # as run_lammps' own check with ASE's LJ
        assert got["thermo"].shape == (21, 4) and np.abs(got["thermo"][:, 1] - pe).max() <= 1e-9 * abs(pe[0]), style


class _Failing(torch.nn.Module):
    """LAMMPS_MACE's attributes and forward signature; the forward raises."""

    def __init__(self):
        super().__init__()
        self.register_buffer("r_max", torch.tensor(5.0, dtype=torch.float64))
        self.register_buffer("num_interactions", torch.tensor(2))
        self.register_buffer("atomic_numbers", torch.tensor([1, 6, 8]))

    def forward(self, data: Dict[str, torch.Tensor], local_or_ghost: torch.Tensor,
                compute_virials: bool = False) -> Dict[str, Optional[torch.Tensor]]:
        raise RuntimeError("deliberately broken model")


def _raw_lammps(setup, work, head, tail):
    """LAMMPS' output for an input of: plugin load, ``head``, a box with an H, a C and an O atom, ``tail``, run 0."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    lines = [f'plugin load "{setup.plugin("mace")}"', *head, "create_atoms 1 single 1 1 1",
             "create_atoms 2 single 2 1 1", "create_atoms 3 single 1 2 1", "mass * 1.0", *tail, "run 0"]
    (work / "in.lmp").write_text("\n".join(lines) + "\n")
    r = subprocess.run([setup.lmp, "-in", str(work / "in.lmp"), "-log", "none", "-nocite"], capture_output=True,
                       text=True, timeout=300)
    return r.stdout + r.stderr


def test_bad_input_is_a_lammps_error_that_names_it(exported, tmp_path):
    from mmea_kernels.app.cli import main

    setup = find_lammps(LAMMPS_DIR)
    box = _structures()["ethanol"]
    f, tmp = exported["file"], exported["tmp"]
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp / "plain.pt"))
    torch.jit.script(_Failing()).save(str(tmp / "failing.pt"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--checkpoint", str(tmp / "run" / "checkpoint.pt"), "--out", str(tmp / "scripted.pt"),
                     "--format", "torchscript", "--overwrite"]) == 0
    cases = [
        (SERIAL, f"* * {f} H C N", 1, "the model .* has no element N .*its elements: H C O"),
        (SERIAL, f"* * {f} H C Xx", 1, "Xx .*atom type 3.* is not an element symbol"),
        (SERIAL, f"* * {f} H C", 1, "3 atom types, 5 arguments"),
        (SERIAL, f"* * {tmp_path / 'none.pt'} {{species}}", 1, "cannot load the model file .*none.pt"),
        (SERIAL, f"* * {tmp / 'plain.pt'} {{species}}", 1, "has no r_max .*not a LAMMPS_MACE file"),
        (SERIAL, f"* * {tmp / 'scripted.pt'} {{species}}", 1,
         "is a MACE model but not a LAMMPS_MACE file .*--format torchscript"),
        (DECOMPOSED, f"* * {tmp / 'failing.pt'} {{species}}", 1, "the model failed: .*deliberately broken model"),
        ("mace domains", f"* * {f} {{species}}", 1, "unknown argument domains"),
        (SERIAL, f"* * {f} {{species}}", 2, "no_domain_decomposition runs on one process \\(2 here\\)"),
    ]
    for k, (style, coeff, n, message) in enumerate(cases):
        with pytest.raises(RuntimeError, match=message):
            run_lammps(box, style, coeff, setup, tmp_path / f"w{k}", nprocs=n, specorder=["H", "C", "O"])
    with pytest.raises(RuntimeError, match="does not compute per-atom virials"):
        run_lammps(box, SERIAL, f"* * {f} {{species}}", setup, tmp_path / "virial",
                   extra=["compute sa all stress/atom NULL", f'dump sa all custom 1 "{tmp_path / "sa.dump"}" c_sa[1]'])
    box_cmds = ["region b block 0 10 0 10 0 10"]
    mace = ["pair_style mace", f"pair_coeff * * {f} H C O"]
    log = _raw_lammps(setup, tmp_path / "real", ["units real", *box_cmds, "create_box 3 b"], mace)
    assert "ERROR: pair_style mace requires units metal (eV, Å), not units real" in log, log[-2000:]
    # atom_style bond with special_bonds' default (0 0 0): LAMMPS would drop bonded pairs from the list
    log = _raw_lammps(setup, tmp_path / "bonds", ["units metal", "atom_style bond", *box_cmds,
                                                  "create_box 3 b bond/types 1 extra/bond/per/atom 1"],
                      ["bond_style zero", "bond_coeff 1", *mace])
    assert "set special_bonds lj/coul 1.0 1.0 1.0" in log, log[-2000:]
    # a pair_style re-issued without no_domain_decomposition is back to decomposition (ghost cutoff 2 × 5 + 2)
    log = _raw_lammps(setup, tmp_path / "reissued", ["units metal", "atom_modify map yes", *box_cmds, "create_box 3 b"],
                      [f"pair_style {SERIAL}", f"pair_coeff * * {f} H C O", "run 0", *mace])
    assert log.count("ghost atom cutoff = 12") == 1 and "ghost atom cutoff = 7" in log, log[-2000:]
    assert "ERROR" not in log, log[-2000:]
