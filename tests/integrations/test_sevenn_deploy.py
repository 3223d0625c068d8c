"""A fine-tuned SevenNet as the file of SevenNet's LAMMPS pair style (``pair_style e3gnn``), run as
``pair_e3gnn.cpp`` runs it (:func:`run_like_pair_e3gnn`): the unadapted model gives what
``sevenn``'s own deploy of the SevenNet-0 checkpoint gives; adapted models with re-fitted
reference energies give the eager model's energy, forces and virial (float32); the checkpoint-level
``export`` writes a verified file and refuses what the pair style cannot run."""
import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")
pytest.importorskip("mace")

from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch  # noqa: E402
from mmea_kernels.integrations.sevenn import _checkpoint_path, load_sevennet  # noqa: E402
from mmea_kernels.integrations.sevenn_deploy import (  # noqa: E402
    _local_and_ghost_graph, run_like_pair_e3gnn, run_like_pair_e3gnn_parallel, sevennet_lammps_model,
    sevennet_lammps_parallel_models)

from helpers import adapted_copy, perturb_trainable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _atoms():
    import ase.build

    crystal = ase.build.bulk("NaCl", "rocksalt", a=5.64) * (1, 1, 2)
    crystal.rattle(0.05, seed=3)
    return [toy_molecules("ethanol", 1, seed=5)[0], crystal]


@pytest.fixture(scope="module")
def base():
    return load_sevennet("7net-0")  # float32, FusedGate (the fine-tuning default)


@pytest.fixture(scope="module")
def base_file(base):
    """``(module, metadata)``: the base model's pair_style e3gnn file, made once for the tests that
    read it (~2 s a build)."""
    return sevennet_lammps_model(base)


@pytest.fixture(scope="module")
def sevenns_own_file(tmp_path_factory):
    """sevenn's own deploy of the SevenNet-0 checkpoint (its pair_style e3gnn file), made once for the
    two tests that compare against it (~3 s a deploy)."""
    from sevenn.scripts.deploy import deploy

    path = tmp_path_factory.mktemp("sevenn-deploy") / "ref.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deploy(_checkpoint_path("7net-0"), str(path))
    return path


def _close(a, b, rel):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max())), (a, b)


def test_unadapted_file_gives_what_sevenns_own_deploy_gives(base_file, sevenns_own_file):
    meta_ref = {"chemical_symbols_to_index": "", "cutoff": ""}
    ref = torch.jit.load(str(sevenns_own_file), _extra_files=meta_ref)
    meta_ref = {k: v.decode() for k, v in meta_ref.items()}
    module, meta = base_file
    assert meta["chemical_symbols_to_index"].split() == meta_ref["chemical_symbols_to_index"].split()
    assert float(meta["cutoff"]) == float(meta_ref["cutoff"])
    for atoms in _atoms():
        got = run_like_pair_e3gnn(module, atoms, meta, virial=True)
        want = run_like_pair_e3gnn(ref, atoms, meta_ref, virial=True)
        for g, w in zip(got, want):
            _close(g, w, 2e-6)


def _load_with_meta(path, keys):
    meta = {k: "" for k in keys}
    module = torch.jit.load(str(path), _extra_files=meta)
    return module, {k: v.decode() for k, v in meta.items()}


def test_unadapted_parallel_files_give_what_sevenns_own_deploy_parallel_gives(base, sevenns_own_file, tmp_path):
    """Against sevenn's deploy_parallel of the checkpoint, both run as pair_e3gnn_parallel.cpp runs
    them; and sevenn's parallel files give what its serial file gives (the emulation of the
    parallel pair checked on sevenn's own files). NaCl's cell is small: atoms see periodic images
    (ghost atoms), ethanol has none."""
    from sevenn.scripts.deploy import deploy_parallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deploy_parallel(_checkpoint_path("7net-0"), str(tmp_path / "par"))
    keys = ("chemical_symbols_to_index", "cutoff", "comm_size", "num_species")
    modules, meta = sevennet_lammps_parallel_models(base)
    assert len(modules) == 5  # SevenNet-0: five message-passing layers
    refs, meta_ref = zip(*[_load_with_meta(tmp_path / "par" / f"deployed_parallel_{i}.pt", keys) for i in range(5)])
    assert not (tmp_path / "par" / "deployed_parallel_5.pt").exists()
    assert meta["chemical_symbols_to_index"].split() == meta_ref[0]["chemical_symbols_to_index"].split()
    assert (meta["comm_size"], meta["num_species"]) == (meta_ref[0]["comm_size"], meta_ref[0]["num_species"])
    assert float(meta["cutoff"]) == float(meta_ref[0]["cutoff"])
    serial, meta_serial = _load_with_meta(sevenns_own_file, keys[:2])
    crystal = _atoms()[1]
    assert len(_local_and_ghost_graph(crystal, float(meta["cutoff"]))[3]) > len(crystal)  # ghosts
    for atoms in _atoms():
        pbc = bool(atoms.pbc.all())
        got = run_like_pair_e3gnn_parallel(modules, atoms, meta, virial=pbc)
        want = run_like_pair_e3gnn_parallel(list(refs), atoms, meta_ref[0], virial=pbc)
        one = run_like_pair_e3gnn(serial, atoms, meta_serial, virial=pbc)
        for g, w, s in zip(got[:2 + pbc], want, one):
            _close(g, w, 2e-6)
            _close(w, s, 5e-6)


def _adapted(base, method, seed):
    """Random adapters and random per-element reference energies (a few eV)."""
    m = adapted_copy(base, method, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        e0 = m.atomic_energies_fn.atomic_energies
        e0.copy_(3.0 * torch.randn(e0.shape, generator=g, dtype=e0.dtype))
    return m


def _paper(base, seed):
    """mmea-paper's SevenNet recipe (MMEA on every linear, low-rank radial MLPs, dense Bessel
    weights), moved from its initialisation, with its parametrizations folded as export folds them."""
    from mmea_kernels.app.deploy import _fold_parametrizations
    from mmea_kernels.train.methods import apply_method

    m = copy.deepcopy(base)
    apply_method(m, "mmea-paper")
    perturb_trainable(m, seed)
    assert _fold_parametrizations(m) > 0
    return m


def _pair(m, form):
    """``run(atoms, virial)`` of ``m``'s files for pair_style e3gnn (``serial``) or e3gnn/parallel."""
    if form == "serial":
        module, meta = sevennet_lammps_model(m)
        return lambda atoms, virial: run_like_pair_e3gnn(module, atoms, meta, virial=virial)
    modules, meta = sevennet_lammps_parallel_models(m)
    return lambda atoms, virial: run_like_pair_e3gnn_parallel(modules, atoms, meta, virial=virial)


@pytest.mark.parametrize("form", ["serial", "parallel"])
@pytest.mark.parametrize("method", ["mmea", "elora", "mmea-paper"])
def test_adapted_files_give_the_eager_energy_forces_and_virial(base, method, form):
    """Random adapters and reference energies: a file without the adapters, without the energies, or
    with the virial's sign flipped fails this; the parallel files carry the adapters in every
    segment and in the ghost atoms' copies of the first layers (NaCl's ghosts go through them), and
    fail this with plain ghost copies."""
    m = _paper(base, seed=1) if method == "mmea-paper" else _adapted(base, method, seed=1)
    run = _pair(m, form)
    assert any(n.endswith("mmea_up.weight") or n.endswith("elora_B.0") for n, _ in m.named_parameters())
    for atoms in _atoms():
        batch = atoms_to_batch([atoms], m.atomic_numbers.tolist(), float(m.r_max), dtype=torch.float32)
        pbc = bool(atoms.pbc.all())
        out = m(dict(batch), training=False, compute_force=True, compute_stress=pbc)
        e, f, w = run(atoms, pbc)
        _close(e, out["energy"].sum(), 2e-6)
        _close(f, out["forces"], 5e-6)
        if pbc:
            _close(w, -out["stress"][0] * atoms.get_volume(), 5e-6)
    # the model it was made from is untouched (still batched, still maps atomic numbers)
    assert m.sevennet.is_batch_data and m.sevennet.eval_type_map


def test_atomic_energies_add_up_and_include_the_reference_energies(base):
    m = _adapted(base, "mmea", seed=2)
    module, meta = sevennet_lammps_model(m)
    atoms = _atoms()[0]
    symbols = meta["chemical_symbols_to_index"].split()
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijD", atoms, float(meta["cutoff"]))
    n = torch.tensor([len(atoms)])
    data = {"x": torch.tensor([symbols.index(s) for s in atoms.get_chemical_symbols()]),
            "edge_index": torch.tensor(np.stack([i, j])), "edge_vec": torch.tensor(d, dtype=torch.float32),
            "num_atoms": n, "nlocal": n}
    out = module(dict(data))
    atomic = out["atomic_energy"].reshape(-1).double()
    _close(atomic.sum(), out["inferred_total_energy"].double(), 1e-6)
    zs = m.atomic_numbers.tolist()
    e0 = torch.tensor([float(m.atomic_energies_fn.atomic_energies[zs.index(z)]) for z in atoms.numbers])
    m0 = copy.deepcopy(m)
    m0.atomic_energies_fn.atomic_energies.zero_()
    module0, _ = sevennet_lammps_model(m0)
    out0 = module0(dict(data))
    _close(atomic - out0["atomic_energy"].reshape(-1).double(), e0, 1e-6)


def test_a_file_refuses_elements_it_does_not_know(base_file):
    import ase

    module, meta = base_file
    with pytest.raises(ValueError, match=r"not \['Og'\]"):
        run_like_pair_e3gnn(module, ase.Atoms("OgH", positions=[[0, 0, 0], [0, 0, 1.0]]), meta)


def test_export_refuses_what_does_not_script_by_name_before_running_it(base, tmp_path, monkeypatch):
    """mmea-tp's tensor-product gates have no TorchScript form: refused with the MACE path's message
    (it escaped as an internal error), before the reference runs, writing nothing."""
    from mmea_kernels.app import deploy
    from mmea_kernels.train.methods import apply_method

    m = copy.deepcopy(base)
    apply_method(m, "mmea-tp")
    from mmea_kernels.train import selfcheck

    def no_reference_run(*a, **k):
        raise AssertionError("the reference ran before the model was found unscriptable")

    monkeypatch.setattr(selfcheck, "probe_batch", no_reference_run)
    with pytest.raises(ValueError, match=r"does not script for --format lammps \(NotImplementedError: "
                                         r"MMEATensorProduct \(the mmea-tp method\) has no TorchScript form\)"):
        deploy._export_sevennet(m, {"model": "sevenn:7net-0", "method": "mmea-tp"}, tmp_path / "m.pt", "lammps", None)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["lammps", "lammps-parallel"])
def test_export_accepts_a_reference_crystal_whose_forces_vanish(base, fmt, tmp_path):
    """Float32 files round to a few 1e-6 eV/Å whatever the forces: a reference frame whose forces
    vanish by symmetry (perfect diamond Si) must not make the check refuse a correct file (with the
    force scale floored at 1e-3 it did: relative 3e-3; found by a review)."""
    import ase.build

    from mmea_kernels.app import deploy

    si = ase.build.bulk("Si", "diamond", a=5.43)
    probe = {"numbers": torch.tensor(si.numbers), "positions": torch.tensor(si.positions),
             "cell": torch.tensor(np.asarray(si.cell)), "pbc": torch.ones(3, dtype=torch.bool)}
    m = _adapted(base, "mmea", seed=4)
    res = deploy._export_sevennet(m, {"model": "sevenn:7net-0", "method": "mmea", "probe": probe}, tmp_path / "out",
                                  fmt, None)
    assert 0 < res["verified_max_rel_diff"] <= 2e-5 and (tmp_path / "out").exists()


def test_the_ghost_copies_carry_the_adapters(base, monkeypatch):
    """Parallel files whose ghost copies of the first layers lack the adapters (plain copies of the
    base layers) give other forces on a frame with ghosts: the emulation and the export's check see
    them."""
    from mmea_kernels import adapted_modules
    from mmea_kernels.integrations import sevenn_deploy

    m = _adapted(base, "mmea", seed=5)
    crystal = _atoms()[1]
    batch = atoms_to_batch([crystal], m.atomic_numbers.tolist(), float(m.r_max), dtype=torch.float32)
    want = m(dict(batch), training=False, compute_force=True)["forces"]
    real = sevenn_deploy._ghost_copy

    def plain(layer):
        ghost = real(layer)
        for name, mod in list(adapted_modules(ghost).items()):
            parent = ghost.get_submodule(name.rsplit(".", 1)[0]) if "." in name else ghost
            setattr(parent, name.rsplit(".", 1)[-1], mod.base)
        return ghost

    monkeypatch.setattr(sevenn_deploy, "_ghost_copy", plain)
    modules, meta = sevennet_lammps_parallel_models(m)
    _, f, _ = run_like_pair_e3gnn_parallel(modules, crystal, meta)
    assert float((f - want).abs().max()) > 1e-3


def test_a_network_that_cannot_be_cut_is_refused_by_name(base):
    from mmea_kernels.integrations.sevenn_deploy import _deploy_net, _segments

    net, _ = _deploy_net(base)
    del net._modules["0_self_interaction_1"]
    with pytest.raises(ValueError, match=r"cannot be cut as sevenn's parallel model: it lacks \['0_self_interaction_1'\]"):
        _segments(net)


@pytest.mark.parametrize("method", ["elora", "full"])
def test_sevenn_checkpoint_export_runs_in_sevenns_own_calculator(base, method, tmp_path):
    """--format sevenn-checkpoint: ELoRA (merged) and full fine-tuning (every weight perturbed) with
    random E0s as a checkpoint of sevenn's own format. SevenNetCalculator given the file's path
    (sevenn's own loading: strict, version-aware) gives the eager model's energies, forces and stress
    on frames the export did not check; MMEA is refused by name with nothing written."""
    from ase.build import bulk
    from sevenn.calculator import SevenNetCalculator

    from mmea_kernels.app import deploy
    from mmea_kernels.app.calculator import MMEACalculator

    if method == "full":
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1e-2 * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
            m.atomic_energies_fn.atomic_energies.copy_(3.0 * torch.randn(m.atomic_energies_fn.atomic_energies.shape,
                                                                         generator=g, dtype=torch.float32))
    else:
        m = _adapted(base, method, seed=6)
    out = tmp_path / "7net-ft.pth"
    eth = toy_molecules("ethanol", 1, seed=3)[0]  # the reference frame a checkpoint holds (a training frame)
    probe = {"numbers": torch.tensor(eth.numbers), "positions": torch.tensor(eth.positions),
             "cell": torch.zeros(3, 3, dtype=torch.float64), "pbc": torch.zeros(3, dtype=torch.bool)}
    res = deploy._export_sevennet(copy.deepcopy(m), {"model": "sevenn:7net-0", "method": method, "probe": probe}, out,
                                  "sevenn-checkpoint", None)
    assert res["verified_max_rel_diff"] <= 2e-5 and res["merged_adapters"] == (0 if method == "full" else 18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SevenNetCalculator(str(out), device="cpu")
    crystal = bulk("Si", "diamond", a=5.43) * (1, 1, 2)
    crystal.rattle(0.05, seed=9)
    for atoms in (toy_molecules("toluene", 1, seed=7)[0], crystal):
        ours, other = atoms.copy(), atoms.copy()
        ours.calc, other.calc = MMEACalculator(module=m), theirs
        e = ours.get_potential_energy()
        assert abs(e - float(_eager_energy(base, atoms))) > 0.05  # the fine-tuning changed the model
        assert abs(other.get_potential_energy() - e) <= 2e-6 * abs(e) + 1e-4
        np.testing.assert_allclose(other.get_forces(), ours.get_forces(), rtol=0, atol=1e-4)
        if atoms.pbc.all():
            np.testing.assert_allclose(other.get_stress(), ours.get_stress(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"sevenn-checkpoint writes a plain SevenNet .*method mmea keeps MMEA gates"):
        deploy._export_sevennet(_adapted(base, "mmea", seed=6), {"model": "sevenn:7net-0", "method": "mmea"},
                                tmp_path / "mmea.pth", "sevenn-checkpoint", None)
    assert not (tmp_path / "mmea.pth").exists()


def _eager_energy(model, atoms):
    batch = atoms_to_batch([atoms], model.atomic_numbers.tolist(), float(model.r_max), dtype=torch.float32)
    return model(dict(batch), compute_force=False)["energy"][0]


def test_format_and_model_mismatches_are_refused_by_name(base, tmp_path):
    """mace-model is for MACE checkpoints, sevenn-checkpoint for SevenNet ones; a SevenNet whose
    energy shift is one number for all species cannot take per-element E0s (to_sevennet says so)."""
    from sevenn.nn.scale import Rescale

    from mmea_kernels.app import deploy
    from mmea_kernels.integrations.sevenn import to_sevennet

    with pytest.raises(ValueError, match=r"exports as --format lammps .*or sevenn-checkpoint .*--format mace-model is "
                                         r"for MACE models"):
        deploy._export_sevennet(copy.deepcopy(base), {"model": "sevenn:7net-0", "method": "full"}, tmp_path / "m",
                                "mace-model", None)
    with pytest.raises(ValueError, match=r"sevenn runs float32 .*--dtype float64 cannot be exported for --format "
                                         r"sevenn-checkpoint"):
        deploy._export_sevennet(copy.deepcopy(base), {"model": "sevenn:7net-0", "method": "full"}, tmp_path / "m",
                                "sevenn-checkpoint", "float64")
    m = _adapted(base, "elora", seed=2)  # random, unequal E0s
    m.sevennet._modules["rescale_atomic_energy"] = Rescale(shift=0.0, scale=1.0)
    with pytest.raises(ValueError, match=r"energy shift is one number for every species .*cannot be folded"):
        to_sevennet(m)
    assert not list(tmp_path.iterdir())
