"""Fetch the revised MD17 data set (rMD17) and write train / valid / test splits as extended XYZ.

rMD17 (A. S. Christensen and O. A. von Lilienfeld, "On the role of gradients for machine learning
of molecular energies and forces", Mach. Learn.: Sci. Technol. 1, 045018 (2020); CC0, figshare
DOI 10.6084/m9.figshare.12672038) recomputes 100,000 MD17 snapshots per molecule with PBE/def2-SVP.
The published archive ``rmd17.tar.bz2`` holds ``rmd17/npz_data/rmd17_<molecule>.npz`` with arrays
``nuclear_charges`` [n_atoms], ``coords`` [n_frames, n_atoms, 3] (Å), ``energies`` [n_frames]
(kcal/mol) and ``forces`` [n_frames, n_atoms, 3] (kcal/mol/Å); other arrays (``old_indices``,
``old_energies``, ``old_forces``) and the ``rmd17/splits`` CSV files are not used.

``fetch_rmd17(out_dir, molecules=None, url=DEFAULT_URL, n_train=100, n_valid=50, n_test=1000,
seed=123, archive=None, overwrite=False)``

- gets the archive: ``archive`` (a local copy, for offline machines) if given, else
  ``out_dir/rmd17.tar.bz2`` if an earlier call left it there, else downloads ``url`` (http(s) or
  ``file://``) to a temporary name in ``out_dir`` and renames it to ``out_dir/rmd17.tar.bz2`` only
  once it is complete and opens as a tar archive, so an interrupted download never leaves a file
  that looks complete. The archive is kept for later calls;
- reads it in one pass, rejecting members with absolute paths or ``..`` components, and extracts
  the needed npz files (with ``filter="data"`` where this Python supports it) into a temporary
  directory under ``out_dir`` that is removed afterwards;
- for each molecule, draws ``numpy.random.default_rng(seed).permutation(n_frames)`` (a fresh
  generator per molecule, so a molecule's split does not depend on which others are requested) and
  takes the first ``n_train`` frames as train, the next ``n_valid`` as valid, the next ``n_test``
  as test;
- writes ``out_dir/<molecule>/{train,valid,test}.xyz``: extended XYZ readable by
  ``ase.io.read(path, ":")``, energy in eV under ``atoms.info["REF_energy"]``, forces in eV/Å under
  ``atoms.arrays["REF_forces"]`` (converted with ``ase.units.kcal / ase.units.mol``), positions in
  Å, no cell, ``pbc=False``, and the frame's index in the archive's npz under
  ``atoms.info["rmd17_index"]``. Numbers are written with full double precision (shortest
  round-trip repr), so reading a file back gives exactly the converted values;
- returns ``{molecule: {"train": n, "valid": n, "test": n, "dir": str}}``.

All inputs are checked before any split file is written. Errors: ``ValueError`` for an unknown
molecule (the message lists the available ones), split sizes a molecule cannot provide, an archive
lacking a molecule's npz, an npz lacking a key or with inconsistent shapes, an unsafe or unreadable
archive; ``FileExistsError`` for an existing split file without ``overwrite=True`` (naming it);
``FileNotFoundError`` for a missing ``archive``; ``PermissionError`` for an output directory that
cannot be written; ``ConnectionError`` for a failed download (naming the URL and suggesting
``--archive`` / ``archive=`` with an offline copy).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from typing import Dict, Iterable, List, Optional, Union

import numpy as np

__all__ = ["fetch_rmd17", "DEFAULT_URL", "DOI", "MOLECULES", "ARCHIVE_NAME", "KCAL_PER_MOL"]

DEFAULT_URL = "https://figshare.com/ndownloader/files/23950376"
DOI = "10.6084/m9.figshare.12672038"
ARCHIVE_NAME = "rmd17.tar.bz2"
MOLECULES = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene",
             "paracetamol", "salicylic", "toluene", "uracil")
SPLITS = ("train", "valid", "test")
REQUIRED_KEYS = ("nuclear_charges", "coords", "energies", "forces")


def _kcal_per_mol() -> float:
    import ase.units

    return ase.units.kcal / ase.units.mol


KCAL_PER_MOL = _kcal_per_mol()  # eV per kcal/mol


def _molecule_list(molecules) -> List[str]:
    if molecules is None:
        return list(MOLECULES)
    if isinstance(molecules, str):
        molecules = molecules.split(",")
    names: List[str] = []
    for m in molecules:
        m = str(m).strip().lower()
        if m and m not in names:
            names.append(m)
    if not names:
        raise ValueError(f"no molecule given; available: {', '.join(MOLECULES)}")
    unknown = [m for m in names if m not in MOLECULES]
    if unknown:
        raise ValueError(f"unknown rMD17 molecule{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(m) for m in unknown)}; available: {', '.join(MOLECULES)}")
    return names


def _prepare_out_dir(out: pathlib.Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create output directory {out}: {e}") from e
    if not out.is_dir():
        raise PermissionError(f"output directory {out} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"output directory {out} is not writable: {e}") from e


def _fmt_size(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _download(url: str, dest: pathlib.Path, timeout: float = 60.0) -> None:
    """``url`` to ``dest`` via a temporary file in the same directory, renamed when complete."""
    hint = (f"if this machine is offline, download {ARCHIVE_NAME} elsewhere (figshare DOI {DOI}, "
            f"{DEFAULT_URL}) and pass the file with --archive FILE (archive= in Python)")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            req = urllib.request.Request(url, headers={"User-Agent": "mmea-kernels (python urllib)"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    total = r.headers.get("Content-Length")
                    total = int(total) if total and total.isdigit() else None
                    done, last = 0, 0.0
                    while True:
                        chunk = r.read(1 << 20)
                        if not chunk:
                            break
                        f.write(chunk)
                        done += len(chunk)
                        now = time.monotonic()
                        if now - last > 0.5:
                            last = now
                            pct = f" ({100 * done / total:.0f}%)" if total else ""
                            tot = f" / {_fmt_size(total)}" if total else ""
                            print(f"\rdownloading {url}: {_fmt_size(done)}{tot}{pct}", end="",
                                  file=sys.stderr, flush=True)
                    print(f"\rdownloading {url}: {_fmt_size(done)} done", file=sys.stderr, flush=True)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise ConnectionError(f"could not download the rMD17 archive from {url}: {reason}; "
                                      f"{hint}") from e
            if total is not None and done != total:
                raise ConnectionError(f"download from {url} incomplete: got {done} of {total} "
                                      f"bytes; try again, or {hint}")
        if not tarfile.is_tarfile(tmp):
            with open(tmp, "rb") as f:
                head = f.read(60)
            raise ConnectionError(f"the file downloaded from {url} ({done} bytes, starting {head!r}) "
                                  f"is not a tar archive; {hint}")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _unsafe_member(name: str) -> bool:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[/\\]+", name)


def _extract_npz(archive: pathlib.Path, molecules: List[str], dest: pathlib.Path) -> Dict[str, pathlib.Path]:
    """Check every member of ``archive`` and extract ``rmd17_<molecule>.npz`` of each molecule."""
    wanted = {f"rmd17_{m}.npz": m for m in molecules}
    found: Dict[str, pathlib.Path] = {}
    npz_seen: List[str] = []
    print(f"reading {archive} ...", file=sys.stderr, flush=True)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"cannot open {archive} as a tar archive: {e} (delete it to download again, "
                         f"or pass a good copy with --archive)") from e
    with tar:
        try:
            for member in tar:
                if _unsafe_member(member.name):
                    raise ValueError(f"refusing archive {archive}: member {member.name!r} has an "
                                     f"absolute path or '..' component")
                base = member.name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
                if base.endswith(".npz"):
                    npz_seen.append(member.name)
                mol = wanted.get(base)
                if mol is None or mol in found:
                    continue
                if not member.isfile():
                    raise ValueError(f"archive {archive}: member {member.name!r} is not a regular file")
                target = dest / member.name
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
                    tar.extract(member, dest, filter="data")
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    with src, open(target, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)
                found[mol] = target
        except getattr(tarfile, "FilterError", ()) as e:
            raise ValueError(f"refusing archive {archive}: {e}") from e
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"cannot read tar archive {archive}: {e} (it may be truncated or "
                             f"corrupt; delete it to download again)") from e
    missing = [m for m in molecules if m not in found]
    if missing:
        seen = ", ".join(npz_seen) if npz_seen else "no .npz files at all"
        raise ValueError(f"archive {archive} has no rmd17/npz_data/rmd17_<molecule>.npz for "
                         f"{', '.join(missing)} (npz files in it: {seen})")
    return found


def _load_molecule(mol: str, npz_path: pathlib.Path, label: str, sizes, seed: int) -> dict:
    import zipfile

    if not zipfile.is_zipfile(npz_path):
        raise ValueError(f"{label} is not an .npz archive (a corrupt or foreign member)")
    with np.load(npz_path, allow_pickle=False) as z:
        for key in REQUIRED_KEYS:
            if key not in z.files:
                raise ValueError(f"{label} has no array {key!r} (arrays: {', '.join(z.files)})")
        arrays = {}
        for key in ("nuclear_charges", "coords", "energies", "forces"):
            try:
                arrays[key] = np.asarray(z[key], dtype=None if key == "nuclear_charges" else np.float64)
            except ValueError as exc:  # an object array (never unpickled), or not numbers
                why = "holds pickled objects, which are never loaded" if "allow_pickle" in str(exc) else str(exc)
                raise ValueError(f"{label}: array {key!r} {why}") from None
        z_nuc, coords, energies, forces = (arrays[k] for k in ("nuclear_charges", "coords", "energies", "forces"))
    z_nuc = z_nuc.reshape(-1)
    n_atoms = z_nuc.shape[0]
    if coords.ndim != 3 or coords.shape[1:] != (n_atoms, 3):
        raise ValueError(f"{label}: 'coords' has shape {coords.shape}, expected "
                         f"[n_frames, {n_atoms}, 3] for {n_atoms} nuclear charges")
    n_frames = coords.shape[0]
    if energies.size != n_frames:
        raise ValueError(f"{label}: 'energies' has shape {energies.shape}, expected [{n_frames}]")
    if forces.shape != coords.shape:
        raise ValueError(f"{label}: 'forces' has shape {forces.shape}, expected {coords.shape}")
    if not np.all(np.equal(np.mod(z_nuc, 1), 0)) or z_nuc.min(initial=1) < 1 or z_nuc.max(initial=1) > 118:
        raise ValueError(f"{label}: 'nuclear_charges' are not atomic numbers: {z_nuc}")
    n_train, n_valid, n_test = sizes
    need = n_train + n_valid + n_test
    if need > n_frames:
        raise ValueError(f"molecule {mol!r} has {n_frames} frames in {label}, fewer than "
                         f"n_train + n_valid + n_test = {n_train} + {n_valid} + {n_test} = {need}")
    perm = np.random.default_rng(seed).permutation(n_frames)
    bounds = np.cumsum([0, n_train, n_valid, n_test])
    energies = energies.reshape(-1)
    out = {"numbers": z_nuc.astype(int)}
    for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:]):
        idx = perm[a:b]
        out[name] = (idx, coords[idx], energies[idx] * KCAL_PER_MOL, forces[idx] * KCAL_PER_MOL)
    return out


def _r(x: float) -> str:
    return repr(float(x))


def _file_mode() -> int:
    """0666 minus the process umask (0644 under the usual umask 022), as ``open()`` creates files."""
    from .files import current_umask

    return 0o666 & ~current_umask()


def _write_xyz(path: pathlib.Path, symbols: List[str], split) -> None:
    idx, pos, energies, forces = split
    lines = []
    for i, p, e, f in zip(idx, pos, energies, forces):
        lines.append(f"{len(symbols)}\n")
        lines.append(f"Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy={_r(e)} "
                     f"rmd17_index={int(i)} pbc=\"F F F\"\n")
        for s, pa, fa in zip(symbols, p, f):
            lines.append(f"{s:<2} " + " ".join(f"{_r(v):>22}" for v in (*pa, *fa)) + "\n")
    from ..train.atomic import atomic_write_text

    atomic_write_text(path, "".join(lines))  # whole or not at all; a symlink is written through


def fetch_rmd17(out_dir: Union[str, os.PathLike], molecules: Optional[Iterable[str]] = None,
                url: str = DEFAULT_URL, n_train: int = 100, n_valid: int = 50, n_test: int = 1000,
                seed: int = 123, archive: Optional[Union[str, os.PathLike]] = None,
                overwrite: bool = False) -> dict:
    """Write ``out_dir/<molecule>/{train,valid,test}.xyz`` from the rMD17 archive (see the module
    docstring). ``molecules``: names (or one comma-separated string), default all ten. ``archive``:
    a local ``rmd17.tar.bz2``, used instead of downloading ``url``. Returns
    ``{molecule: {"train": n, "valid": n, "test": n, "dir": str}}``. When it fails, the directories
    it created (``out_dir`` and its missing parents, the molecule folders) are removed where empty;
    none that existed before."""
    names = _molecule_list(molecules)
    sizes = (int(n_train), int(n_valid), int(n_test))
    if min(sizes) < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_valid={n_valid}, "
                         f"n_test={n_test}")
    out = pathlib.Path(out_dir).expanduser()
    made = _missing_dirs(out) + [out / m for m in names if not os.path.lexists(out / m)]
    try:
        return _fetch_into(out, names, sizes, url, seed, archive, overwrite)
    except BaseException:
        for d in reversed(made):  # the directories this call created, innermost first, where empty
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def _missing_dirs(path: pathlib.Path) -> List[pathlib.Path]:
    """The directories ``path.mkdir(parents=True)`` would create, outermost first."""
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _fetch_into(out: pathlib.Path, names: List[str], sizes, url: str, seed: int, archive, overwrite: bool) -> dict:
    """:func:`fetch_rmd17` once its arguments are read."""
    _prepare_out_dir(out)
    if not overwrite:
        for m in names:
            for s in SPLITS:
                p = out / m / f"{s}.xyz"
                if p.exists():
                    raise FileExistsError(f"{p} already exists; pass overwrite=True (--overwrite) "
                                          f"to replace it")

    if archive is not None:
        archive_path = pathlib.Path(archive).expanduser()
        if not archive_path.is_file():
            raise FileNotFoundError(f"rMD17 archive {archive_path} does not exist")
    else:
        archive_path = out / ARCHIVE_NAME
        if archive_path.is_file():
            print(f"using {archive_path} from an earlier download", file=sys.stderr)
        else:
            _download(url, archive_path)

    from ase.data import chemical_symbols

    data = {}
    with tempfile.TemporaryDirectory(prefix=".rmd17-extract-", dir=out) as tmp:
        npz = _extract_npz(archive_path, names, pathlib.Path(tmp))
        for m in names:
            label = f"rmd17_{m}.npz in {archive_path}"
            data[m] = _load_molecule(m, npz[m], label, sizes, seed)

    result = {}
    for m in names:
        d = out / m
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"cannot create {d}: {e}") from e
        symbols = [chemical_symbols[int(z)] for z in data[m]["numbers"]]
        for s in SPLITS:
            _write_xyz(d / f"{s}.xyz", symbols, data[m][s])
        result[m] = {"train": sizes[0], "valid": sizes[1], "test": sizes[2], "dir": str(d)}
    return result
