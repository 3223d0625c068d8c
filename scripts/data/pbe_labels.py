"""DFT labels at the rMD17 level of theory (PBE/def2-SVP, pyscf) for frames sampled from a
GFN2-xTB MD of one molecule: the project's own small fine-tuning set, shipped in
mmea_kernels/assets/ethanol_pbe/ so the README's main command runs without ../shared.

    OMP_NUM_THREADS=1 python scripts/data/pbe_labels.py --molecule ethanol --smiles CCO \
        --frames 150 --out mmea_kernels/assets/ethanol_pbe

Frames are labelled one by one and appended to ``<out>/all.xyz`` (an interrupted run resumes
where it stopped); at the end the set is split into train/valid/test in MD order-independent
random order (seeded). ``--check-rmd17 DIR`` instead labels the first frames of an rMD17 file and
prints the differences to its reference labels (a check that this script reproduces the level
of theory). Needs `pyscf`, `tblite`, `rdkit`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

HARTREE_EV = 27.211386245988
BOHR_A = 0.529177210903


def pbe_def2svp(atoms, conv_tol: float = 1e-10):
    """(energy eV, forces eV/Å) from a restricted Kohn-Sham PBE/def2-SVP calculation."""
    from pyscf import dft, gto

    mol = gto.M(atom=[(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
                basis="def2-svp", unit="Angstrom", verbose=0)
    mf = dft.RKS(mol)
    mf.xc = "pbe"
    mf.conv_tol = conv_tol
    e = mf.kernel()
    if not mf.converged:
        raise RuntimeError("SCF did not converge")
    g = mf.nuc_grad_method().kernel()
    return float(e) * HARTREE_EV, -np.asarray(g) * HARTREE_EV / BOHR_A


def main(argv=None) -> int:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from xtb_md import embed, md_frames
    import ase.io

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", default="ethanol")
    p.add_argument("--smiles", default="CCO")
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--split", default="50,25,75", help="train,valid,test sizes")
    p.add_argument("--every", type=int, default=40, help="MD steps (0.5 fs) between frames")
    p.add_argument("--temperature", type=float, default=500.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default="mmea_kernels/assets/ethanol_pbe")
    p.add_argument("--check-rmd17", default=None, help="rMD17 xyz file: label its first 5 frames and compare")
    args = p.parse_args(argv)

    if args.check_rmd17:
        for a in ase.io.read(args.check_rmd17, ":5"):
            e, f = pbe_def2svp(a)
            ref_f = a.arrays["REF_forces"]
            print(f"E - E_rMD17 = {1000 * (e - a.info['REF_energy']):8.2f} meV   "
                  f"force MAE vs rMD17 = {1000 * np.abs(f - ref_f).mean():.2f} meV/A  "
                  f"max = {1000 * np.abs(f - ref_f).max():.2f} meV/A", flush=True)
        return 0

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    geoms = md_frames(embed(args.smiles, args.seed), args.frames, args.every, 400, args.temperature, args.seed)
    done_path = out / "all.xyz"
    done = ase.io.read(str(done_path), ":") if done_path.is_file() else []
    for i in range(len(done), len(geoms)):
        t = time.perf_counter()
        a = geoms[i].copy()
        a.info.clear()
        a.arrays.pop("REF_forces", None)
        a.info["xtb_energy"] = geoms[i].info["REF_energy"]
        a.info["REF_energy"], f = pbe_def2svp(a)
        a.arrays["REF_forces"] = f
        ase.io.write(str(done_path), a, format="extxyz", append=True)
        print(f"frame {i + 1}/{len(geoms)}  E = {a.info['REF_energy']:.4f} eV  {time.perf_counter() - t:.1f} s",
              flush=True)
    frames = ase.io.read(str(done_path), ":")
    n_tr, n_va, n_te = (int(s) for s in args.split.split(","))
    if n_tr + n_va + n_te > len(frames):
        raise ValueError(f"split {args.split} needs {n_tr + n_va + n_te} frames, have {len(frames)}")
    perm = np.random.default_rng(args.seed).permutation(len(frames))
    parts = {"train": perm[:n_tr], "valid": perm[n_tr:n_tr + n_va], "test": perm[n_tr + n_va:n_tr + n_va + n_te]}
    for name, idx in parts.items():
        ase.io.write(str(out / f"{name}.xyz"), [frames[j] for j in idx], format="extxyz")
    done_path.unlink()
    print(f"wrote {', '.join(f'{k} {len(v)}' for k, v in parts.items())} frames to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
