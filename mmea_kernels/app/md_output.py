"""The outputs of an MD run (``app.md``): its trajectory (frames with energy, forces, stress, step
and time), its log, its state file and the JSON summary. Each file is held under an exclusive lock
(``app.locks``) from before it is emptied to the end of the run, so a second run given the same file
stops before writing anything. Each extended-XYZ frame is written whole or not at all; a run
interrupted (``KeyboardInterrupt``: Ctrl-C, and SIGTERM as the command line turns it) ends its files on
its last completed step (:meth:`Outputs.run`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from .md import MDSettings, _periodic

__all__ = ["Outputs", "Frames", "Log", "append_frame", "summary"]


def append_frame(fd: int, data: bytes, then=None, path: Optional[str] = None) -> None:
    """Append ``data`` (one whole frame) to the file open as ``fd``, all or nothing: one write() of the
    formatted frame (a loop only if the system writes part of it), then ``then()`` (the frame noted as
    written), and on any exception in either (a full disk's ENOSPC, an interrupt) the file cut back to
    its length before the frame, then the exception raised.
    A SIGKILL inside the write() cannot be caught; with one write() of a small buffer it is very
    unlikely to leave a partial frame (the system copies the buffer at once)."""
    import stat

    regular = stat.S_ISREG(os.fstat(fd).st_mode)  # a FIFO or a device (/dev/stdout) neither seeks nor cuts back
    start = os.lseek(fd, 0, os.SEEK_END) if regular else None
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        if then is not None:
            then()
    except BaseException as exc:
        if regular:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
        if isinstance(exc, OSError) and exc.filename is None and path is not None:  # a full disk names the file
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


class Frames:
    """The trajectory: ``.traj`` (ASE's, which stays readable when cut short) or extended XYZ written
    through :func:`append_frame` to ``fd`` (the locked file)."""

    def __init__(self, path: str, fd: int, atoms, dt_fs: float):
        self.path, self.fd, self.dt_fs, self.last_step, self.traj = path, fd, dt_fs, None, None
        self.is_traj = path.lower().endswith(".traj")
        if self.is_traj:
            from .trajfile import WholeFrameTrajectory

            self.traj = WholeFrameTrajectory(path, "w", atoms)

    def write(self, frame, step: int) -> None:
        """Write ``frame`` (an :class:`Outputs` snapshot's) as step ``step``."""
        frame.info.update(md_step=int(step), time_fs=float(step * self.dt_fs))
        if not self.is_traj:
            import io

            from ase.io import write

            buf = io.StringIO()  # the whole frame first, then one write (append_frame)
            write(buf, frame, format="extxyz")
            append_frame(self.fd, buf.getvalue().encode(), lambda: setattr(self, "last_step", step), self.path)
        else:  # energy, forces and stress (when there)
            frame.calc.results = {k: v for k, v in frame.calc.results.items() if k in ("energy", "forces", "stress")}
            self.traj.write(frame, then=lambda: setattr(self, "last_step", step))  # whole or not at all (app.trajfile)

    def close(self) -> None:
        if self.traj is not None:
            self.traj.close()


class Log:
    """The run's log every ``interval`` steps (``"-"``: standard output): time, energies per atom,
    the temperature over the degrees of freedom that move, the conserved quantity per atom, and for
    NPT volume and pressure. ``fd``: the file already open (and locked) for ``path``."""

    def __init__(self, path: str, npt: bool, fd: Optional[int] = None):
        import sys

        self.fh = sys.stdout if path == "-" else os.fdopen(fd, "w") if fd is not None else open(path, "w")
        self.npt, self.last_step = npt, None
        cols = ["time_ps", "Etot/N_eV", "Epot/N_eV", "Ekin/N_eV", "T_K", "conserved/N_eV"]
        self.fh.write(" ".join(f"{c:>14}" for c in cols + (["volume_A3", "pressure_bar"] if npt else [])) + "\n")

    def line(self, t_ps, epot, ekin, temp, conserved, n, volume=None, pressure=None):
        vals = [t_ps, (epot + ekin) / n, epot / n, ekin / n, temp]
        text = " ".join(f"{v:14.6f}" for v in vals) + (f" {conserved / n:14.6f}" if conserved is not None else
                                                        f" {'-':>14}")
        if self.npt:
            text += f" {volume:14.4f} {pressure:14.2f}"
        self.fh.write(text + "\n")
        self.fh.flush()

    def close(self):
        import sys

        if self.fh is not sys.stdout:
            self.fh.close()


@dataclasses.dataclass
class _Snapshot:
    """The run after a completed step: the step, the frame to write (a copy of the atoms with the
    calculator's results), the state to save (with ``save_state``), the log line's values."""

    step: int
    frame: object
    state: object
    line: tuple


class Outputs:
    """The files one run writes, each locked (``app.locks``) before it is emptied and held until
    :meth:`close`; and the last completed step, which :meth:`observe` keeps after every step (copies of
    the atoms, the calculator's results and the integrator's variables: cheap beside a model
    evaluation), so that an interrupted run ends its files on it. Built after the integrator (and a
    resumed state) is set up; ``resume``: the state file the run continues from (its ``save_state``
    may be that file)."""

    def __init__(self, atoms, s: MDSettings, dyn, model=None, runtime=None, resume: Optional[str] = None):
        from .locks import SiblingLock, empty, open_output

        self.atoms, self.s, self.dyn, self.model, self.runtime = atoms, s, dyn, model, runtime
        self.end, self.periodic, self.last = dyn.nsteps + s.steps, _periodic(atoms), None
        self.frames = self.log = self.state_lock = self._traj_fd = None
        opened = {}  # option -> (fd, created, path)
        try:  # every lock first, then the files emptied: a run that cannot have them all changes none
            if s.save_state is not None:
                self.state_lock = SiblingLock(s.save_state, "--save-state", temp_suffix=".tmp.npz")
                self._check_state_file(resume)
            for option, path in (("--trajectory", s.trajectory), ("--log", s.log)):
                if path not in (None, "-"):
                    opened[option] = (*open_output(path, option, s.overwrite), path)
            for fd, _, _ in opened.values():
                empty(fd)
            if "--trajectory" in opened:
                self._traj_fd = opened.pop("--trajectory")[0]
                self.frames = Frames(s.trajectory, self._traj_fd, atoms, s.dt_fs)
            if s.log is not None:
                fd = opened.pop("--log")[0] if "--log" in opened else None
                self.log = Log(s.log, s.ensemble == "npt", fd)
        except BaseException:
            for fd, created, path in opened.values():  # files this run made and has not begun: removed
                if created:
                    os.unlink(path)
                os.close(fd)
            self.close()
            raise

    def _check_state_file(self, resume: Optional[str]) -> None:
        """``FileExistsError`` for a --save-state file that appeared after the run checked its outputs
        (without ``overwrite``; the state the run resumes from may be it)."""
        from .files import same_file

        s = self.s
        if not s.overwrite and os.path.exists(s.save_state) and not (resume and same_file(resume, s.save_state)):
            raise FileExistsError(f"--save-state {s.save_state} exists (written since this run checked its "
                                  "outputs); pass --overwrite to replace it")

    def _frame(self):
        """A copy of the atoms as they are, with the calculator's results."""
        from ase.calculators.calculator import all_properties
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = self.atoms
        frame = atoms.copy()
        results = getattr(atoms.calc, "results", {})
        frame.calc = SinglePointCalculator(frame, **{k: v.copy() if isinstance(v, np.ndarray) else v
                                                     for k, v in results.items() if k in all_properties})
        frame.calc.name = getattr(atoms.calc, "name", frame.calc.name)
        return frame

    def _state(self):
        from .md_state import capture_state

        return capture_state(self.dyn, self.atoms, self.s, self.model, self.runtime)

    def _current(self) -> Optional[_Snapshot]:
        last = self.last
        return last if last is not None and last.step == self.dyn.nsteps else None

    def observe(self, *line) -> None:
        """After each step (from ``app.md``'s first observer, with the log line's values): keep the
        step as the last completed one, and write its log line when one is due."""
        step, s = int(self.dyn.nsteps), self.s
        self.last = _Snapshot(step, self._frame() if self.frames is not None else None,
                              self._state() if s.save_state is not None else None, line)
        if self.log is not None and (step % s.interval == 0 or step == self.end):
            self.log.line(*line)
            self.log.last_step = step

    def write(self) -> None:
        """Write the current frame (an observer every ``interval`` steps)."""
        if self.periodic and "stress" not in getattr(self.atoms.calc, "results", {}):  # a frame's stress (the model's: at once)
            from ase.calculators.calculator import PropertyNotImplementedError

            try:
                self.atoms.get_stress()
            except PropertyNotImplementedError:
                pass
        self.frames.write(self._frame(), int(self.dyn.nsteps))

    def save(self) -> None:
        """Write the state file (an observer every ``save_state_every`` steps)."""
        from .md_state import save_state

        now = self._current()
        save_state(self.s.save_state, now.state if now is not None else self._state())

    def run(self, record) -> None:
        """Run the steps with ``record`` (which calls :meth:`observe`) after each, a frame every
        ``interval`` and the state every ``save_state_every`` steps and at the end; close the files.
        Interrupted (``KeyboardInterrupt``), the trajectory, log and state end on the last completed
        step (:meth:`end_on_last`) and the interrupt goes on."""
        s, dyn = self.s, self.dyn
        outputs = [(f, every) for f, every, on in ((self.write, s.interval, self.frames),
                                                   (self.save, s.save_state_every, s.save_state)) if on is not None]
        for f, every in [(record, 1)] + outputs:
            dyn.attach(f, interval=every)
        try:
            if dyn.nsteps:  # ASE calls the observers at step 0 only; a resumed run records and writes its first frame
                record()
                if self.frames is not None:
                    self.write()
            dyn.run(s.steps)
            for f, every in outputs:
                if dyn.nsteps % every:
                    f()  # the last frame and state always (a run continues from them)
        except KeyboardInterrupt:
            self.end_on_last()
            raise
        finally:
            self.close()

    def end_on_last(self) -> Optional[int]:
        """After an interrupt, wherever it came (inside a step, an observer, a frame being written):
        end the trajectory, the log and the state file on the last completed step, as a run of that
        many steps ends them (its frame and log line unless written already, its state), so that a
        run resumed from the state neither repeats nor skips a frame; say so on stderr. The step
        (None when none completed: nothing written)."""
        import sys

        snap = self.last
        if snap is None:
            return None
        if self.frames is not None and self.frames.last_step != snap.step:
            self.frames.write(snap.frame, snap.step)
        if self.log is not None and self.log.last_step != snap.step:
            self.log.line(*snap.line)
            self.log.last_step = snap.step
        ends = [f"{opt} {p}" for opt, p in (("--trajectory", self.s.trajectory), ("--log", self.s.log))
                if p not in (None, "-")]
        text = f"md: interrupted; step {snap.step} was the last completed"
        if ends:
            text += f"; {' and '.join(ends)} end{'' if len(ends) > 1 else 's'} on it"
        if self.s.save_state is not None:
            from .md_state import save_state

            save_state(self.s.save_state, snap.state)
            text += (f"; --save-state {self.s.save_state} holds step {snap.step}: continue with --resume "
                     f"{self.s.save_state}")
        print(f"mmea-kernels {text}", file=sys.stderr, flush=True)
        return snap.step

    def close(self) -> None:
        """Close the files and let go of their locks."""
        for f in (self.frames, self.log):
            if f is not None:
                f.close()
        self.frames = self.log = None
        if self._traj_fd is not None:
            os.close(self._traj_fd)
            self._traj_fd = None
        if self.state_lock is not None:
            self.state_lock.release()
            self.state_lock = None


def summary(atoms, s: MDSettings, rec: dict) -> dict:
    n = len(atoms)
    out = {"ensemble": s.ensemble, "integrator": s.integrator, "steps": s.steps, "dt_fs": s.dt_fs, "atoms": n,
           "target_temperature_K": s.temperature_K, "mean_temperature_K": float(np.mean(rec["temperature"])),
           "std_temperature_K": float(np.std(rec["temperature"]))}
    if rec["conserved"][0] is not None:
        e = np.asarray(rec["conserved"], dtype=float)
        t_ps = np.arange(len(e)) * s.dt_fs / 1000
        out["drift_meV_per_atom_per_ps"] = 1000 * float(np.polyfit(t_ps, e, 1)[0]) / n
        out["max_deviation_meV_per_atom"] = 1000 * float(np.abs(e - e[0]).max()) / n
    if s.ensemble == "npt":
        from ase import units

        v = float(np.mean(rec["volume"]))
        out.update(target_pressure_bar=s.pressure_bar, mean_pressure_bar=float(np.mean(rec["pressure"])),
                   mean_volume_A3=v, final_volume_A3=float(atoms.get_volume()),
                   mean_density_g_per_cm3=float(atoms.get_masses().sum()) / units.mol / (v * 1e-24))
    if s.trajectory is not None:
        out["trajectory"] = s.trajectory
    return out
