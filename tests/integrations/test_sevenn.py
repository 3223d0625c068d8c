"""SevenNet-0 as a foundation model: parity with SevenNet's own ASE calculator, adapters on its
o3.Linear layers (identity at init, rotation equivariance, forces = -dE/dr), and the fine-tuning
workflow end to end (``model="sevenn:7net-0"``)."""
import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")
pytest.importorskip("mace")

import mmea_kernels as mk  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch  # noqa: E402
from mmea_kernels.integrations.sevenn import SevenNetAsMACE, load_sevennet  # noqa: E402

from helpers import TOL, adapted_copy  # noqa: E402

N_LINEAR = 18  # onehot_to_feature_x, 5 x (self_connection_intro, self_interaction_1, self_interaction_2), 2 readout


def _crystal():
    import ase.build

    a = ase.build.bulk("NaCl", "rocksalt", a=5.64)
    a.rattle(0.05, seed=1)
    return a


@pytest.fixture(scope="module")
def frames():
    return toy_molecules("ethanol", 2) + [_crystal()]


@pytest.fixture(scope="module")
def base64():
    return load_sevennet("7net-0", dtype=torch.float64)


@pytest.fixture(scope="module")
def base32():
    return load_sevennet("7net-0")  # float32, loaded once for the tests that compare it (~1 s a load)


@pytest.fixture(scope="module")
def sevennet_calc():
    """SevenNet's own ASE calculator (a float32 model), the independent reference, made once for the
    module (~1 s each); ASE recomputes whenever the atoms differ from its last ones."""
    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SevenNetCalculator("7net-0", device="cpu")


@pytest.fixture(scope="module")
def reference(frames, sevennet_calc):
    calc = sevennet_calc
    out = []
    for a in frames:
        a = a.copy()
        a.calc = calc
        out.append((a.get_potential_energy(), a.get_forces().copy()))
    return out


def _batch(model, frames, dtype=torch.float64):
    return atoms_to_batch(frames, model.atomic_numbers.tolist(), float(model.r_max), dtype=dtype)


def _eval(model, batch):
    out = model(dict(batch), training=False, compute_force=True)
    return out["energy"].double(), out["forces"].double()


def test_interface(base64):
    assert isinstance(base64, SevenNetAsMACE)
    z = base64.atomic_numbers.tolist()
    assert len(z) == 89 and z == sorted(z) and {1, 6, 8, 11, 17}.issubset(z)
    assert base64.r_max.dim() == 0 and float(base64.r_max) == 5.0
    e0 = base64.atomic_energies_fn.atomic_energies
    assert e0.shape == (89,) and e0.dtype == torch.float64 and not e0.any()
    from mmea_kernels.train.foundation import fingerprint, load_model, model_info

    assert model_info(base64) == (z, 5.0)
    m32 = load_model("sevenn:7net-0")
    assert isinstance(m32, SevenNetAsMACE) and next(m32.parameters()).dtype == torch.float32
    assert fingerprint(m32) == fingerprint(base64)  # float64 copy (exact Wigner-3j) fingerprints the same


@pytest.mark.parametrize("dtype,tol_e,tol_f", [(torch.float64, 1e-5, 1e-5), (torch.float32, 2e-5, 1e-5)])
def test_parity_with_sevennet_calculator(base64, base32, frames, reference, dtype, tol_e, tol_f):
    """Energies and forces equal SevenNetCalculator's (a float32 model) on two molecules and a periodic
    crystal, all in one batch; E0s added per atom."""
    model = base64 if dtype == torch.float64 else base32
    e, f = _eval(model, _batch(model, frames, dtype))
    ptr = np.cumsum([0] + [len(a) for a in frames])
    for i, (e_ref, f_ref) in enumerate(reference):
        assert abs(float(e[i]) - e_ref) < tol_e, (i, float(e[i]), e_ref)
        np.testing.assert_allclose(f[ptr[i]:ptr[i + 1]].numpy(), f_ref, atol=tol_f, rtol=0)
    # the per-element reference energies are added as a sum over atoms
    m = copy.deepcopy(model)  # the module's models stay as loaded
    e0 = torch.arange(89, dtype=m.atomic_energies_fn.atomic_energies.dtype) * 0.5
    m.atomic_energies_fn.atomic_energies.copy_(e0)
    e2, f2 = _eval(m, _batch(m, frames, dtype))
    zi = {z: i for i, z in enumerate(m.atomic_numbers.tolist())}
    shift = [sum(float(e0[zi[int(z)]]) for z in a.numbers) for a in frames]
    np.testing.assert_allclose((e2 - e).numpy(), shift, rtol=1e-6)
    torch.testing.assert_close(f2, f, rtol=0, atol=TOL[dtype]["atol"])


def test_per_atom_energies_equal_sevennet_calculators(base64, frames, sevennet_calc):
    """The wrapper's ``node_energy`` and the ASE calculator's ``energies`` equal SevenNetCalculator's
    per-atom energies (SevenNet-0's E0s are zero); with E0s set, ``node_energy`` excludes them."""
    from mmea_kernels.app.calculator import MMEACalculator

    ref = sevennet_calc
    a, b = frames[0].copy(), frames[0].copy()
    a.calc, b.calc = ref, MMEACalculator(module=base64)
    np.testing.assert_allclose(b.get_potential_energies(), a.get_potential_energies(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(b.calc.results["node_energy"], b.get_potential_energies(), rtol=0, atol=0)
    m = copy.deepcopy(base64)
    m.atomic_energies_fn.atomic_energies.copy_(torch.arange(89, dtype=torch.float64) * 0.5)
    c = frames[0].copy()
    c.calc = MMEACalculator(module=m)
    zi = {z: i for i, z in enumerate(m.atomic_numbers.tolist())}
    shift = np.array([0.5 * zi[int(z)] for z in c.numbers])
    np.testing.assert_allclose(c.get_potential_energies() - shift, b.get_potential_energies(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(c.calc.results["node_energy"], b.calc.results["node_energy"], rtol=0, atol=1e-10)


def test_adapter_targets(base64):
    m = copy.deepcopy(base64)
    rep = mk.inject_adapters(m, method="mmea")
    names = [r.name for r in rep.modules]
    assert len(names) == N_LINEAR and all(n.endswith(".linear") for n in names)
    assert "sevennet.onehot_to_feature_x.linear" in names and "sevennet.4_self_interaction_2.linear" in names
    assert rep.trainable_parameters == 110_209


def test_mmea_paper_recipe_on_sevennet(base64, frames):
    """mmea-paper on SevenNet-0: MMEA on every linear, rank-r A·B on every radial-MLP layer (whose
    last layer makes the convolution's per-path weights), dense Bessel coefficients; the model
    equals the base at initialisation and the low-rank factors carry gradient."""
    from mmea_kernels.train.methods import apply_method

    m = copy.deepcopy(base64)
    groups = apply_method(m, "mmea-paper", rank=16)
    radial = [mod for n, mod in m.named_modules() if n.endswith(tuple(f"weight_nn.layer{k}" for k in range(3)))]
    assert len(radial) == 15 and all(hasattr(r, "parametrizations") for r in radial)
    expect_radial = sum(min(16, *r.parametrizations.weight.original.shape) * sum(r.parametrizations.weight.original.shape)
                        for r in radial)
    assert groups["low-rank: radial MLPs"] == expect_radial
    assert groups["dense: Bessel weights"] == 8
    assert "low-rank: top-order symmetric contraction" not in groups
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in m.named_parameters() if p.requires_grad) == sum(groups.values())
    assert "sevennet.edge_embedding.basis_function.coeffs" in trainable
    b = _batch(base64, frames)
    e0, f0 = _eval(base64, b)
    e1, f1 = _eval(m, b)
    assert (e1 - e0).abs().max() <= 1e-10 and (f1 - f0).abs().max() <= 1e-10
    out = m(b, training=True)
    (out["energy"].sum() + out["forces"].square().sum()).backward()
    a_grads = [p.grad for n, p in m.named_parameters() if "weight_nn" in n and ".A." not in n and p.requires_grad]
    assert a_grads and all(g is not None and g.abs().sum() > 0 for g in a_grads)  # the B factors (zero at init)


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_identity_at_init(base64, frames, method):
    b = _batch(base64, frames)
    e0, f0 = _eval(base64, b)
    m = copy.deepcopy(base64)
    rep = mk.inject_adapters(m, method=method)
    assert len(rep.modules) == N_LINEAR
    e1, f1 = _eval(m, b)
    assert (e1 - e0).abs().max() <= 1e-10 and (f1 - f0).abs().max() <= 1e-10


def _randomised(base, method, seed=0):
    return adapted_copy(base, method, seed)


def _rotation(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q if np.linalg.det(q) > 0 else -q


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_rotation_equivariance_random_adapters(base64, frames, method):
    """Energy invariant, forces covariant under a random rotation (molecule and crystal, cell rotated
    too). Reflections are left out: SevenNet-0 is built with is_parity=False, so the base model itself
    is only SO(3)-equivariant (checked below with SevenNet's own calculator's numbers)."""
    m = _randomised(base64, method)
    b = _batch(m, frames)
    e, f = _eval(m, b)
    e_base, _ = _eval(base64, b)
    assert (e - e_base).abs().max() > 1e-4  # the adapters do something
    R = _rotation(3)
    rot = []
    for a in frames:
        a = a.copy()
        a.positions = a.positions @ R.T
        if a.pbc.any():
            a.cell = a.cell.array @ R.T
        rot.append(a)
    er, fr = _eval(m, _batch(m, rot))
    torch.testing.assert_close(er, e, rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(fr, f @ torch.from_numpy(R).T, rtol=0, atol=1e-9)


def test_base_model_is_not_mirror_symmetric(base64, frames):
    a = frames[0].copy()
    m = a.copy()
    m.positions[:, 0] *= -1
    e, _ = _eval(base64, _batch(base64, [a, m]))
    assert abs(float(e[1] - e[0])) > 1e-5  # about 3e-4 eV for this ethanol: is_parity=False


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_forces_are_minus_energy_gradient(base64, frames, method):
    m = _randomised(base64, method, seed=1)
    mol = [frames[0]]
    _, f = _eval(m, _batch(m, mol))
    h = 1e-4
    for atom, k in ((2, 0), (5, 2)):
        es = []
        for s in (h, -h):
            a = mol[0].copy()
            a.positions[atom, k] += s
            es.append(float(_eval(m, _batch(m, [a]))[0][0]))
        fd = -(es[0] - es[1]) / (2 * h)
        assert abs(fd - float(f[atom, k])) < 1e-6 * max(1.0, abs(fd)), (atom, k, fd, float(f[atom, k]))


def _strained_crystal():
    a = _crystal()
    a.set_cell(a.cell.array @ np.array([[1, 0.02, 0], [0, 1, 0.01], [0, 0, 0.98]]), scale_atoms=True)  # triclinic
    return a


def test_stress_matches_sevennet_calculator(base64, base32, sevennet_calc):
    """The stress of the periodic crystal (strained, triclinic) equals SevenNetCalculator's (a float32
    model: 3e-8 eV/Å³ seen), through the FusedGate layers (load_sevennet's default) and through e3nn's."""
    from mmea_kernels.app.calculator import MMEACalculator

    a = _strained_crystal()
    a.calc = sevennet_calc
    ref = a.get_stress()
    assert np.abs(ref).max() > 1e-3
    for model in (base64, load_sevennet("7net-0", dtype=torch.float64, fused_gate=False), base32):
        b = _strained_crystal()
        b.calc = MMEACalculator(module=model)
        np.testing.assert_allclose(b.get_stress(), ref, rtol=0, atol=2e-7)


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_stress_is_the_strain_derivative_with_adapters(base64, method):
    """With random adapters (no reference calculator knows them): the stress equals ASE's central
    differences of the energy under strain, in float64."""
    from mmea_kernels.app.calculator import MMEACalculator

    calc = MMEACalculator(module=_randomised(base64, method, seed=3))
    a = _strained_crystal()
    a.calc = calc
    np.testing.assert_allclose(a.get_stress(), calc.calculate_numerical_stress(a, d=1e-5), rtol=1e-6, atol=1e-9)


def test_stress_loss_reaches_the_adapters(base64):
    """Training on stresses (create_graph through the strain): the stress loss has a finite, nonzero
    gradient in the adapter weights."""
    m = _randomised(base64, "mmea", seed=4)
    out = m(dict(_batch(m, [_strained_crystal()])), training=True, compute_force=True, compute_stress=True)
    (out["stress"] ** 2).sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_double_backward(base64, frames):
    m = _randomised(base64, "mmea", seed=2)
    out = m(dict(_batch(m, frames)), training=True, compute_force=True)
    (out["forces"] ** 2).sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_finetune_smoke(tmp_path):
    import ase.io

    from mmea_kernels.train import FinetuneConfig, errors, finetune, load_finetuned, make_batches, read_frames
    from mmea_kernels.integrations.mace import atoms_to_graphs

    frames = toy_molecules("ethanol", 6, seed=4)
    ase.io.write(str(tmp_path / "train.xyz"), frames[:4], format="extxyz")
    ase.io.write(str(tmp_path / "valid.xyz"), frames[4:], format="extxyz")
    out = tmp_path / "run"
    cfg = FinetuneConfig(train=str(tmp_path / "train.xyz"), valid=str(tmp_path / "valid.xyz"),
                         model="sevenn:7net-0", method="mmea", epochs=1, batch_size=2, dtype="float64",
                         progress=False, out_dir=str(out))
    metrics = finetune(cfg, log=lambda *a: None)
    assert (out / "checkpoint.pt").is_file()
    assert metrics["trainable_parameters"] == 110_209
    # E0s re-fitted: SevenNet-0's energies are far from the Morse labels; the refit brings them close
    assert len(metrics["e0s"]) == 89 and sum(abs(v) for v in metrics["e0s"]) > 1.0
    assert metrics["valid"]["energy_mae_meV"] < 5e3 and np.isfinite(metrics["valid"]["forces_mae_meV_per_A"])
    net, ckpt = load_finetuned(out / "checkpoint.pt")
    assert isinstance(net, SevenNetAsMACE) and ckpt["model"] == "sevenn:7net-0"
    valid = read_frames(str(tmp_path / "valid.xyz"), "REF_energy", "REF_forces")
    graphs = atoms_to_graphs(valid, net.atomic_numbers.tolist(), float(net.r_max), dtype=torch.float64)
    again = errors(net, make_batches(graphs, 50))
    for k in ("energy_mae_meV", "forces_mae_meV_per_A", "loss"):
        assert again[k] == pytest.approx(metrics["valid"][k], rel=1e-9, abs=1e-9)
    _export_for_pair_e3gnn(out / "checkpoint.pt", valid, tmp_path)


def _export_for_pair_e3gnn(checkpoint, frames, tmp_path):
    """`mmea-kernels export` of the fine-tuned SevenNet: the pair_style e3gnn file (float32), checked
    before it takes its name, gives the checkpoint's model on frames it was not checked on; the
    formats and dtypes the pair style cannot run are refused by name, writing nothing, before the
    model is built (load_finetuned is not called)."""
    import contextlib
    import io
    import json
    from unittest import mock

    from mmea_kernels.app.cli import main
    from mmea_kernels.integrations.sevenn_deploy import run_like_pair_e3gnn
    from mmea_kernels.train import load_finetuned

    path = tmp_path / "deployed.pt"
    for extra, expect in ((["--format", "torchscript"], "exports as --format lammps"),
                          (["--format", "lammps-mliap"], "--format lammps-mliap is for MACE models"),
                          (["--dtype", "float64"], "runs float32")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), mock.patch("mmea_kernels.train.load_finetuned",
                                                         side_effect=AssertionError("the model was built")):
            assert main(["export", "--checkpoint", str(checkpoint), "--out", str(path), *extra]) == 2
        assert expect in err.getvalue(), err.getvalue()
    assert not list(tmp_path.glob("deployed*")) and not list(tmp_path.glob(".deployed*"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(path)]) == 0
    res = json.loads(buf.getvalue())
    assert res["dtype"] == "float32" and res["verified_max_rel_diff"] <= 5e-6 and "pair_style e3gnn" in res["lammps"]
    meta = {"chemical_symbols_to_index": "", "cutoff": ""}
    module = torch.jit.load(str(path), _extra_files=meta)
    meta = {k: v.decode() for k, v in meta.items()}
    net, _ = load_finetuned(checkpoint, dtype="float32")
    _gives_the_eager_model(net, frames, lambda atoms: run_like_pair_e3gnn(module, atoms, meta))
    _export_for_pair_e3gnn_parallel(checkpoint, net, frames, tmp_path)


def _gives_the_eager_model(net, frames, run):
    """``run(atoms)`` (energy, forces, _) equals ``net``'s energy and forces on ``frames`` (float32)."""
    for atoms in frames:
        batch = atoms_to_batch([atoms], net.atomic_numbers.tolist(), float(net.r_max), dtype=torch.float32)
        e0, f0 = _eval(net, batch)
        e, f, _ = run(atoms)
        assert abs(float(e - e0.sum())) <= 2e-6 * max(1.0, abs(float(e0.sum())))
        assert float((f - f0).abs().max()) <= 5e-6 * max(1.0, float(f0.abs().max()))


def _export_for_pair_e3gnn_parallel(checkpoint, net, frames, tmp_path):
    """`--format lammps-parallel`: a directory of segment files for pair_style e3gnn/parallel that
    gives the checkpoint's model; an existing directory is replaced only with --overwrite and only
    when it holds nothing but segment files."""
    import contextlib
    import io
    import json

    from mmea_kernels.app.cli import main
    from mmea_kernels.integrations.sevenn_deploy import run_like_pair_e3gnn_parallel

    out = tmp_path / "parallel"

    def export(*extra):
        buf, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "lammps-parallel",
                       *extra])
        return rc, buf.getvalue(), err.getvalue()

    rc, text, _ = export()
    assert rc == 0
    res = json.loads(text)
    assert res["verified_max_rel_diff"] <= 5e-6 and "pair_style e3gnn/parallel; pair_coeff * * 5 " in res["lammps"]
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"deployed_parallel_{i}.pt" for i in range(5)]
    keys = ("chemical_symbols_to_index", "cutoff", "comm_size")
    metas = [{k: "" for k in keys} for _ in names]
    modules = [torch.jit.load(str(out / n), _extra_files=m) for n, m in zip(names, metas)]
    meta = {k: v.decode() for k, v in metas[0].items()}
    assert meta["comm_size"] == "480"
    _gives_the_eager_model(net, frames, lambda atoms: run_like_pair_e3gnn_parallel(modules, atoms, meta))
    rc, _, err = export()
    assert rc == 2 and "exists; pass --overwrite" in err
    (out / "notes.txt").write_text("mine")
    rc, _, err = export("--overwrite")
    assert rc == 2 and "not segment files (notes.txt)" in err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    stamp = (out / names[0]).stat().st_mtime_ns
    assert export("--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == names and (out / names[0]).stat().st_mtime_ns != stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".parallel")]


def test_fused_gate_is_the_default_and_no_fused_gate_opts_out(monkeypatch):
    """`--model sevenn:7net-0` loads SevenNet-0 with FusedGate; `--no-fused-gate` keeps e3nn's Gate
    (the flag reaches load_model through FinetuneConfig)."""
    from e3nn.nn import Gate

    from mmea_kernels import train
    from mmea_kernels.app import cli
    from mmea_kernels.train.foundation import load_model
    from mmea_kernels.nn import FusedGate

    fused, plain = load_model("sevenn:7net-0"), load_model("sevenn:7net-0", fused_gate=False)
    count = lambda m, cls: sum(isinstance(x, cls) for x in m.modules())  # noqa: E731
    assert count(fused, FusedGate) == count(plain, Gate) == 5 and count(fused, Gate) == count(plain, FusedGate) == 0
    assert fused.state_dict().keys() == plain.state_dict().keys()
    seen = []

    def fake_finetune(cfg, log=print):
        seen.append(cfg.fused_gate)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(train, "finetune", fake_finetune)
    for extra, want in (([], True), (["--no-fused-gate"], False)):
        assert cli.main(["finetune", "--train", "x.xyz", "--model", "sevenn:7net-0"] + extra) == 130
        assert seen[-1] is want


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_to_sevennet_runs_in_sevennets_own_calculator(base64, method):
    """to_sevennet: the fine-tuned model as sevenn's own tools take a model object. SevenNetCalculator
    (float32, its own graph and force/stress output) on it gives this package's float64 energies,
    forces and stress with random adapters and re-fitted reference energies (folded into sevenn's
    per-species shift); neither the adapters nor the E0s are lost, and the model is not changed."""
    from sevenn.calculator import SevenNetCalculator

    from mmea_kernels.app.calculator import MMEACalculator
    from mmea_kernels.integrations.sevenn import to_sevennet

    model = _randomised(base64, method)
    zs = model.atomic_numbers.tolist()
    with torch.no_grad():
        model.atomic_energies_fn.atomic_energies.copy_(torch.tensor([-0.37 * z - 1.0 for z in zs], dtype=torch.float64))
    atoms = [toy_molecules("ethanol", 1, seed=4)[0], _strained_crystal()]
    before = [_eval(model, _batch(model, [a])) for a in atoms]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SevenNetCalculator(model=to_sevennet(model), file_type="model_instance", device="cpu")
    for a, b in zip(atoms, before):
        assert all(torch.equal(x, y) for x, y in zip(_eval(model, _batch(model, [a])), b))  # model unchanged
        ours, other = a.copy(), a.copy()
        ours.calc, other.calc = MMEACalculator(module=model), theirs
        e_base = _eval(base64, _batch(base64, [a]))[0]
        assert abs(ours.get_potential_energy() - float(e_base)) > 0.05  # adapters and E0s change it
        assert abs(other.get_potential_energy() - ours.get_potential_energy()) <= 2e-7 * abs(ours.get_potential_energy()) + 1e-4
        np.testing.assert_allclose(other.get_forces(), ours.get_forces(), rtol=0, atol=1e-4)
        if a.pbc.all():
            np.testing.assert_allclose(other.get_stress(), ours.get_stress(), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="to_sevennet takes a SevenNetAsMACE"):
        to_sevennet(model.sevennet)
