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


# ------------------------------------------------- long runs and screening (a review, 2026-12-01)
def test_every_new_lattice_is_checked_against_the_cutoff():
    """The calculator checked a lattice only for a direction without a lattice vector: one H in a
    0.05 Å periodic cube took 5 GiB and ran out of memory, 0.001 Å hung, 1 Å gave 5e12 eV; an NPT
    cell could shrink there unseen. Now the neighbour bound (500 by default) refuses them by name;
    a primitive bulk cell narrower than the cutoff is accepted unless ``checks`` says otherwise."""
    from ase import Atoms

    from mmea_kernels.train.checks import DataChecks

    calc = _calc()
    for side in (1.0, 0.05, 0.001):
        h = Atoms("H", cell=np.eye(3) * side, pbc=True)
        with pytest.raises(DataError, match=r"MMEACalculator: frame 0: about .* neighbours per atom within the "
                                            r"cutoff .*bound 500"):
            calc.get_potential_energy(h)
    bulk = Atoms("CC", positions=[[0, 0, 0], [0.9, 0.9, 0.9]], cell=np.eye(3) * 3.6, pbc=True)  # 3.6 Å < cutoff
    assert np.isfinite(calc.get_potential_energy(bulk))
    strict = MMEACalculator(module=calc.net, checks=DataChecks())
    with pytest.raises(DataError, match="narrower than the model's cutoff"):
        strict.get_potential_energy(bulk)
    with pytest.raises(TypeError, match="checks= must be a DataChecks"):
        MMEACalculator(module=calc.net, checks={"max_neighbors": 5})


def test_a_molecule_far_from_the_origin_keeps_float32_precision():
    """Positions went into the model as float32 absolute coordinates: edge vectors of a molecule
    1e4 Å away lost 1.6e-2 eV/Å of force (0.24 at 1e5 Å). A molecule is now centred first (energies
    and forces do not depend on where it is)."""
    torch.manual_seed(0)
    net = build_mace("tiny")
    a = toy_molecules("ethanol", 1, seed=3)[0]
    ref = MMEACalculator(module=net.double())
    ref_f = ref.get_forces(a.copy())
    calc = MMEACalculator(module=net.float())
    for offset in (0.0, 1e4, 1e5):
        b = a.copy()
        b.positions += offset
        assert np.abs(calc.get_forces(b) - ref_f).max() < 1e-4 * max(1.0, np.abs(ref_f).max()), offset


def test_graphs_built_in_two_threads_keep_their_dtypes_and_the_default():
    """``atoms_to_graphs`` set torch's process-wide default dtype around mace's graph building: two
    calculators in two threads (float64 models) raced, one thread's restore turning the other's graph
    to float32 ('w_down has dtype Double but x0 has Float'), and the default could stay float64. Made
    deterministic here by slowing mace's builder down so that the threads' builds overlap."""
    import threading
    import time

    from mace import data

    from mmea_kernels.integrations.mace import atoms_to_graphs

    real = data.AtomicData.from_config

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return real(*args, **kwargs)

    frames = toy_molecules("ethanol", 6, seed=3)
    got, before = {}, torch.get_default_dtype()

    def build(dtype):
        got[dtype] = atoms_to_graphs(frames, [1, 6, 8], 5.0, "__none__", "__none__", dtype=dtype)

    data.AtomicData.from_config = slow
    try:
        threads = [threading.Thread(target=build, args=(dt,)) for dt in (torch.float64, torch.float32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        data.AtomicData.from_config = real
    for dtype, graphs in got.items():
        assert all(g.positions.dtype == dtype and g.shifts.dtype == dtype for g in graphs), dtype
    assert torch.get_default_dtype() == before


def test_a_molecule_s_neighbour_list_is_mace_s():
    """A molecule's edges come from a k-d tree (mace's vacuum box of 5 cutoffs per Å of extent made
    its neighbour list take seconds for a molecule flying apart): the same edge set as mace's
    ``get_neighborhood``, zero shifts, mace's cell, strict cutoff; and the same energy and forces."""
    from mace.data.neighborhood import get_neighborhood

    from mmea_kernels.integrations.mace import molecule_neighbourhood

    rng = np.random.default_rng(1)
    for n, spread in ((1, 1.0), (2, 1.0), (40, 3.0), (400, 8.0), (30, 60.0)):
        p = rng.normal(0, spread, (n, 3))
        p -= p.mean(axis=0)
        ref = get_neighborhood(p, 5.0, (False,) * 3, np.zeros((3, 3)))
        got = molecule_neighbourhood(p, 5.0)
        assert set(map(tuple, got[0].T)) == set(map(tuple, ref[0].T)) and got[0].shape == ref[0].shape, n
        assert np.array_equal(got[3], ref[3]) and not got[1].any() and not got[2].any()
    pair = np.array([[-2.5, 0, 0], [2.5, 0, 0]])
    assert molecule_neighbourhood(pair, 5.0)[0].shape == (2, 0)  # at the cutoff: no edge, as matscipy
    a = toy_molecules("toluene", 1, seed=2)[0]
    calc = _calc()
    e, f = calc.get_potential_energy(a), calc.get_forces(a)
    from mmea_kernels.integrations.mace import atoms_to_batch

    b = atoms_to_batch([a], calc.z, calc.r_max, energy_key="__none__", forces_key="__none__", dtype=torch.float64)
    out = calc.net(b, training=False, compute_force=True)
    assert abs(float(out["energy"][0]) - e) < 1e-10 and np.abs(out["forces"].detach().numpy() - f).max() < 1e-10
