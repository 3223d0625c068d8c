"""md's files under a kill, a second run and a full disk (``mmea_kernels.app.md``, ``md_output``,
``locks``), on 4 Cu atoms with ASE's EMT (milliseconds a run): a second run given a file the first
is writing stops before writing anything, naming it (in one process and in two, with --overwrite
and in the race the "exists" check cannot see); a full disk mid-frame leaves the extended XYZ file
ending on its last whole frame, readable and continued from; an interrupt mid-step ends the
trajectory, log and state on the last completed step exactly as a run of that many steps ends them,
and the run resumed from that state ends on the bits of the uninterrupted run; relax --out is
replaced whole or not at all."""
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.io import read

from mmea_kernels.app.md import MDSettings, run_md
from mmea_kernels.app.md_state import load_state

CASES = [("nve", None), ("nvt", "langevin"), ("nvt", "bussi"), ("nvt", "nose-hoover"), ("npt", None)]


def _cu():
    return bulk("Cu", cubic=True)


def _settings(ensemble="nvt", thermostat="langevin", **kw):
    damp = {"nve": {}, "nvt": dict(tdamp_fs=20.0), "npt": dict(tdamp_fs=20.0, pdamp_fs=100.0)}[ensemble]
    return MDSettings(ensemble=ensemble, thermostat=thermostat, dt_fs=2.0, interval=5, seed=3, **damp, **kw)


class _EMT(EMT):
    """EMT with a fresh neighbour list at every evaluation: its forces depend on the structure alone,
    not on where the list was built (as the model's graph), so that a resumed run can match to the bit."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, all_changes)


class _Hook(_EMT):
    """EMT that calls ``hook`` at its ``at``-th evaluation (evaluation j: the structure of step j - 1;
    one a step), inside the integrator's step."""

    def __init__(self, at, hook):
        super().__init__()
        self.at, self.hook, self.calls = at, hook, 0

    def calculate(self, *args, **kw):
        self.calls += 1
        if self.calls == self.at:
            self.hook()
        super().calculate(*args, **kw)


def _interrupt():
    raise KeyboardInterrupt


# --- 1: one writer per file -------------------------------------------------------------------------

@pytest.mark.parametrize("output", ["trajectory", "log", "save_state"])
@pytest.mark.parametrize("race", [False, True])
def test_a_second_run_on_a_file_being_written_stops_before_writing_it(output, race, tmp_path, monkeypatch):
    """Run B starts while run A writes ``output``: with --overwrite (``race`` False), or without it and
    having checked its outputs before A created them (``race``: the check cannot see A). B stops with
    an error naming the file; A's file holds A's run alone."""
    from mmea_kernels.app import files

    path = str(tmp_path / {"trajectory": "t.xyz", "log": "md.log", "save_state": "s.npz"}[output])
    errors = []

    def second_run():
        with monkeypatch.context() as m:
            if race:
                m.setattr(files, "check_outputs", lambda *a, **k: None)
            try:
                run_md(_cu(), _EMT(), _settings(steps=3, overwrite=not race, **{output: path}))
            except FileExistsError as exc:
                errors.append(str(exc))

    s = _settings(steps=12, **{output: path})
    run_md(_cu(), _Hook(7, second_run), s)
    assert errors and path in errors[0] and "another process is writing it" in errors[0], errors
    if output == "trajectory":
        assert [f.info["md_step"] for f in read(path, ":")] == [0, 5, 10, 12]
    elif output == "log":
        assert np.loadtxt(path, skiprows=1, usecols=0).tolist() == [0.0, 0.01, 0.02, 0.024]
    else:
        assert load_state(path).step == 12
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no lock file left behind


def test_two_processes_on_one_trajectory(tmp_path):
    """The same across processes: a second md process (here the test) on a trajectory a first one is
    writing stops; the first finishes with its own frames only."""
    path = tmp_path / "t.xyz"
    script = ("import time, sys\nfrom ase.build import bulk\nfrom ase.calculators.emt import EMT\n"
              "from mmea_kernels.app.md import run_md\n"
              "class Slow(EMT):\n    def calculate(self, *a, **k):\n        time.sleep(0.03)\n"
              "        super().calculate(*a, **k)\n"
              f"run_md(bulk('Cu', cubic=True), Slow(), steps=30, dt_fs=2.0, interval=5, trajectory={str(path)!r})\n")
    first = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (path.exists() and path.stat().st_size) and time.time() < deadline and first.poll() is None:
            time.sleep(0.02)
        with pytest.raises(FileExistsError, match="another process is writing it"):
            run_md(_cu(), _EMT(), steps=3, dt_fs=2.0, interval=1, trajectory=str(path), overwrite=True)
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert [f.info["md_step"] for f in read(str(path), ":")] == list(range(0, 31, 5))


# --- 2: whole frames on a full disk ----------------------------------------------------------------

def test_a_full_disk_mid_frame_leaves_the_trajectory_on_its_last_whole_frame(tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail as on a full disk, EFBIG for ENOSPC) in the
    middle of the third frame: the run stops with the OSError, the file ends on the second frame,
    is read whole and a run continues from its last frame (``--structure t.xyz@-1 --velocities file``)."""
    resource = pytest.importorskip("resource")
    s = _settings(steps=12)
    run_md(_cu(), _EMT(), s, trajectory=str(tmp_path / "whole.xyz"))
    text = (tmp_path / "whole.xyz").read_bytes()
    starts = [i for i in range(len(text)) if text.startswith(b"4\n", i) and (i == 0 or text[i - 1:i] == b"\n")]
    assert len(starts) == 4
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((starts[2] + starts[3]) // 2, hard))
    try:
        with pytest.raises(OSError) as err:
            run_md(_cu(), _EMT(), s, trajectory=str(tmp_path / "t.xyz"))
        assert err.value.filename == str(tmp_path / "t.xyz")  # the CLI's message names the file
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "t.xyz").read_bytes() == text[:starts[2]]
    assert [f.info["md_step"] for f in read(str(tmp_path / "t.xyz"), ":")] == [0, 5]
    res = run_md(read(str(tmp_path / "t.xyz"), -1), _EMT(), _settings(steps=2, velocities="file"))
    assert res["last_step"] == 2


@pytest.mark.parametrize("cut", ["full disk", "interrupt"])
def test_an_ase_traj_cut_mid_frame_reads_as_its_whole_frames(cut, tmp_path, monkeypatch):
    """``--trajectory x.traj`` (ASE's format) cut in the third frame: ASE's close() completed the half
    frame with whatever the file held (forces of 1e-321) or failed an assertion. Now
    an interrupt (Ctrl-C; SIGTERM from the command line) waits for the frame to end, and a full disk
    (RLIMIT_FSIZE, EFBIG for ENOSPC) leaves the file on its whole frames, naming it: every frame read
    back equals the uninterrupted run's."""
    s = _settings(steps=12)
    whole = read(str(_run_whole(s, tmp_path / "whole.traj")), ":")
    assert [f.info.get("md_step", i * 5) for i, f in enumerate(whole)][:3] == [0, 5, 10]
    two = _run_whole(_settings(steps=5), tmp_path / "two.traj").stat().st_size  # where frame 3 starts
    path = tmp_path / "t.traj"
    if cut == "full disk":
        resource = pytest.importorskip("resource")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (two + 200, hard))
        try:
            with pytest.raises(OSError) as err:
                run_md(_cu(), _EMT(), s, trajectory=str(path))
            assert err.value.filename == str(path)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        kept = 2
    else:
        from helpers import interrupted_in_third_traj_frame

        assert interrupted_in_third_traj_frame(monkeypatch, lambda: run_md(_cu(), _EMT(), s, trajectory=str(path)))
        kept = 3
    got = read(str(path), ":")
    assert len(got) == kept
    for a, b in zip(got, whole):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.get_forces(), b.get_forces())


def _run_whole(s, path):
    run_md(_cu(), _EMT(), s, trajectory=str(path))
    return path


def test_a_trajectory_on_a_fifo_is_streamed(tmp_path):
    """A FIFO (or /dev/stdout) as --trajectory: an internal 'Illegal seek' error after the whole-frame
    writes came (a review); each frame is written in one piece there too, unseekable."""
    import threading

    fifo = tmp_path / "t.xyz"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    s = _settings(steps=12)
    run_md(_cu(), _EMT(), s, trajectory=str(fifo), overwrite=True)
    reader.join(20)
    run_md(_cu(), _EMT(), s, trajectory=str(tmp_path / "file.xyz"))
    assert got == [(tmp_path / "file.xyz").read_bytes()] and got[0].count(b"md_step") == 4


# --- 3: an interrupt ends the files on the last completed step -------------------------------------

@pytest.mark.parametrize("ensemble,thermostat", CASES)
@pytest.mark.parametrize("done", [7, 10])
def test_an_interrupt_mid_step_saves_the_last_completed_step_and_resume_goes_on_to_the_bit(
        ensemble, thermostat, done, tmp_path, capsys):
    """Interrupted inside step ``done`` + 1 (positions moved, momenta half updated): the trajectory,
    log and state file are those of a run of ``done`` steps, to the byte (no frame twice, none
    missing, at a frame step or between); stderr names the step; the run resumed from the state
    ends on the bits of 12 steps at once."""
    s = _settings(ensemble, thermostat, steps=12)
    run_md(_cu(), _EMT(), s, save_state=str(tmp_path / "one.npz"))
    def files(name):
        return {k: str(tmp_path / f"{name}.{k}") for k in ("xyz", "log", "npz")}

    def out(name):
        return dict(trajectory=files(name)["xyz"], log=files(name)["log"], save_state=files(name)["npz"])

    run_md(_cu(), _EMT(), s, steps=done, **out("short"))
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run_md(_cu(), _Hook(done + 2, _interrupt), s, **out("cut"))
    cut, short = load_state(files("cut")["npz"]), load_state(files("short")["npz"])
    assert cut.step == short.step == done and cut.rng == short.rng
    for kind in ("xyz", "log"):
        assert pathlib.Path(files("cut")[kind]).read_text() == pathlib.Path(files("short")[kind]).read_text(), kind
    err = capsys.readouterr().err
    assert f"step {done} was the last completed" in err and f"{files('cut')['npz']} holds step {done}" in err, err
    assert np.array_equal(cut.atoms.get_momenta(), short.atoms.get_momenta())
    assert all(np.array_equal(cut.variables[k], short.variables[k]) for k in short.variables)
    rest = run_md(None, _EMT(), s, resume=cut, steps=12 - done, trajectory=str(tmp_path / "rest.xyz"),
                  save_state=files("cut")["npz"])
    assert rest["last_step"] == 12
    assert read(str(tmp_path / "rest.xyz"), 0).info["md_step"] == done
    one, end = load_state(str(tmp_path / "one.npz")), load_state(files("cut")["npz"])
    for get in (lambda a: a.positions, lambda a: a.get_momenta(), lambda a: a.cell.array):
        assert np.array_equal(get(end.atoms), get(one.atoms))
    assert all(np.array_equal(end.variables[k], one.variables[k]) for k in one.variables)


def test_an_interrupt_before_any_step_completed_writes_no_state(tmp_path, capsys):
    """Interrupted in the first evaluation (no step completed): nothing to end the files on, and no
    state written."""
    with pytest.raises(KeyboardInterrupt):
        run_md(_cu(), _Hook(1, _interrupt), _settings(steps=5), save_state=str(tmp_path / "s.npz"))
    assert not (tmp_path / "s.npz").exists() and "holds step" not in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# --- relax --out: replaced whole ------------------------------------------------------------------

def test_relax_out_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """Killed while writing --out (here half the file written, then an interrupt): the previous
    structure stays whole, and no temporary file is left."""
    import ase.io

    from mmea_kernels.app.relax import relax

    out = tmp_path / "relaxed.xyz"
    atoms = _cu()
    atoms.rattle(0.05, seed=1)
    relax(atoms, _EMT(), fmax=0.05, steps=5, out=str(out))
    before = out.read_text()
    real = ase.io.write

    def half_then_killed(target, images, format=None, **kw):
        import io

        buf = io.StringIO()
        real(buf, images, format="extxyz", **kw)
        if isinstance(target, (str, os.PathLike)):
            with open(target, "w") as fh:
                fh.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        else:
            target.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            target.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(ase.io, "write", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        relax(atoms, _EMT(), fmax=0.05, steps=8, out=str(out), overwrite=True)
    monkeypatch.undo()
    assert out.read_text() == before and os.listdir(tmp_path) == ["relaxed.xyz"]
    assert len(read(str(out))) == 4
