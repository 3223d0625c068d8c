"""MD state files (``mmea_kernels.app.md_state``, ``md --save-state`` / ``--resume``): a run of 2 x 10
steps, the second resumed from the first one's state file, ends on the same bits as 20 steps at once
for every integrator (its chain, barostat and random-number state carried over; without any one of
them the runs part); the resumed run's frames, log and conserved quantity go on from the step it
stopped at; state files that are not one (pickles, other archives, missing or malformed keys) are
refused by name, and nothing in them runs."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
from ase import Atoms  # noqa: E402
from ase.io import read  # noqa: E402

from helpers import REPO  # noqa: E402
from mmea_kernels.app.md import MDSettings, run_md  # noqa: E402
from mmea_kernels.app.md_state import load_state, save_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ETHANOL = REPO / "mmea_kernels" / "assets" / "ethanol_pbe" / "test.xyz"  # ``calc``: tests/app/conftest.py


def _box():
    """Two ethanol molecules in a periodic 10 Å box (what MTK needs)."""
    out = Atoms()
    for i in range(2):
        m = read(str(ETHANOL), i)
        m.positions += np.array([5.0 * i, 0.0, 0.0])
        out += m
    out.cell, out.pbc = np.eye(3) * 10.0, True
    return out


CASES = [("nve", None), ("nvt", "langevin"), ("nvt", "bussi"), ("nvt", "nose-hoover"), ("npt", None)]


def _settings(ensemble, thermostat, **kw):
    """Settings of ``ensemble`` with short damping times where they apply."""
    damp = {"nve": {}, "nvt": dict(tdamp_fs=20.0), "npt": dict(tdamp_fs=20.0, pdamp_fs=100.0)}[ensemble]
    return MDSettings(ensemble=ensemble, thermostat=thermostat, **damp, **kw)


@pytest.mark.parametrize("ensemble,thermostat", CASES)
def test_a_resumed_run_ends_on_the_same_bits_as_one_run(calc, ensemble, thermostat, tmp_path):
    atoms = _box() if ensemble == "npt" else read(str(ETHANOL), 0)
    s = _settings(ensemble, thermostat, steps=10, interval=5, seed=4)
    one = run_md(atoms, calc, s, steps=20, trajectory=str(tmp_path / "one.traj"))
    first = run_md(atoms, calc, s, save_state=str(tmp_path / "state.npz"), model="m1")
    state = load_state(str(tmp_path / "state.npz"))
    assert state.step == 10 and state.model == "m1"
    rest = run_md(None, calc, s, resume=state, model="m1", trajectory=str(tmp_path / "rest.extxyz"),
                  log=str(tmp_path / "rest.log"), save_state=str(tmp_path / "state.npz"))
    assert (rest["first_step"], rest["last_step"], first["last_step"]) == (10, 20, 10)
    a, b = read(str(tmp_path / "one.traj"), -1), read(str(tmp_path / "rest.extxyz"), -1)
    frames = read(str(tmp_path / "rest.extxyz"), ":")
    assert [f.info["md_step"] for f in frames] == [10, 15, 20]
    np.testing.assert_allclose(frames[0].positions, state.atoms.positions, atol=1e-7)  # extxyz: 8 decimals
    ended = load_state(str(tmp_path / "state.npz"))  # updated in place, exactly what the one run has
    assert ended.step == 20
    assert np.array_equal(ended.atoms.positions, a.positions) and np.array_equal(ended.atoms.get_momenta(),
                                                                                 a.get_momenta())
    assert np.array_equal(ended.atoms.cell.array, a.cell.array)
    np.testing.assert_allclose(b.positions, a.positions, atol=1e-7)
    times = np.loadtxt(str(tmp_path / "rest.log"), skiprows=1, usecols=0)
    np.testing.assert_allclose(times, [0.005, 0.0075, 0.010])
    if "max_deviation_meV_per_atom" in one:  # the conserved quantity goes on from where it was
        e = np.loadtxt(str(tmp_path / "rest.log"), skiprows=1, usecols=5)
        assert 1000 * np.abs(e - e[0]).max() <= one["max_deviation_meV_per_atom"] * 1.01


def test_each_part_of_the_state_is_needed(calc, tmp_path):
    """Leave out one part of a state (the generator, the chain, the barostat's strain) and the
    resumed run parts from the one run: the test above can fail."""
    from mmea_kernels.app import md_state

    runs = {"langevin": (read(str(ETHANOL), 0), "nvt", "langevin", "rng"),
            "nose-hoover": (read(str(ETHANOL), 0), "nvt", "nose-hoover", "p_eta"),
            "mtk-npt": (_box(), "npt", None, "p_eps")}
    for name, (atoms, ensemble, thermostat, part) in runs.items():
        s = _settings(ensemble, thermostat, steps=5, seed=1)
        one = run_md(atoms, calc, s, steps=10, save_state=str(tmp_path / f"{name}-one.npz"))
        run_md(atoms, calc, s, save_state=str(tmp_path / f"{name}.npz"))
        state = load_state(str(tmp_path / f"{name}.npz"))
        if part == "rng":
            state.rng = md_state.np.random.default_rng(123).bit_generator.state
        elif part == "p_eps":
            state.variables[part] = 0.0
        else:
            state.variables[part] = np.zeros_like(state.variables[part])
        run_md(None, calc, s, resume=state, save_state=str(tmp_path / f"{name}-two.npz"))
        a, b = (load_state(str(tmp_path / f"{name}-{k}.npz")).atoms for k in ("one", "two"))
        assert one["last_step"] == 10 and np.abs(a.get_momenta() - b.get_momenta()).max() > 1e-9, name


def test_a_resumed_run_refuses_other_dynamics_and_another_model(calc, tmp_path):
    mol = read(str(ETHANOL), 0)
    path = str(tmp_path / "s.npz")
    run_md(mol, calc, steps=3, ensemble="nvt", thermostat="bussi", save_state=path, model="m1")
    state = load_state(path)
    # the API names its keywords (the command line its options: test_the_command_line_resumes_in_place)
    for kw, msg in [(dict(temperature_K=400.0), "^temperature_K=400.0 differs from the state file's 300.0"),
                    (dict(ensemble="nve"), "^ensemble='nve' differs"), (dict(dt_fs=1.0), "^dt_fs=1.0 differs"),
                    (dict(velocities="file"), "^velocities='file' with resume: .*takes its momenta from the state")]:
        with pytest.raises(ValueError, match=msg):
            run_md(None, calc, resume=state, steps=2, **kw)
    with pytest.raises(ValueError, match=r"written by a run of another model \(m1; now m2\)"):
        run_md(None, calc, resume=state, steps=2, model="m2")
    with pytest.raises(ValueError, match="^ensemble='nve' differs from the state file's nvt"):
        run_md(None, calc, MDSettings(steps=2), resume=state)  # a settings object: all its dynamics count
    assert run_md(None, calc, resume=state, steps=1, thermostat="bussi")["bit_identical_continuation"]
    nvt = str(tmp_path / "nvt.npz")
    run_md(mol, calc, steps=2, ensemble="nvt", save_state=nvt)  # thermostat not named: langevin runs
    assert load_state(nvt).physics["thermostat"] == "langevin"
    assert run_md(None, calc, resume=load_state(nvt), steps=1, thermostat="langevin")["last_step"] == 3
    import copy

    from mmea_kernels.app.calculator import MMEACalculator

    single = MMEACalculator(module=copy.deepcopy(calc.net).float())
    res = run_md(None, single, resume=state, steps=1)
    n = torch.get_num_threads()
    assert not res["bit_identical_continuation"] and \
        f"float64 on cpu ({n} threads), this one ran in float32 on cpu ({n} threads)" in res["continuation_note"]
    torch.set_num_threads(n + 1)  # sums group by thread: not claimed to the bit (a reproducibility review)
    try:
        res = run_md(None, calc, resume=state, steps=1)
    finally:
        torch.set_num_threads(n)
    assert not res["bit_identical_continuation"] and f"({n} threads), this one ran in float64 on cpu ({n + 1} " \
        "threads)" in res["continuation_note"]
    (tmp_path / "t.xyz").write_text("keep")
    with pytest.raises(FileExistsError, match="--save-state .* exists; pass --overwrite"):
        run_md(mol, calc, steps=2, save_state=path)
    with pytest.raises(ValueError, match="--save-state and another output are the same file"):
        run_md(None, calc, resume=state, steps=2, save_state=path, log=path)
    with pytest.raises(ValueError, match="--save-state-every must be a whole number"):
        run_md(mol, calc, steps=2, save_state=str(tmp_path / "n.npz"), save_state_every=0)
    assert load_state(path).step == 3 and (tmp_path / "t.xyz").read_text() == "keep"


class _Payload:
    """Unpickling this creates the marker file: what a crafted state file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_files_that_are_not_states_are_refused_by_name_and_never_run(calc, tmp_path):
    mol = read(str(ETHANOL), 0)
    good = str(tmp_path / "good.npz")
    run_md(mol, calc, steps=2, ensemble="nvt", thermostat="nose-hoover", save_state=good)
    with np.load(good) as z:
        base = {k: z[k] for k in z.files}
    meta = json.loads(str(base["meta"]))
    marker = tmp_path / "PWNED"

    def variant(name, **changes):
        arrays = dict(base)
        for k, v in changes.items():
            if v is None:
                del arrays[k]
            else:
                arrays[k] = v
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        return str(path)

    def with_meta(**m):
        return np.array(json.dumps({**meta, **m}))

    pickled = np.empty(1, dtype=object)
    pickled[0] = _Payload(marker)
    (tmp_path / "text.npz").write_text("positions 0 0 0")
    cases = [(str(tmp_path / "text.npz"), "is not an MD state file"),
             (str(ETHANOL), "is not an MD state file"),
             (variant("pickle", positions=pickled), "holds pickled objects, which are never loaded"),
             (variant("nometa", meta=None), "no 'meta' entry"),
             (variant("version", meta=with_meta(version=2)), "version 2; this mmea-kernels reads version 1"),
             (variant("step", meta=with_meta(step=-1)), "key 'step' must be a whole number >= 0"),
             (variant("physics", meta=with_meta(physics={**meta["physics"], "ensemble": "nvp"})),
              "key 'physics': unknown --ensemble 'nvp'"),
             (variant("rng", meta=with_meta(physics={**meta["physics"], "thermostat": "langevin"})),
              "key 'rng' must hold a PCG64 generator state"),
             (variant("constraint", meta=with_meta(constraints=[{"name": "os.system", "kwargs": {}}])),
              "key 'constraints' cannot be read as ASE constraints"),
             (variant("shape", positions=base["positions"][:3]), r"key 'positions' has shape \(3, 3\)"),
             (variant("nan", momenta=np.full_like(base["momenta"], np.nan)), "key 'momenta' holds non-finite values"),
             (variant("missing", masses=None), "key 'masses' is missing"),
             (variant("chain", var_p_eta=None), r"key 'var_p_eta' \(nose-hoover's state\) is missing"),
             (variant("z", numbers=np.full_like(base["numbers"], 200)), "atomic numbers 1..118"),
             (variant("mass", masses=np.zeros_like(base["masses"])), "key 'masses' must hold masses > 0")]
    for path, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_state(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_state(str(tmp_path / "none.npz"))
    assert not marker.exists()
    state = load_state(good)
    state.variables["eta"] = np.zeros(5)
    state.variables["p_eta"] = np.zeros(5)
    save_state(str(tmp_path / "long.npz"), state)
    with pytest.raises(ValueError, match="the state's eta chain has 5 links; this integrator has 3"):
        run_md(None, calc, resume=load_state(str(tmp_path / "long.npz")), steps=1)


def test_the_command_line_resumes_in_place(train_checkpoint, tmp_path, capsys):
    """``md --save-state`` then ``md --resume X --save-state X`` (updated in place, no --overwrite);
    a changed --thermostat and a --structure beside --resume are refused with exit code 2. The resumed
    run is a fresh interpreter (``python -m``: it has only the file to go on); the first run and the
    refusals run in this process (a fresh interpreter costs ~5 s)."""
    from mmea_kernels.app.cli import main

    def md(*args):
        return subprocess.run([sys.executable, "-m", "mmea_kernels.app.cli", "md", "--checkpoint",
                               str(train_checkpoint), *args], capture_output=True, text=True, cwd=tmp_path)

    state = str(tmp_path / "s.npz")
    capsys.readouterr()
    assert main(["md", "--checkpoint", str(train_checkpoint), "--structure", f"{ETHANOL}@0", "--ensemble", "nvt",
                 "--thermostat", "bussi", "--steps", "4", "--save-state", state]) == 0, capsys.readouterr().err
    assert load_state(state).step == 4
    # the base named another way (--model given explicitly): the same weights, so the same model
    r = md("--resume", state, "--save-state", state, "--steps", "3", "--thermostat", "bussi",
           "--model", "builtin:mace-xtb-small")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["integrator"], res["first_step"], res["last_step"]) == ("bussi", 4, 7)
    assert load_state(state).step == 7
    capsys.readouterr()
    assert main(["md", "--checkpoint", str(train_checkpoint), "--resume", state, "--thermostat", "langevin"]) == 2
    assert "--thermostat langevin differs from the state file's bussi" in capsys.readouterr().err
    assert main(["md", "--checkpoint", str(train_checkpoint), "--resume", state, "--structure", str(ETHANOL)]) == 2
    assert "md needs one of --structure (a new run) and --resume" in capsys.readouterr().err


def test_a_symlinked_state_file_is_written_through_and_a_killed_runs_temp_files_go(calc, tmp_path):
    """``--save-state`` given as a symlink (a state kept on scratch, linked from the job directory):
    the link stays and the file it names gets the new state (the rename replaced the link with a plain
    file, and the next run's state went beside the link's target no more); the temporary files of a
    run killed mid-write (SIGKILL: nothing cleans up) are removed by the next run that holds the
    file's lock, and nobody else's files are."""
    import os

    mol = read(str(ETHANOL), 0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    real, link = scratch / "state.npz", tmp_path / "state.npz"
    run_md(mol, calc, steps=2, ensemble="nvt", thermostat="bussi", save_state=str(real))
    os.chmod(real, 0o640)
    link.symlink_to(real)
    stale = scratch / ".state.npz.abc_1234.tmp.npz"  # what atomic_path (mkstemp) names a state being written
    stale.write_bytes(b"half a state")
    others = [".other.npz.abc_1234.tmp.npz", ".state.npz.old.npz.k2j4x9qa.tmp.npz"]  # other files' temporaries
    for name in others:
        (scratch / name).write_bytes(b"x")
    run_md(None, calc, resume=load_state(str(link)), steps=3, save_state=str(link), overwrite=True)
    assert link.is_symlink() and load_state(str(real)).step == 5
    assert oct(real.stat().st_mode & 0o777) == oct(0o640)
    assert sorted(p.name for p in scratch.iterdir()) == sorted(others + ["state.npz"])
