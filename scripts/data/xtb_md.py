"""Real labelled data for the project's own pretrained model: GFN2-xTB (tblite) Langevin MD of
small organic molecules (H, C, N, O), sampled frames written as extended XYZ (eV, eV/Å under
REF_energy / REF_forces).

    OMP_NUM_THREADS=1 python scripts/data/xtb_md.py --out /tmp/mmea_xtb/pretrain.xyz

Geometries come from SMILES (RDKit ETKDG, seeded). The six rMD17 molecules (aspirin, benzene,
ethanol, malonaldehyde, naphthalene, toluene) are deliberately NOT in the default list, so that
adapting to them is a transfer to new molecules and a new level of theory. Needs `tblite`, `rdkit`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

# name -> SMILES; H, C, N, O only; no rMD17 molecule.
PRETRAIN_MOLECULES = {
    "methanol": "CO", "acetic_acid": "CC(=O)O", "acetone": "CC(C)=O", "acetaldehyde": "CC=O",
    "dimethyl_ether": "COC", "propanol": "CCCO", "ethylene_glycol": "OCCO", "glycine": "NCC(=O)O",
    "alanine": "CC(N)C(=O)O", "urea": "NC(N)=O", "acetamide": "CC(N)=O", "methyl_acetate": "CC(=O)OC",
    "acrylic_acid": "C=CC(=O)O", "glycerol": "OCC(O)CO", "cyclohexanol": "OC1CCCCC1",
    "phenol": "Oc1ccccc1", "aniline": "Nc1ccccc1", "anisole": "COc1ccccc1", "benzaldehyde": "O=Cc1ccccc1",
    "benzoic_acid": "OC(=O)c1ccccc1", "pyridine": "c1ccncc1", "pyrrole": "c1cc[nH]c1", "furan": "c1ccoc1",
    "styrene": "C=Cc1ccccc1", "o_xylene": "Cc1ccccc1C", "catechol": "Oc1ccccc1O",
    "salicylaldehyde": "O=Cc1ccccc1O", "methyl_benzoate": "COC(=O)c1ccccc1", "indole": "c1ccc2[nH]ccc2c1",
    "acetylacetone": "CC(=O)CC(C)=O", "maleic_acid": "OC(=O)/C=C\\C(=O)O", "butanone": "CCC(C)=O",
}


def embed(smiles: str, seed: int):
    import ase
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles}")
    AllChem.MMFFOptimizeMolecule(mol)
    pos = mol.GetConformer().GetPositions()
    return ase.Atoms([a.GetSymbol() for a in mol.GetAtoms()], positions=pos)


def md_frames(atoms, n_frames: int, every: int, warmup: int, temperature: float, seed: int):
    """Langevin MD with GFN2-xTB (0.5 fs steps); every ``every``-th step after ``warmup`` kept."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from tblite.ase import TBLite

    atoms = atoms.copy()
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng)
    dyn.run(warmup)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        f = atoms.copy()
        f.calc = None
        f.info["REF_energy"] = float(atoms.get_potential_energy())
        f.arrays["REF_forces"] = atoms.get_forces().copy()
        frames.append(f)
    return frames


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output extended-XYZ file")
    p.add_argument("--molecules", default=",".join(PRETRAIN_MOLECULES),
                   help="comma-separated names from the built-in list, or name=SMILES pairs")
    p.add_argument("--frames", type=int, default=80, help="frames per molecule")
    p.add_argument("--every", type=int, default=20, help="MD steps (0.5 fs) between kept frames")
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--temperature", type=float, default=500.0, help="K (rMD17 used 500 K)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import ase.io

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    for k, item in enumerate(args.molecules.split(",")):
        name, _, smi = item.partition("=")
        smi = smi or PRETRAIN_MOLECULES[name]
        t = time.perf_counter()
        fr = md_frames(embed(smi, args.seed + k), args.frames, args.every, args.warmup, args.temperature,
                       args.seed + 1000 + k)
        for f in fr:
            f.info["molecule"] = name
        frames += fr
        print(f"{name:>18} {len(fr[0]):3d} atoms  {len(fr)} frames  {time.perf_counter() - t:5.1f} s", flush=True)
    ase.io.write(str(out), frames, format="extxyz")
    print(f"wrote {len(frames)} frames to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
