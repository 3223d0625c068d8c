"""MD state files: what a run needs to go on exactly where it stopped (positions, momenta, cell, the
step, the integrator's own variables and its random-number generator), as a NumPy ``.npz`` read
without pickles. :func:`save_state` replaces the file atomically; :func:`load_state` checks every key.

A run resumed from a state file takes the same steps as the uninterrupted run, to the last bit on the
same machine, model, dtype and thread count: the thermostat's chain variables (Nosé–Hoover), the
barostat's strain, its momentum and the reference cell (MTK), the energy a Bussi thermostat put in,
and the generator state of the stochastic thermostats all carry over."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

__all__ = ["MDState", "save_state", "load_state", "capture_state", "restore_state", "PHYSICS"]

FORMAT, VERSION = "mmea-md-state", 1
# the settings that define the dynamics: a resumed run keeps them (command-line option in brackets)
PHYSICS = {"ensemble": "--ensemble", "thermostat": "--thermostat", "dt_fs": "--dt", "temperature_K": "--temperature",
           "tdamp_fs": "--tdamp", "pressure_bar": "--pressure", "pdamp_fs": "--pdamp", "seed": "--seed"}
# the integrator's own variables: name -> (shape or None for a scalar) per integrator
_VARIABLES = {
    "velocity-verlet": {}, "langevin": {}, "bussi": {"transferred_energy": None},
    "nose-hoover": {"eta": ("chain",), "p_eta": ("chain",)},
    "mtk-npt": {"eta": ("chain",), "p_eta": ("chain",), "xi": ("chain",), "p_xi": ("chain",), "eps": None,
                "p_eps": None, "volume0": None, "cell0": (3, 3)},
}
_STOCHASTIC = ("langevin", "bussi")


@dataclasses.dataclass
class MDState:
    """``atoms``: numbers, positions, momenta, cell, pbc, masses, tags, constraints (not ``FixCom``,
    which a Langevin run adds itself); ``step``: the steps run so far; ``physics``: the settings in
    :data:`PHYSICS`; ``variables``: the integrator's own; ``rng``: the generator state of a
    stochastic thermostat; ``model``: what identifies the model that ran (or None); ``path``: the
    file it was read from; ``runtime``: the model's precision and device ("float64 on cpu")."""

    atoms: object
    step: int
    physics: dict
    variables: dict
    rng: Optional[dict] = None
    model: Optional[str] = None
    path: Optional[str] = None
    runtime: Optional[str] = None

    @property
    def integrator(self) -> str:
        e, t = self.physics["ensemble"], self.physics["thermostat"]
        return {"nve": "velocity-verlet", "npt": "mtk-npt"}.get(e, t or "langevin")


def capture_state(dyn, atoms, settings, model: Optional[str] = None, runtime: Optional[str] = None) -> MDState:
    """The state of ``dyn`` (built by ``app.md``) on ``atoms`` after ``dyn.nsteps`` steps."""
    from .md import _clean_copy

    physics = {k: getattr(settings, k) for k in PHYSICS}
    physics["thermostat"] = settings.effective_thermostat  # as it runs: nvt's default is langevin
    kind = settings.integrator
    v: dict = {}
    if kind == "bussi":
        v["transferred_energy"] = float(dyn.transferred_energy)
    if kind in ("nose-hoover", "mtk-npt"):
        v.update(eta=dyn._thermostat._eta.copy(), p_eta=dyn._thermostat._p_eta.copy())
    if kind == "mtk-npt":
        v.update(xi=dyn._barostat._xi.copy(), p_xi=dyn._barostat._p_xi.copy(), eps=float(dyn._eps),
                 p_eps=float(dyn._p_eps), volume0=float(dyn._volume0), cell0=np.array(dyn._cell0, dtype=float))
    rng = dyn.rng.bit_generator.state if kind in _STOCHASTIC else None
    return MDState(_clean_copy(atoms), int(dyn.nsteps), physics, v, rng, model, runtime=runtime)


def restore_state(dyn, state: MDState) -> None:
    """Put ``state``'s step, integrator variables and generator state into ``dyn``, built on
    ``state.atoms`` with ``state.physics``."""
    kind, v = state.integrator, state.variables
    for name in ("eta", "xi"):
        chain = {"eta": "_thermostat", "xi": "_barostat"}[name]
        if name in v and len(v[name]) != len(getattr(getattr(dyn, chain), f"_{name}")):
            raise ValueError(f"the state's {name} chain has {len(v[name])} links; this integrator has "
                             f"{len(getattr(getattr(dyn, chain), f'_{name}'))}")
    dyn.nsteps = state.step
    if kind == "bussi":
        dyn.transferred_energy = v["transferred_energy"]
    if kind in ("nose-hoover", "mtk-npt"):
        dyn._thermostat._eta[:], dyn._thermostat._p_eta[:] = v["eta"], v["p_eta"]
    if kind == "mtk-npt":
        dyn._barostat._xi[:], dyn._barostat._p_xi[:] = v["xi"], v["p_xi"]
        dyn._eps, dyn._p_eps, dyn._volume0, dyn._cell0 = v["eps"], v["p_eps"], v["volume0"], v["cell0"].copy()
    if kind in _STOCHASTIC:
        dyn.rng.bit_generator.state = state.rng


def save_state(path: str, state: MDState) -> None:
    """Write ``state`` to ``path`` (``.npz``): a temporary file in the same directory, then renamed
    over it, so that an interrupted run leaves the previous state whole (a symlink is written through)."""
    from ase.io.jsonio import encode

    from ..train.atomic import atomic_path

    a = state.atoms
    arrays = {"numbers": a.numbers, "positions": a.positions, "momenta": a.get_momenta(),
              "cell": np.array(a.cell, dtype=float), "pbc": np.asarray(a.pbc, dtype=bool), "masses": a.get_masses(),
              "tags": a.get_tags()}
    arrays.update({f"var_{k}": np.asarray(x, dtype=float) for k, x in state.variables.items()})
    meta = {"format": FORMAT, "version": VERSION, "step": state.step, "physics": state.physics, "model": state.model,
            "runtime": state.runtime, "rng": state.rng, "constraints": [json.loads(encode(c.todict())) for c in a.constraints]}
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)


def load_state(path: str) -> MDState:
    """The state in ``path``; ``ValueError`` naming the file and the key for anything that is not a
    state this version wrote (pickled objects are never loaded)."""
    import zipfile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--resume {path} is not an MD state file (the .npz archive md --save-state writes)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"--resume {path} holds pickled objects, which are never loaded (a state file "
                             "has none)") from None
        raise ValueError(f"--resume {path} is not a readable MD state file: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"--resume {path} is not a readable MD state file: {exc}") from None
    meta = _meta(arrays, path)
    return MDState(_atoms(arrays, meta, path), meta["step"], meta["physics"], _variables(arrays, meta, path),
                   meta["rng"], meta["model"], path, meta.get("runtime"))


def _meta(arrays: dict, path: str) -> dict:
    def bad(why):
        return ValueError(f"--resume {path}: {why}")

    if "meta" not in arrays or arrays["meta"].dtype.kind != "U" or arrays["meta"].shape != ():
        raise bad("no 'meta' entry: not an MD state file written by mmea-kernels md --save-state")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exc:
        raise bad(f"its 'meta' entry is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"'meta' names no {FORMAT!r} format")
    if meta.get("version") != VERSION:
        raise bad(f"version {meta.get('version')!r}; this mmea-kernels reads version {VERSION}")
    step, physics = meta.get("step"), meta.get("physics")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"key 'step' must be a whole number >= 0, got {step!r}")
    if not isinstance(physics, dict) or set(physics) != set(PHYSICS):
        raise bad(f"key 'physics' must hold exactly {', '.join(PHYSICS)}")
    from .md import MDSettings

    try:
        MDSettings(**physics).check()
    except (TypeError, ValueError) as exc:
        raise bad(f"key 'physics': {exc}") from None
    for key in ("model", "runtime"):
        if not (meta.get(key) is None or isinstance(meta.get(key), str)):
            raise bad(f"key {key!r} must be a string or null")
    stochastic = MDState(None, 0, physics, {}).integrator in _STOCHASTIC
    rng = meta.get("rng")
    if stochastic and not (isinstance(rng, dict) and rng.get("bit_generator") == "PCG64"):
        raise bad("key 'rng' must hold a PCG64 generator state (the thermostat's random numbers)")
    if not isinstance(meta.get("constraints"), list):
        raise bad("key 'constraints' must be a list")
    return meta


def _atoms(arrays: dict, meta: dict, path: str):
    from ase import Atoms
    from ase.constraints import dict2constraint
    from ase.io.jsonio import decode

    def need(key, shape, kind):
        x = arrays.get(key)
        if x is None:
            raise ValueError(f"--resume {path}: key {key!r} is missing")
        if x.shape != shape or x.dtype.kind not in kind:
            raise ValueError(f"--resume {path}: key {key!r} has shape {x.shape} and dtype {x.dtype}; expected "
                             f"shape {shape} of kind {kind}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError(f"--resume {path}: key {key!r} holds non-finite values")
        return x

    numbers = need("numbers", arrays.get("numbers", np.zeros(0)).shape[:1], "iu")
    n = len(numbers)
    if n < 1 or numbers.min() < 1 or numbers.max() > 118:
        raise ValueError(f"--resume {path}: key 'numbers' must hold atomic numbers 1..118 for at least one atom")
    if not (need("masses", (n,), "f") > 0).all():
        raise ValueError(f"--resume {path}: key 'masses' must hold masses > 0")
    atoms = Atoms(numbers=numbers, positions=need("positions", (n, 3), "f"), cell=need("cell", (3, 3), "f"),
                  pbc=need("pbc", (3,), "b"), masses=need("masses", (n,), "f"), tags=need("tags", (n,), "iu"),
                  momenta=need("momenta", (n, 3), "f"))
    try:
        atoms.set_constraint([dict2constraint(decode(json.dumps(c))) for c in meta["constraints"]])
    except Exception as exc:  # noqa: BLE001 - anything a malformed constraint entry raises
        raise ValueError(f"--resume {path}: key 'constraints' cannot be read as ASE constraints "
                         f"({type(exc).__name__}: {exc})") from None
    return atoms


def _variables(arrays: dict, meta: dict, path: str) -> dict:
    kind = MDState(None, 0, meta["physics"], {}).integrator
    out = {}
    for name, shape in _VARIABLES[kind].items():
        x = arrays.get(f"var_{name}")
        ok = x is not None and x.dtype.kind == "f" and np.isfinite(x).all()
        ok = ok and (x.shape == () if shape is None else (x.ndim == 1 and len(x) >= 1 if shape == ("chain",)
                                                          else x.shape == shape))
        if not ok:
            raise ValueError(f"--resume {path}: key 'var_{name}' ({kind}'s state) is missing or not "
                             f"{'a finite number' if shape is None else 'a finite array of shape ' + str(shape)}")
        out[name] = float(x) if shape is None else x.copy()
    pairs = [("eta", "p_eta"), ("xi", "p_xi")]
    if any(a in out and len(out[a]) != len(out[b]) for a, b in pairs):
        raise ValueError(f"--resume {path}: the chain variables (var_eta/var_p_eta, var_xi/var_p_xi) differ in length")
    return out
