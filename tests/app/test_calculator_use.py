"""The ASE calculator as other ASE tools use it (a review plugged it into vibrations, NEB,
multiprocessing): non-finite positions stop it on every call (it returned the isolated atoms' energy
and zero forces once the lattice had been checked), it pickles (multiprocessing, ASE's ``name``),
loading a model leaves torch's random state alone, and bad input names itself."""
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from mmea_kernels.app.calculator import MMEACalculator  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import build_mace  # noqa: E402
from mmea_kernels.train.checks import DataError  # noqa: E402
from mmea_kernels.train.foundation import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _calc():
    torch.manual_seed(0)
    return MMEACalculator(module=build_mace("tiny").double())


def test_non_finite_positions_stop_every_call():
    a = toy_molecules("ethanol", 1, seed=3)[0]
    a.calc = _calc()
    a.get_potential_energy()  # the lattice (none) is checked once, here
    for bad in (np.nan, np.inf):
        b = a.copy()
        b.calc = a.calc
        b.positions[0, 0] = bad
        with pytest.raises(DataError, match="MMEACalculator: frame 0: non-finite positions on atoms 0"):
            b.get_potential_energy()


def test_the_calculator_pickles_and_gives_the_same_numbers():
    a = toy_molecules("ethanol", 1, seed=3)[0]
    a.calc = _calc()
    e, f = a.get_potential_energy(), a.get_forces()
    assert type(a.calc).__name__ == "MMEACalculator" and a.calc.name == "mmeacalculator"
    b = pickle.loads(pickle.dumps(a))  # "Can't pickle local object '_make_calculator.<locals>._Calc'" before
    b.calc.reset()
    assert b.get_potential_energy() == e and np.array_equal(b.get_forces(), f)


def test_bad_structures_and_settings_are_named(tmp_path):
    from ase import Atoms

    calc = _calc()
    with pytest.raises(ValueError, match="MMEACalculator: the structure has no atoms"):
        calc.get_potential_energy(Atoms())
    with pytest.raises(ValueError, match=r"MMEACalculator: frame 0: atom 0 is S \(Z=16\)"):
        calc.get_potential_energy(Atoms("SH2", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match=r"dtype \(--dtype\) must be one of float32, float64, got torch.float32"):
        MMEACalculator(checkpoint=str(tmp_path / "none.pt"), dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype, device= are for checkpoint=; module= runs as it is"):
        MMEACalculator(module=calc.net, dtype="float32", device="auto")  # were ignored


def test_loading_a_model_file_leaves_the_random_state_alone():
    state = torch.get_rng_state()
    load_model("builtin:mace-xtb-small")  # built with random weights, then loaded
    assert torch.equal(torch.get_rng_state(), state)


def test_per_atom_energies_are_mace_calculators_and_local(calc, tmp_path):
    """``energies`` / ``node_energy`` (ASE's ``get_potential_energies``; a user asked for them to
    analyse where a fine-tuned model changes the energy): equal to mace-torch's own calculator on
    the base model (float64); with MMEA adapters they sum to the energy, ``node_energy`` is each less
    its element's E0, and two molecules farther apart than the cutoff get the per-atom energies each
    has alone (the adapters' gates are per atom)."""
    from ase import Atoms
    from mace.calculators import MACECalculator

    a = toy_molecules("ethanol", 1, seed=3)[0]
    base = load_model("builtin:mace-xtb-small").double()
    torch.save(base, str(tmp_path / "base.model"))
    ours, ref = a.copy(), a.copy()
    ours.calc = MMEACalculator(module=base)
    ref.calc = MACECalculator(model_paths=str(tmp_path / "base.model"), device="cpu", default_dtype="float64")
    np.testing.assert_allclose(ours.get_potential_energies(), ref.get_potential_energies(), rtol=0, atol=1e-10)
    ref.get_potential_energy()
    np.testing.assert_allclose(ours.calc.results["node_energy"], ref.calc.results["node_energy"], rtol=0, atol=1e-10)

    b = toy_molecules("toluene", 1, seed=4)[0]
    b.positions += np.array([30.0, 0.0, 0.0])
    both = Atoms(a) + Atoms(b)
    parts = []
    for m in (a, b, both):
        m = m.copy()
        m.calc = calc
        parts.append((m.get_potential_energies(), m.get_potential_energy(), m.calc.results["node_energy"], m))
    (ea, _, _, _), (eb, _, _, _), (eab, e, node, m) = parts
    np.testing.assert_allclose(eab, np.concatenate([ea, eb]), rtol=0, atol=1e-10)
    assert abs(eab.sum() - e) < 1e-9
    from mmea_kernels.integrations.heads import head_e0s

    table = dict(zip(calc.z, head_e0s(calc.net).tolist()))
    np.testing.assert_allclose(eab - node, [table[int(z)] for z in m.numbers], rtol=0, atol=1e-12)
    assert np.abs(node).max() > 1e-3  # not all E0
