"""The outputs of an MD run (``app.md``): its trajectory (frames with energy, forces, stress, step
and time), its log, and the JSON summary."""
from __future__ import annotations

import os

import numpy as np

from .md import MDSettings, _periodic

__all__ = ["writer", "Log", "summary"]


def writer(atoms, s: MDSettings, dyn):
    """A function writing the current frame (with its energy, forces and, when periodic, stress; its
    step and time in ``info["md_step"]``, ``info["time_fs"]``), and the file to close at the end (or
    None)."""
    if s.trajectory is None:
        return None, None
    from ase.io import write

    if os.path.exists(s.trajectory):
        os.remove(s.trajectory)  # s.check() refused it unless overwrite

    def stamp():
        atoms.info.update(md_step=int(dyn.nsteps), time_fs=float(dyn.nsteps * s.dt_fs))

    if s.trajectory.lower().endswith(".traj"):
        from ase.io.trajectory import Trajectory

        traj = Trajectory(s.trajectory, "w", atoms, properties=["energy", "forces"] + (["stress"] if _periodic(atoms) else []))
        return (lambda: (stamp(), traj.write())), traj
    return (lambda: (stamp(), write(s.trajectory, atoms, format="extxyz", append=True))), None


class Log:
    """The run's log every ``interval`` steps (``"-"``: standard output): time, energies per atom,
    the temperature over the degrees of freedom that move, the conserved quantity per atom, and for
    NPT volume and pressure."""

    def __init__(self, path: str, npt: bool):
        import sys

        self.fh = sys.stdout if path == "-" else open(path, "w")
        self.npt = npt
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
