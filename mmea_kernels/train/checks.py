"""Input checks that run before any training or MD: reading a ``path[@index]`` selection, labels
(present, numeric, finite), geometry (finite positions, a lattice for periodic directions, a cell
wide enough for the cutoff, no coincident atoms, a sane number of neighbours per atom).

Every failure raises :class:`DataError` (a ``ValueError``, so the command line exits 2) with a
message naming the file (and selection), the frame, the atoms and the key. Frame numbers count
within the selection (``frame 0`` of ``data.xyz@50:`` is the file's frame 50), also after the
training frames are shuffled to split off a validation set (``frame_numbers``).

Labels are read from ``info`` (energy, stress) and ``arrays`` (forces) under the keys given, or,
where a frame has none there, from ``atoms.calc.results`` under the same name: ``ase.io.read`` moves
extended-XYZ ``energy=``, ``forces`` and ``stress=`` (ASE's standard names, as written from atoms
with a ``SinglePointCalculator``) there (:func:`read_label`, :func:`with_labels`).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import pathlib
import warnings
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["DataError", "TruncationWarning", "DataChecks", "parse_index", "read_structures", "check_positions", "check_labels", "check_geometry",
           "check_graphs", "checked_graphs", "read_label", "with_labels"]


class DataError(ValueError):
    """Bad input data; the message names the file, frame, atoms and key."""


@dataclasses.dataclass(frozen=True)
class DataChecks:
    """Thresholds of the geometry checks. ``min_distance`` (Å): two atoms (or an atom and a periodic
    image) closer than this are refused; ``max_neighbors``: most neighbours one atom may have within
    the cutoff; ``allow_small_cells``: accept periodic cells narrower than the cutoff (bulk crystals
    with small unit cells; atoms then see their own images)."""
    min_distance: float = 0.1
    max_neighbors: int = 500
    allow_small_cells: bool = False

    def __post_init__(self):
        if not (self.min_distance >= 0 and math.isfinite(self.min_distance)):
            raise ValueError(f"min_distance must be a finite number >= 0, got {self.min_distance}")
        if self.max_neighbors < 1:
            raise ValueError(f"max_neighbors must be >= 1, got {self.max_neighbors}")


def parse_index(index: str, spec: str) -> Union[int, slice]:
    """An ASE-style frame selection: ``5``, ``-1``, ``:50``, ``50:100``, ``::2``."""
    bad = DataError(f"{spec}: bad frame selection {'@' + index!r}; expected an index (0, -1) or a slice "
                    "(:50, 50:100, ::2)")
    if index == "":
        return slice(None)
    parts = index.split(":")
    try:
        nums = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise bad from None
    if len(parts) == 1:
        return nums[0]
    if len(parts) > 3:
        raise bad
    if len(parts) == 3 and nums[2] == 0:
        raise DataError(f"{spec}: bad frame selection {'@' + index!r}: the step cannot be 0")
    return slice(*nums)


def split_spec(spec) -> tuple:
    """(path, selection) of ``path[@index]``: the whole string when it names a file (a path may hold
    an ``@``), else split at the last ``@`` (a selection never holds one)."""
    spec = str(spec)
    if "@" not in spec or pathlib.Path(spec).is_file():
        return spec, ""
    path, _, index = spec.rpartition("@")
    return path, index


class TruncationWarning(UserWarning):
    """A data file that may have been cut short (no line break at its end)."""


def read_structures(spec: str, what: str = "data file") -> list:
    """The frames ASE reads from ``path[@index]``; a clear error for a missing, empty, truncated or
    unreadable file, an unknown format, a bad selection, or a selection with no frame."""
    import ase.io
    from ase.io.formats import UnknownFileTypeError

    path, index = split_spec(spec)
    p = pathlib.Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {p} is a directory; give a structure file (path[@index])")
    if not p.is_file():
        hint = ""
        try:
            if 0 < float(path) < 1 and not index:  # mace's --valid_fraction habit: --valid 0.1
                hint = f" (a fraction of the training frames is --valid-fraction {path})"
        except ValueError:
            pass
        raise FileNotFoundError(f"{what} {p} does not exist{hint}")
    if p.stat().st_size == 0:
        raise DataError(f"{what} {p} is empty")
    sel = parse_index(index, spec)
    _check_xyz_headers(p, sel, what)
    try:
        frames = ase.io.read(path, sel, do_not_split_by_at_sign=True)  # split_spec split it already
    except UnknownFileTypeError as exc:
        raise DataError(f"{what} {p}: ASE cannot tell its format ({exc}); use an extended-XYZ file "
                        "(.xyz / .extxyz)") from None
    except (StopIteration, IndexError):
        raise DataError(f"{spec}: frame {sel} does not exist ({p} has {_count_frames(p)} frames)") from None
    except Exception as exc:  # parse errors of a truncated or garbled file
        raise DataError(f"{what} {p} could not be read ({type(exc).__name__}: {str(exc) or 'no detail'}); "
                        "is it truncated or not extended XYZ?") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise DataError(f"{spec} selects no frames ({p} has {_count_frames(p)} frames)")
    empty = [i for i, a in enumerate(frames) if len(a) == 0]
    if empty:
        raise DataError(f"{spec}: frame {empty[0]} has no atoms")
    check_positions(frames, str(spec))
    _warn_if_cut(p, what)
    return frames


def _check_xyz_headers(p: pathlib.Path, sel: Union[int, slice], what: str) -> None:
    """Before ASE reads a plain-text ``.xyz`` / ``.extxyz`` file: every frame header it indexes for
    ``sel`` (an atom count, a comment line, that many atom lines, optional ``VEC`` lines, as ASE's
    extxyz reader walks them; up to one past a slice's stop, all for an index) declares a non-negative
    integer count no larger than the lines left: ASE's reader would spin through 10**12 missing lines.
    One pass over the lines (universal newlines, as ASE reads them); compressed and other formats are
    not scanned."""
    if p.suffix.lower() not in (".xyz", ".extxyz"):
        return
    last = sel.stop + 1 if isinstance(sel, slice) and sel.stop is not None and sel.stop >= 0 else None
    with open(p, encoding="latin-1", newline=None) as fh:  # every byte decodes; lines split as ASE splits them
        total = sum(1 for _ in fh)
        fh.seek(0)
        lines = iter(fh)
        done, frame = 0, 0  # lines read before `line`; frames indexed
        line = next(lines, "")
        while line.strip() and (last is None or frame < last):  # ASE's index stops at a blank line or the end
            digits = line.strip().lstrip("+")
            bad = f"{what} {p} could not be read (XYZError: frame {frame} (line {done + 1}): "  # as ASE's errors read
            if not (digits.isascii() and digits.isdigit()):
                raise DataError(f"{bad}the atom count {line.strip()[:40]!r} is not a non-negative integer); is it "
                                "truncated or not extended XYZ?")
            left = total - done - 2  # after this line and the comment line
            if len(digits) > 18 or int(digits) > left:
                raise DataError(f"{bad}declares {int(digits) if len(digits) <= 40 else digits[:40] + '...'} atoms, but "
                                f"only {max(left, 0)} lines follow its comment line); is it truncated or not extended XYZ?")
            n = int(digits)
            collections.deque(itertools.islice(lines, n + 1), maxlen=0)  # the comment and atom lines
            done += n + 2
            line = next(lines, "")
            while line.lstrip().startswith("VEC"):  # lattice vectors of old extended XYZ, after the atoms
                done, line = done + 1, next(lines, "")
            frame += 1


def _warn_if_cut(p: pathlib.Path, what: str) -> None:
    """A :class:`TruncationWarning` for an extended-XYZ file that ASE read but that does not end with
    a line break, as one whose writer was stopped mid-line looks (its last number may be cut short);
    one that ASE cannot read is an error already."""
    if p.suffix.lower() not in (".xyz", ".extxyz"):
        return
    with open(p, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
    if last not in (b"\n", b"\r"):
        warnings.warn(f"{what} {p} does not end with a line break, as a file whose writer was stopped mid-line "
                      "looks: its last number may be cut short; check its last line (or end it with a line break)",
                      TruncationWarning, stacklevel=3)


def _numbered(frames: Sequence, frame_numbers: Optional[Sequence[int]] = None):
    """(frame number for messages, frame): ``frame_numbers`` (the frames' places in the selection
    they were read from, when they were reordered) or their position."""
    if frame_numbers is None:
        return enumerate(frames)
    if len(frame_numbers) != len(frames):
        raise ValueError(f"{len(frame_numbers)} frame numbers for {len(frames)} frames")
    return zip((int(n) for n in frame_numbers), frames)


def check_positions(frames: Sequence, where: str, frame_numbers: Optional[Sequence[int]] = None) -> None:
    """Every position is a finite number."""
    for i, a in _numbered(frames, frame_numbers):
        bad = np.flatnonzero(~np.isfinite(np.asarray(a.positions, dtype=float)).all(axis=1))
        if bad.size:
            raise DataError(f"{where}: frame {i}: non-finite positions on atoms {_atoms_list(bad)}")


def _count_frames(p: pathlib.Path) -> Union[int, str]:
    import ase.io

    try:
        return len(ase.io.read(str(p), ":", do_not_split_by_at_sign=True))
    except Exception:
        return "an unreadable number of"


def _atoms_list(idx) -> str:
    idx = [int(i) for i in idx]
    return ", ".join(map(str, idx[:8])) + (f" … ({len(idx)} atoms)" if len(idx) > 8 else "")


_HOME = {"energy": "info", "stress": "info", "forces": "arrays"}


def _calc_results(a) -> dict:
    """The results of the frame's calculator while they are still those of its geometry (a
    calculator run before the atoms moved holds stale results: none then)."""
    calc = getattr(a, "calc", None)
    results = getattr(calc, "results", None)
    if not isinstance(results, dict) or not results:
        return {}
    try:
        if calc.check_state(a):  # positions, numbers, cell or pbc changed since the results were computed
            return {}
    except Exception:  # noqa: BLE001  (a calculator without the usual state check)
        return {}
    return results


def read_label(a, kind: str, key: str):
    """(value, its name for messages) of the ``kind`` label (energy, forces, stress) of frame ``a``:
    ``info[key]`` (``arrays[key]`` for forces), else ``atoms.calc.results[key]`` (where ``ase.io.read``
    puts extended-XYZ ``energy``, ``forces``, ``stress``); ``(None, None)`` when neither has it."""
    home = _HOME[kind]
    store = a.arrays if home == "arrays" else a.info
    if key in store:
        return store[key], f"{home}[{key!r}]"
    results = _calc_results(a)
    if key in results and results[key] is not None:
        return results[key], f"calc.results[{key!r}]"
    return None, None


def _missing(a, i: int, where: str, kind: str, key: str) -> str:
    home = _HOME[kind]
    keys = sorted(a.arrays if home == "arrays" else a.info)
    results = sorted(_calc_results(a))
    return (f"{where}: frame {i} has no {kind} under {home}[{key!r}] ({'array' if home == 'arrays' else 'info'} keys: "
            f"{keys}{f'; ASE calculator results (calc.results): {results}' if results else ''})")


def with_labels(frames: Sequence, energy_key: str, forces_key: str, stress_key: Optional[str] = None) -> list:
    """``frames`` with every label that :func:`read_label` finds only in ``atoms.calc.results`` put
    under its key in ``info`` / ``arrays`` (on a copy of that frame; the others as they are), for
    readers that look there only (mace-torch's ``config_from_atoms``)."""
    out = []
    for a in frames:
        moved = {}
        for kind, key in (("energy", energy_key), ("forces", forces_key), ("stress", stress_key)):
            if key is not None:
                value, name = read_label(a, kind, key)
                if name is not None and name.startswith("calc."):
                    moved[(kind, key)] = np.array(value, copy=True) if kind != "energy" else value
        if moved:
            a = a.copy()  # Atoms.copy() keeps info and arrays, not the calculator
            for (kind, key), value in moved.items():
                (a.arrays if _HOME[kind] == "arrays" else a.info)[key] = value
        out.append(a)
    return out


def check_stress_label(a, i: int, where: str, stress_key: str) -> None:
    """Frame ``i`` has a finite stress under ``info[stress_key]`` (or ``calc.results``; Voigt 6, 9
    numbers or 3 x 3; eV/Å³) and is periodic in all three directions with a 3-D cell (a stress needs a
    volume). A key named for virials is refused: mace-torch reads those apart (``--virials_key``), as
    ``W = -σ V`` in eV, and trained as stresses they would be wrong in sign and by the volume."""
    if "virial" in stress_key.lower():
        raise DataError(f"--stress-key {stress_key}: virials are not stresses (σ = -W / V, in eV/Å³, for a virial W "
                        f"in eV); convert them, e.g. atoms.info['REF_stress'] = -atoms.info['{stress_key}'] / "
                        f"atoms.get_volume(), and give that key")
    value, name = read_label(a, "stress", stress_key)
    if name is None:
        raise KeyError(_missing(a, i, where, "stress", stress_key) +
                       "; stress training (--w-stress > 0) and stress errors (--stress-key) need one in every frame")
    s = np.asarray(value)
    if s.shape not in ((6,), (9,), (3, 3)) or not np.issubdtype(s.dtype, np.number):
        raise DataError(f"{where}: frame {i}: {name} has shape {s.shape} and type {s.dtype}, expected "
                        "a stress as 6 (Voigt: xx yy zz yz xz xy), 9 or 3 x 3 numbers in eV/Å³")
    if not np.isfinite(s.astype(float)).all():
        raise DataError(f"{where}: frame {i}: non-finite stress {name} = {s.tolist()}")
    if not (bool(np.all(a.pbc)) and abs(a.cell.volume) > 1e-9):
        raise DataError(f"{where}: frame {i} has a stress label but is not periodic in all three directions with a "
                        f"3-D cell (pbc={np.asarray(a.pbc).tolist()}, volume {abs(a.cell.volume):.3g} Å³)")


def check_labels(frames: Sequence, where: str, energy_key: str, forces_key: str,
                 stress_key: Optional[str] = None, frame_numbers: Optional[Sequence[int]] = None) -> None:
    """Every frame has a finite number under ``info[energy_key]`` and a finite ``[n_atoms, 3]``
    array under ``arrays[forces_key]`` (either also under ``atoms.calc.results``, :func:`read_label`);
    with ``stress_key``, a stress too (:func:`check_stress_label`)."""
    for i, a in _numbered(frames, frame_numbers):
        if stress_key is not None:
            check_stress_label(a, i, where, stress_key)
        e, e_name = read_label(a, "energy", energy_key)
        if e_name is None:
            raise KeyError(_missing(a, i, where, "energy", energy_key))
        f, f_name = read_label(a, "forces", forces_key)
        if f_name is None:
            raise KeyError(_missing(a, i, where, "forces", forces_key))
        if isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, float, np.integer, np.floating)):
            raise DataError(f"{where}: frame {i}: {e_name} is {e!r}, not a number")
        if not math.isfinite(float(e)):
            raise DataError(f"{where}: frame {i}: the energy {e_name} is {float(e)}")
        f = np.asarray(f)
        if f.shape != (len(a), 3) or not np.issubdtype(f.dtype, np.number):
            raise DataError(f"{where}: frame {i}: {f_name} has shape {f.shape} and type {f.dtype}, "
                            f"expected {len(a)} x 3 numbers")
        bad = np.flatnonzero(~np.isfinite(f).all(axis=1))
        if bad.size:
            raise DataError(f"{where}: frame {i}: non-finite forces {f_name} on atoms {_atoms_list(bad)}")


def _widths(cell: np.ndarray, periodic: np.ndarray) -> np.ndarray:
    """Per periodic lattice vector, its length perpendicular to the other periodic vectors."""
    out = np.full(3, np.inf)
    for k in np.flatnonzero(periodic):
        others = [cell[j] for j in np.flatnonzero(periodic) if j != k]
        v = cell[k].copy()
        if others:
            q, _ = np.linalg.qr(np.array(others).T)
            v = v - q @ (q.T @ v)
        out[k] = np.linalg.norm(v)
    return out


def check_geometry(frames: Sequence, where: str, r_max: Optional[float] = None,
                   checks: DataChecks = DataChecks(), frame_numbers: Optional[Sequence[int]] = None) -> None:
    """Finite positions; for periodic directions a lattice vector that is not degenerate, a cell at
    least ``r_max`` wide (unless ``checks.allow_small_cells``) and a neighbour estimate under
    ``checks.max_neighbors``. Runs before any neighbour list is built."""
    check_positions(frames, where, frame_numbers)
    for i, a in _numbered(frames, frame_numbers):
        periodic = np.asarray(a.pbc, dtype=bool)
        if not periodic.any():
            continue
        cell = np.asarray(a.cell.array, dtype=float)
        axes = ", ".join("abc"[k] for k in np.flatnonzero(periodic))
        if not np.isfinite(cell).all():
            raise DataError(f"{where}: frame {i}: the lattice has non-finite entries {cell.tolist()}")
        w = _widths(cell, periodic)
        tiny = [("abc"[k]) for k in np.flatnonzero(periodic) if w[k] < 1e-6]
        if tiny:
            raise DataError(f"{where}: frame {i} is periodic along {axes} (pbc={a.pbc.tolist()}) but has no (or a degenerate) lattice "
                            f"along {', '.join(tiny)} (Lattice={cell.round(6).tolist()}); give the cell or set pbc=\"F F F\"")
        if r_max is None:
            continue
        narrow = [f"{'abc'[k]} {w[k]:.3g} Å" for k in np.flatnonzero(periodic) if w[k] < r_max]
        if narrow and not checks.allow_small_cells:
            raise DataError(f"{where}: frame {i}: the periodic cell is narrower than the model's cutoff {r_max:g} Å "
                            f"({', '.join(narrow)} wide), so atoms overlap their own periodic images; use a larger "
                            "cell, pbc=\"F F F\" for a molecule, or --allow-small-cells for a genuine small bulk cell")
        est = _neighbour_estimate(np.asarray(a.positions, dtype=float), cell, periodic, r_max)
        if est > checks.max_neighbors:
            raise DataError(f"{where}: frame {i}: about {est:.0f} neighbours per atom within the cutoff {r_max:g} Å "
                            f"(bound {checks.max_neighbors}, --max-neighbors): the periodic cell is too small or too dense")


def _neighbour_estimate(positions: np.ndarray, cell: np.ndarray, periodic: np.ndarray, r_max: float) -> float:
    """Neighbours per atom within ``r_max`` where the atoms are densest: density times the volume of a
    cutoff sphere. Partly periodic: the atoms in the densest window one cutoff sphere wide across the
    periodic vectors (a frame perpendicular to them), over the periodic cell's length or area times
    their spread in that window, and the sphere clipped to that spread (a slab thinner than the
    cutoff holds at most a disc of it, a thin wire a segment): a large slab or wire is judged by its
    density, not its atom count, and one far atom does not dilute a dense layer."""
    n, r = len(positions), r_max
    if n == 0:
        return 0.0
    if periodic.all():
        return n / abs(np.linalg.det(cell)) * 4 / 3 * math.pi * r ** 3
    vecs = cell[periodic]
    k = len(vecs)
    measure = math.sqrt(abs(np.linalg.det(vecs @ vecs.T)))
    q, _ = np.linalg.qr(vecs.T, mode="complete")
    across = positions @ q[:, k:]
    inside = _densest(across[:, 0], 2 * r)
    if k == 1:  # a wire: the densest window along the second direction among those atoms
        inside[inside] = _densest(across[inside, 1], 2 * r)
    ext = np.sort(np.ptp(across[inside], axis=0))
    ball = 4 / 3 * math.pi * r ** 3

    def over(num: float, den: float) -> float:
        return num / den if den > 0 else math.inf

    if k == 2:  # a slab of thickness ext[0]
        clipped = min(over(ball, ext[0]), math.pi * r ** 2)
    else:  # a wire of cross-section ext[0] x ext[1]
        clipped = min(over(ball, ext[0] * ext[1]), over(math.pi * r ** 2, ext[1]), 2 * r)
    return int(inside.sum()) / measure * clipped


def _densest(c: np.ndarray, width: float) -> np.ndarray:
    """The atoms (a mask over ``c``) in the window of ``width`` along ``c`` that holds the most."""
    s = np.sort(c)
    ends = np.searchsorted(s, s + width, side="right")
    i = int(np.argmax(ends - np.arange(len(s))))
    return (c >= s[i]) & (c <= s[ends[i] - 1])


def check_graphs(graphs: Sequence, where: str, checks: DataChecks = DataChecks(),
                 frame_numbers: Optional[Sequence[int]] = None) -> None:
    """On built MACE graphs: no two atoms (or images) closer than ``checks.min_distance``, at most
    ``checks.max_neighbors`` neighbours per atom."""
    import torch

    for i, g in _numbered(graphs, frame_numbers):
        snd, rcv = g.edge_index
        if snd.numel() == 0:
            continue
        d = (g.positions[rcv] - g.positions[snd] + g.shifts).norm(dim=-1)
        close = torch.nonzero(d < checks.min_distance).flatten()
        if close.numel():
            k = int(close[torch.argmin(d[close])])
            raise DataError(f"{where}: frame {i}: atoms {int(snd[k])} and {int(rcv[k])} are {float(d[k]):.3g} Å apart "
                            f"(closer than --min-distance {checks.min_distance:g} Å"
                            f"{'; one may be a periodic image' if bool(g.shifts[k].abs().sum() > 0) else ''})")
        counts = torch.bincount(snd, minlength=int(g.positions.shape[0]))
        if int(counts.max()) > checks.max_neighbors:
            atom = int(torch.argmax(counts))
            raise DataError(f"{where}: frame {i}: atom {atom} has {int(counts.max())} neighbours within the cutoff "
                            f"(bound {checks.max_neighbors}, --max-neighbors)")


def checked_graphs(frames: Sequence, atomic_numbers, r_max: float, where: str, energy_key: str = "REF_energy",
                   forces_key: str = "REF_forces", dtype=None, checks: DataChecks = DataChecks(),
                   labels: bool = True, stress_key: Optional[str] = None,
                   frame_numbers: Optional[Sequence[int]] = None) -> list:
    """:func:`models.mace.atoms_to_graphs` with every check of this module before and after it
    (labels from ``info`` / ``arrays`` or ``atoms.calc.results``: :func:`with_labels`;
    ``stress_key``: stress labels too, checked and put in the graphs; ``frame_numbers``: the
    frames' numbers in the selection they came from, for the messages, when they were reordered)."""
    from ..integrations.mace import atoms_to_graphs, check_elements

    check_elements(frames, atomic_numbers, where, frame_numbers)
    if labels:
        check_labels(frames, where, energy_key, forces_key, stress_key, frame_numbers)
        frames = with_labels(frames, energy_key, forces_key, stress_key)  # mace reads info / arrays only
    check_geometry(frames, where, r_max, checks, frame_numbers)
    graphs = atoms_to_graphs(frames, atomic_numbers, r_max, energy_key, forces_key, dtype=dtype, where=where,
                             stress_key=stress_key)
    check_graphs(graphs, where, checks, frame_numbers)
    return graphs
