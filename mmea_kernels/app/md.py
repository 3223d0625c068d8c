"""Molecular dynamics with a (fine-tuned) model through ASE: NVE (the energy-conservation check), NVT
(Langevin, Bussi's stochastic velocity rescaling, Nosé–Hoover chains) and NPT (isotropic
Martyna–Tobias–Klein, Nosé–Hoover chains on particles and cell), with a trajectory, a log and a
JSON summary.

Units: time step and damping times in fs, temperature in K, pressure in bar. Each run starts from
Maxwell–Boltzmann velocities at the temperature (``velocities="maxwell"``; the centre-of-mass motion
and, for a molecule, the rotation removed) or from the momenta the structure file carries
(``velocities="file"``: continue a run from the last frame of its trajectory)."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import numpy as np

__all__ = ["MDSettings", "run_md", "resumed_settings", "nve_drift", "check_md_settings", "ENSEMBLES", "THERMOSTATS"]

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "bussi", "nose-hoover")
TRAJECTORY_SUFFIXES = (".traj", ".xyz", ".extxyz")


@dataclasses.dataclass
class MDSettings:
    """What :func:`run_md` runs. ``thermostat``: for ``nvt`` one of :data:`THERMOSTATS` (default
    langevin); ``npt`` always uses Nosé–Hoover chains (MTK), ``nve`` none. ``tdamp_fs``: the
    thermostat's time constant (Langevin friction = 1/tdamp); ``pdamp_fs``: the barostat's.
    ``trajectory``: ``.traj`` or ``.xyz``/``.extxyz``, a frame (positions, momenta, energy, forces,
    stress when periodic) every ``interval`` steps, the first and the last included; ``log``: ASE's MD log every
    ``interval`` steps (``"-"``: standard output); ``save_state``: an MD state file (``app.md_state``)
    every ``save_state_every`` steps and at the end, to resume from. Existing output files are refused
    unless ``overwrite`` (the state file a run resumes from may be its ``save_state``), an input file
    always, and a file another run is writing (each is locked for the run: ``app.locks``); a setting
    the run would not use (``tdamp_fs`` for nve, ``pressure_bar``/``pdamp_fs`` but for npt,
    ``save_state_every`` without ``save_state``) when given or other than its default."""

    steps: int = 400
    dt_fs: float = 0.5
    temperature_K: float = 300.0
    ensemble: str = "nve"
    thermostat: Optional[str] = None
    tdamp_fs: float = 100.0
    pressure_bar: float = 1.01325
    pdamp_fs: float = 1000.0
    velocities: str = "maxwell"
    seed: int = 0
    trajectory: Optional[str] = None
    log: Optional[str] = None
    interval: int = 10
    overwrite: bool = False
    save_state: Optional[str] = None
    save_state_every: int = 1000

    @property
    def effective_thermostat(self) -> Optional[str]:
        """The thermostat that runs: None (nve), ``thermostat`` or langevin (nvt), nose-hoover (npt)."""
        return {"nve": None, "npt": "nose-hoover"}.get(self.ensemble, self.thermostat or "langevin")

    @property
    def integrator(self) -> str:
        if self.ensemble == "nve":
            return "velocity-verlet"
        if self.ensemble == "npt":
            return "mtk-npt"
        return self.thermostat or "langevin"

    def check(self, resume: Optional[str] = None, inputs: Optional[dict] = None, given=(), api: bool = False) -> None:
        """``ValueError`` naming the setting (as its command-line option) that cannot be run;
        ``resume``: the state file the run continues from; ``inputs``: the run's other input files
        (``{option: path}``), which no output may be; ``given``: the fields the caller chose (a
        field this run would not use is refused when given or other than its default, named as
        the field with ``api``: :func:`run_md`'s keywords)."""
        check_md_settings(self.steps, self.dt_fs, self.temperature_K)
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"unknown --ensemble {self.ensemble!r}; expected one of {', '.join(ENSEMBLES)}")
        if self.thermostat is not None:
            if self.thermostat not in THERMOSTATS:
                raise ValueError(f"unknown --thermostat {self.thermostat!r}; expected one of {', '.join(THERMOSTATS)}")
            if self.ensemble == "nve":
                raise ValueError(f"--thermostat {self.thermostat} needs --ensemble nvt or npt (nve has none)")
            if self.ensemble == "npt" and self.thermostat != "nose-hoover":
                raise ValueError(f"--ensemble npt runs Nosé–Hoover chains (MTK); --thermostat {self.thermostat} "
                                 "is for nvt")
        if self.ensemble != "nve" and not self.temperature_K > 0:
            raise ValueError(f"--ensemble {self.ensemble} needs a temperature > 0 K, got --temperature "
                             f"{self.temperature_K}")
        for name, v in (("--tdamp", self.tdamp_fs), ("--pdamp", self.pdamp_fs)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a time > 0 fs, got {v}")
        self._check_unused(given, api)
        if not math.isfinite(self.pressure_bar):
            raise ValueError(f"--pressure must be finite, got {self.pressure_bar}")
        if self.velocities not in ("maxwell", "file"):
            raise ValueError(f"--velocities must be maxwell or file, got {self.velocities!r}")
        for name, v in (("--interval", self.interval), ("--save-state-every", self.save_state_every)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a whole number of steps >= 1, got {v}")
        if self.trajectory is not None and os.path.splitext(self.trajectory)[1].lower() not in TRAJECTORY_SUFFIXES:
            raise ValueError(f"--trajectory {self.trajectory}: the name must end in one of "
                             f"{', '.join(TRAJECTORY_SUFFIXES)} (the format is taken from it)")
        from .files import check_outputs, same_file

        outputs = {"--trajectory": self.trajectory, "--log": self.log, "--save-state": self.save_state}
        inputs = dict(inputs or {}, **({"--resume": resume} if resume is not None else {}))
        if resume is not None and self.save_state is not None and same_file(resume, self.save_state):
            if any(p not in (None, "-") and same_file(p, resume)  # --save-state is updated in place: no --overwrite
                   for k, p in outputs.items() if k != "--save-state"):
                raise ValueError("--save-state and another output are the same file; give each its own name")
            outputs["--save-state"] = None
        check_outputs(outputs, self.overwrite, inputs)

    def _check_unused(self, given=(), api: bool = False) -> None:
        """``ValueError`` for a setting this run would not use that was ``given`` or is other than
        its default, named as md's option (as the field with ``api``)."""
        def chosen(field):
            return field in given or getattr(self, field) != getattr(MDSettings, field)

        name = lambda field, value=None: _setting_name(field, api, value)  # noqa: E731
        unused = [(field, name("ensemble", "npt")) for field in ("pressure_bar", "pdamp_fs")
                  if self.ensemble != "npt" and chosen(field)]
        if self.ensemble == "nve" and chosen("tdamp_fs"):
            unused.append(("tdamp_fs", f"a thermostat ({name('ensemble', 'nvt')} or {repr('npt') if api else 'npt'})"))
        if self.save_state is None and chosen("save_state_every"):
            unused.append(("save_state_every", name("save_state")))
        if unused:
            field, needs = unused[0]
            raise ValueError(f"{name(field)} is for {needs}; this run ({self.ensemble}) would not use it")


def check_md_settings(steps: int, dt_fs: float, temperature_K: float) -> None:
    """``ValueError`` for fewer than one step, a step that is not positive, or a negative temperature."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:  # 2.5, "3", True
        raise ValueError(f"md needs at least 1 step, a whole number, got --steps {steps!r}")
    if not (math.isfinite(dt_fs) and dt_fs > 0):
        raise ValueError(f"md needs a time step > 0 fs, got --dt {dt_fs}")
    if not (math.isfinite(temperature_K) and temperature_K >= 0):
        raise ValueError(f"md needs a temperature >= 0 K, got --temperature {temperature_K}")


def _periodic(atoms) -> bool:
    return bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > 1e-9


def _pinned(atoms) -> bool:
    """Whether constraints other than ``FixCom`` hold atoms (then the centre of mass and the rotation
    are not free motions to remove)."""
    from ase.constraints import FixCom

    return any(not isinstance(c, FixCom) for c in atoms.constraints)


def _clean_copy(atoms, keep_momenta: bool = True):
    """A copy with only what a new frame is: numbers, positions, cell, pbc, masses, tags, constraints
    other than ``FixCom`` (and the momenta); no labels of the input frame (``REF_energy``, ...), which
    would stand beside new geometries as if they belonged to them."""
    from ase import Atoms
    from ase.constraints import FixCom

    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    for key in ("masses", "tags") + (("momenta",) if keep_momenta else ()):
        if key in atoms.arrays:
            out.arrays[key] = atoms.arrays[key].copy()
    out.set_constraint([c.copy() for c in atoms.constraints if not isinstance(c, FixCom)])
    return out


def degrees_of_freedom(atoms, integrator: str) -> int:
    """The degrees of freedom the kinetic energy is shared among during a run of ``integrator`` on
    ``atoms`` as :func:`run_md` sets it up: 3N less the centre of mass (always removed and then
    conserved, or fixed by ``FixCom`` under Langevin) and, for a structure periodic in no direction
    and a deterministic or global thermostat, the rotations (removed at the start and then conserved:
    3, or 2 for a linear molecule). With other constraints: ASE's count (3N less what they fix)."""
    if _pinned(atoms):
        return int(atoms.get_number_of_degrees_of_freedom())
    dof = 3 * len(atoms) - 3
    if integrator != "langevin" and not np.any(atoms.pbc) and len(atoms) > 1:
        moments = atoms.get_moments_of_inertia()
        dof -= int(np.sum(moments > 1e-8 * max(float(moments.max()), 1e-30)))
    return dof


def temperature(atoms, dof: int) -> float:
    """The kinetic temperature (K) over ``dof`` degrees of freedom."""
    from ase import units

    return 2.0 * atoms.get_kinetic_energy() / (dof * units.kB)


def _start_velocities(atoms, s: MDSettings, where: str) -> None:
    """Maxwell–Boltzmann momenta at the temperature (``maxwell``) or the file's (``file``); then,
    unless constraints pin atoms, the centre-of-mass motion and (no periodic direction) the rotation
    removed, without rescaling: what is left is a Maxwell–Boltzmann sample of the remaining degrees
    of freedom, which :func:`degrees_of_freedom` counts."""
    from ase.md import velocitydistribution as vd

    if s.velocities == "file":
        p = atoms.get_momenta()
        if not np.isfinite(p).all():
            raise ValueError(f"{where}: the momenta in the file are not finite")
        if not np.abs(p).max(initial=0.0) > 0:
            raise ValueError(f"--velocities file, but {where} carries no momenta (all zero); "
                             "use a frame of an md --trajectory, or --velocities maxwell")
    else:
        rng = np.random.default_rng(s.seed)
        if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
            vd.thermalize_momenta(atoms, s.temperature_K, rng=rng)
        else:
            vd.MaxwellBoltzmannDistribution(atoms, temperature_K=s.temperature_K, rng=rng)
    if not _pinned(atoms):
        vd.Stationary(atoms, preserve_temperature=False)
        if not np.any(atoms.pbc):
            vd.ZeroRotation(atoms, preserve_temperature=False)


def _ase(module: str, name: str):
    """``name`` from ``ase.md.<module>``, or an ImportError that says which ASE has it."""
    import importlib

    import ase

    try:
        return getattr(importlib.import_module(f"ase.md.{module}"), name)
    except (ImportError, AttributeError):
        raise ImportError(f"this integrator needs ase.md.{module}.{name}, which ASE {ase.__version__} lacks; "
                          "pip install 'ase>=3.26'") from None


def _integrator(atoms, s: MDSettings):
    from ase import units

    dt, tdamp, T = s.dt_fs * units.fs, s.tdamp_fs * units.fs, s.temperature_K
    rng = np.random.default_rng(s.seed + 1)
    if s.ensemble == "nve":
        return _ase("verlet", "VelocityVerlet")(atoms, dt)
    if s.ensemble == "npt":
        dyn = _ase("nose_hoover_chain", "IsotropicMTKNPT")(
            atoms, dt, temperature_K=T, pressure_au=s.pressure_bar * units.bar, tdamp=tdamp, pdamp=s.pdamp_fs * units.fs)
        # ASE's MTK counts 3N degrees of freedom (thermostat target, the barostat's 1 + d/N_f and
        # kinetic terms, its mass); the centre of mass stays still, so 3N - 3 move: with 3N the
        # box ran N/(N-1) hot (8 atoms: 683 K for 600 K, found in review)
        n_eff = degrees_of_freedom(atoms, "mtk-npt") / 3
        dyn._num_atoms_global = n_eff
        dyn._thermostat = _ase("nose_hoover_chain", "NoseHooverChainThermostat")(
            num_atoms_global=n_eff, masses=dyn.masses, temperature_K=T, tdamp=tdamp)
        dyn._barostat = _ase("nose_hoover_chain", "IsotropicMTKBarostat")(
            num_atoms_global=n_eff, temperature_K=T, pdamp=s.pdamp_fs * units.fs)
        return dyn
    if s.integrator == "langevin":
        from ase.constraints import FixCom

        if not _pinned(atoms):  # the centre of mass stays (ASE >= 3.28's way); pinned atoms hold it already
            atoms.set_constraint(list(atoms.constraints) + [FixCom()])
        return _ase("langevin", "Langevin")(atoms, dt, temperature_K=T, friction=1.0 / tdamp, fixcm=False, rng=rng)
    dof = degrees_of_freedom(atoms, s.integrator)
    if s.integrator == "bussi":
        dyn = _ase("bussi", "Bussi")(atoms, dt, temperature_K=T, taut=tdamp, rng=rng)
        dyn.ndof, dyn.target_kinetic_energy = dof, 0.5 * dyn.temp * dof  # ASE counts 3N less constraints
        return dyn
    dyn = _ase("nose_hoover_chain", "NoseHooverChainNVT")(atoms, dt, temperature_K=T, tdamp=tdamp)
    # ASE's chain couples to 3N degrees of freedom; the thermostat with the count that moves (its
    # "number of atoms" enters only as 3 * n)
    dyn._thermostat = _ase("nose_hoover_chain", "NoseHooverChainThermostat")(
        num_atoms_global=dof / 3, masses=dyn.masses, temperature_K=T, tdamp=tdamp)
    return dyn


def _conserved(dyn, atoms, s: MDSettings) -> Optional[float]:
    """The quantity the integrator conserves (eV): the total energy (NVE), minus the energy the
    thermostat put in (Bussi), the extended Hamiltonian (Nosé–Hoover, MTK); None for Langevin."""
    if s.integrator == "velocity-verlet":
        return atoms.get_potential_energy() + atoms.get_kinetic_energy()
    if s.integrator == "bussi":
        return atoms.get_potential_energy() + atoms.get_kinetic_energy() - dyn.transferred_energy
    if s.integrator in ("nose-hoover", "mtk-npt"):
        return float(dyn.get_conserved_energy())
    return None


def resumed_settings(state, settings: MDSettings, given: dict, api: bool = False) -> MDSettings:
    """``settings`` with the dynamics of ``state`` (an ``app.md_state.MDState``); ``ValueError`` for any of
    ``given`` (settings the caller chose) that would change them, or for ``velocities="file"`` (a resumed
    run's momenta are the state's), named as md's options (as :func:`run_md`'s keywords with ``api``)."""
    from .md_state import PHYSICS

    for key, value in given.items():
        if key == "thermostat":  # as the state stores it: the one that runs (nvt's None is langevin)
            value = dataclasses.replace(MDSettings(), ensemble=given.get("ensemble", state.physics["ensemble"]),
                                        thermostat=value).effective_thermostat
        if key in PHYSICS and value != state.physics[key]:
            raise ValueError(f"{_setting_name(key, api, value)} differs from the state file's "
                             f"{state.physics[key]}: a resumed run continues the same dynamics (to change them, start "
                             "a new run from the last --trajectory frame with --velocities file)")
    if given.get("velocities") == "file":
        raise ValueError(("velocities='file' with resume" if api else "--velocities file with --resume")
                         + ": a resumed run takes its momenta from the state file")
    return dataclasses.replace(settings, **state.physics)


def _prepare(atoms, s: MDSettings, where: str, resume, model: Optional[str]):
    """A clean copy of the starting structure (of ``resume``'s when given), checked for ``s``."""
    if resume is not None:
        if resume.model is not None and model is not None and resume.model != model:
            raise ValueError(f"{where} was written by a run of another model ({resume.model}; now {model}): a "
                             "resumed run continues the same dynamics; resume with that model, or start a new run "
                             "from the last --trajectory frame with --velocities file")
        atoms = resume.atoms
    if s.ensemble == "npt" and not _periodic(atoms):
        raise ValueError(f"--ensemble npt needs a structure periodic in all three directions with a 3-D cell; "
                         f"{where} has pbc={np.asarray(atoms.pbc).tolist()} and cell volume "
                         f"{abs(atoms.cell.volume):.3g} Å³")
    atoms = _clean_copy(atoms)
    if _pinned(atoms) and s.integrator in ("nose-hoover", "mtk-npt"):
        raise ValueError(f"{where} has constraints ({', '.join(type(c).__name__ for c in atoms.constraints)}), which "
                         f"ASE's Nosé–Hoover integrators ({s.integrator}) do not support; use --thermostat bussi "
                         "or langevin, or remove them")
    return atoms


def run_md(atoms, calculator, settings: Optional[MDSettings] = None, where: str = "the structure", resume=None,
           model: Optional[str] = None, **kw) -> dict:
    """Run MD on a copy of ``atoms`` (positions, cell, momenta, constraints; not its labels) with
    ``calculator`` (settings: an :class:`MDSettings` or its fields as keywords; a keyword
    overrides the settings object's field). Returns a summary:
    mean and spread of the temperature (over :func:`degrees_of_freedom`), the drift (linear fit,
    meV/atom/ps) and largest deviation of the conserved quantity, and for NPT the mean volume,
    density and pressure. Stops with a ``ValueError`` when the energy turns non-finite.

    ``resume``: an ``app.md_state.MDState`` (``atoms`` is then unused): the run goes on from its
    step with its dynamics for ``steps`` more steps; keywords, the dynamics of a ``settings`` object
    (all of them: pass ``settings=None`` and keywords to take the state's), and other values than the
    defaults, that would change the dynamics are refused (:func:`resumed_settings`). A state of
    another precision, device or CPU thread count (``calculator.dtype``/``.device``) runs on, with
    ``"bit_identical_continuation": false`` in the summary. ``model``: a string
    identifying the model, kept in state files; resuming a state of another model is refused.
    Interrupted (``KeyboardInterrupt``), the trajectory, log and state file end on the last completed
    step, whatever the integrator was in the middle of (``md_output.Outputs.end_on_last``)."""
    from ase import units

    from .md_output import Outputs, summary

    s = dataclasses.replace(settings or MDSettings(), **_known(kw))
    runtime = _runtime(calculator)
    if resume is not None:  # keywords, every field of a settings object given, other values than the defaults
        from .md_state import PHYSICS

        s = resumed_settings(resume, s, {k: getattr(s, k) for k, f in _FIELDS.items()
                                         if k in kw or (settings is not None and k in PHYSICS)
                                         or getattr(s, k) != f.default}, api=True)
    s.check(getattr(resume, "path", None), given=set(kw), api=True)
    atoms = _prepare(atoms, s, where, resume, model)
    if degrees_of_freedom(atoms, s.integrator) < 1:
        raise ValueError(f"{where}: {len(atoms)} atom{'s' if len(atoms) != 1 else ''} with no degree of freedom left to "
                         "move (the centre of mass is held still, and for a molecule its rotation; constraints fix the "
                         "rest): MD has nothing to run; for a crystal cell of one atom, repeat it (atoms.repeat)")
    atoms.calc = calculator
    if resume is None:
        _start_velocities(atoms, s, where)
    dyn = _integrator(atoms, s)
    if resume is not None:
        from .md_state import restore_state

        restore_state(dyn, resume)
    first, dof, npt, n = dyn.nsteps, degrees_of_freedom(atoms, s.integrator), s.ensemble == "npt", len(atoms)
    rec = {k: [] for k in ("temperature", "conserved", "volume", "pressure")}
    out = Outputs(atoms, s, dyn, model, runtime, getattr(resume, "path", None))  # locks the files, or refuses

    def record():
        epot, step = atoms.get_potential_energy(), dyn.nsteps
        if not (math.isfinite(epot) and math.isfinite(atoms.get_kinetic_energy())):
            raise ValueError(f"md stopped: the total energy is {epot + atoms.get_kinetic_energy()} at step {step} "
                             f"(t = {step * s.dt_fs:g} fs); the structure or the model is unstable there")
        rec["temperature"].append(temperature(atoms, dof))
        rec["conserved"].append(_conserved(dyn, atoms, s))
        if npt:
            rec["volume"].append(atoms.get_volume())
            rec["pressure"].append(-float(np.mean(atoms.get_stress(include_ideal_gas=True)[:3])) / units.bar)
        out.observe(step * s.dt_fs / 1000, epot, atoms.get_kinetic_energy(), rec["temperature"][-1],
                    rec["conserved"][-1], n, *((rec["volume"][-1], rec["pressure"][-1]) if npt else ()))

    out.run(record)  # interrupted: the files end on the last completed step (md_output.Outputs.end_on_last)
    return dict(summary(atoms, s, rec), degrees_of_freedom=dof, first_step=first, last_step=dyn.nsteps,
                **_continuation(resume, runtime))


def _continuation(resume, runtime: Optional[str]) -> dict:
    """For a resumed run: whether it goes on to the bit (the state's precision and device), and why not."""
    if resume is None:
        return {}
    was = resume.runtime
    if was is not None and runtime is not None and " threads)" not in was:  # a state from before threads were kept
        runtime = runtime.split(" (")[0]
    if was is None or runtime is None or was == runtime:
        return {"bit_identical_continuation": True}
    return {"bit_identical_continuation": False,
            "continuation_note": f"the state was written by a run in {resume.runtime}, this one ran in {runtime}: "
                                 "the same dynamics to round-off, not to the bit"}


def _runtime(calculator) -> Optional[str]:
    """The precision and device the calculator's model runs in, and on the CPU its intra-op threads (sums
    group by thread): "float64 on cpu (2 threads)", when the calculator says."""
    import torch

    dtype, device = getattr(calculator, "dtype", None), getattr(calculator, "device", None)
    if dtype is None or device is None:
        return None
    threads = f" ({torch.get_num_threads()} threads)" if torch.device(device).type == "cpu" else ""
    return f"{str(dtype).replace('torch.', '')} on {device}{threads}"


_FIELDS = {f.name: f for f in dataclasses.fields(MDSettings)}
# the md command's dynamics options (argparse names) and the MDSettings fields they set
OPTION_FIELDS = {"dt": "dt_fs", "temperature": "temperature_K", "ensemble": "ensemble", "thermostat": "thermostat",
                 "tdamp": "tdamp_fs", "pressure": "pressure_bar", "pdamp": "pdamp_fs", "velocities": "velocities",
                 "seed": "seed"}


def _setting_name(field: str, api: bool, value=None) -> str:
    """An :class:`MDSettings` field as the caller named it: the field, :func:`run_md`'s keyword
    (``api``), or md's command-line option (:data:`OPTION_FIELDS`); with ``value``, as it is given."""
    if api:
        return field if value is None else f"{field}={value!r}"
    option = "--" + next((opt for opt, f in OPTION_FIELDS.items() if f == field), field).replace("_", "-")
    return option if value is None else f"{option} {value}"


def _known(kw: dict) -> dict:
    """``kw``, or a ``TypeError`` naming a keyword that is no :class:`MDSettings` field (and the
    field a command-line option name stands for)."""
    for key in kw:
        if key not in _FIELDS:
            name = key.lstrip("-").replace("-", "_")
            field = OPTION_FIELDS.get(name, name if name in _FIELDS else None)
            hint = f" (md's --{name.replace('_', '-')} is the field {field}: {field}={kw[key]!r})" if field else ""
            raise TypeError(f"run_md() got an unknown keyword {key!r}{hint}; the MDSettings fields (units in "
                            f"their names) are {', '.join(_FIELDS)}")
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in kw.items()}  # output files as str


def nve_drift(atoms, calculator, steps: int = 200, dt_fs: float = 0.5, temperature_K: float = 300.0,
              seed: int = 0) -> dict:
    """Velocity-Verlet NVE run from Maxwell–Boltzmann velocities; total-energy drift (linear fit,
    meV/atom/ps) and largest deviation (:func:`run_md` with ``ensemble="nve"``)."""
    return run_md(atoms, calculator, steps=steps, dt_fs=dt_fs, temperature_K=temperature_K, seed=seed)
