"""Adapters injected into real mace-torch models: exact identity at init, O(3) equivariance of
energies and forces with random adapter weights, parameter counts on the MACE-OFF23-medium
architecture, adapter save/load round trip, unload / merge / disable, and a short fine-tuning run
that backpropagates a force loss through the gates (double backward).

Everything except the fine-tuning smoke test runs on small random H/C/O molecules (no data needed);
numerical checks are float64.
"""
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("ase")
pytest.importorskip("mace")

import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402
from e3nn import o3  # noqa: E402

from helpers import build_mace64, max_rel, random_orthogonal, randomise_adapters  # noqa: E402
from mmea_kernels import (adapted_modules, adapter_state_dict, disable_adapters, inject_adapters,  # noqa: E402
                          load_adapter_state_dict, merge_and_unload, unload)
from mmea_kernels.nn import AdapterLinear, ELoRALinear, MMEALinear  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch, build_mace, energy_and_forces  # noqa: E402

Z = (1, 6, 8)
R_MAX = 5.0
# Every kind of o3.Linear of a MACE: one-hot embedding (3x0e), scalar-only, l=0..3 square,
# the unsimplified 10-block input of the second interaction, readouts to 1x0e / MLP.
FULL = dict(hidden_irreps="16x0e+16x1o", max_ell=3, correlation=3, num_interactions=2)
# Cheap model (max_ell 2, correlation 2) for the API tests.
SMALL = dict(hidden_irreps="16x0e+16x1o", num_interactions=2)

METHODS = [
    pytest.param("mmea", {}, id="mmea"),
    pytest.param("mmea", {"phi": "residual"}, id="mmea-residual"),
    pytest.param("elora", {}, id="elora"),
]
pytestmark = pytest.mark.usefixtures("one_thread")  # keep_default_dtype is autouse (conftest)


# ----------------------------------------------------------------------------------- helpers
def random_molecules(seed, n_mol=3):
    """Small non-periodic H/C/O molecules, every element present, atoms at least 0.9 Å apart."""
    rng = np.random.default_rng(seed)
    mols = []
    for _ in range(n_mol):
        n = int(rng.integers(5, 8))
        numbers = list(Z) + [int(z) for z in rng.choice(Z, size=n - len(Z))]
        pos = []
        while len(pos) < n:
            p = rng.uniform(-1.8, 1.8, size=3)
            if all(np.linalg.norm(p - q) > 0.9 for q in pos):
                pos.append(p)
        mols.append(Atoms(numbers=numbers, positions=np.array(pos), pbc=False))
    return mols


def batch64(atoms_list):
    return atoms_to_batch(atoms_list, Z, R_MAX, dtype=torch.float64)


def evaluate(model, batch, training=False):
    e, f = energy_and_forces(model, batch, training=training)
    return e.detach(), f.detach()


def adapter_params(model):
    return [p for m in adapted_modules(model).values() for p in m.adapter_parameters()]


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, o3.Linear) and n]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def full_base():
    return build_mace64(**FULL)


@pytest.fixture(scope="module")
def small_base():
    return build_mace64(**SMALL)


@pytest.fixture(scope="module")
def molecules():
    return random_molecules(0)


@pytest.fixture(scope="module")
def mol_batch(molecules):
    return batch64(molecules)


@pytest.fixture(scope="module")
def full_base_out(full_base, mol_batch):
    return evaluate(full_base, mol_batch)


@pytest.fixture(scope="module")
def small_base_out(small_base, mol_batch):
    return evaluate(small_base, mol_batch)


@pytest.fixture(scope="module")
def medium():
    torch.manual_seed(0)
    return build_mace("mace-off23-medium")


# ----------------------------------------------------------------------------------- 1. identity
def test_full_model_has_every_kind_of_linear(full_base):
    lin = {n: m for n, m in full_base.named_modules() if isinstance(m, o3.Linear)}
    assert len(lin) == 10
    second = lin["interactions.1.linear"]
    assert len(second.irreps_in) == 10  # not simplified: 0e, 0e, 1o, 1o, 1o, 2e, 2e, 2e, 3o, 3o
    assert str(second.irreps_in).count("0e") == 2
    assert {ir.l for _, ir in second.irreps_out} == {0, 1, 2, 3}
    assert str(lin["node_embedding.linear"].irreps_in) == "3x0e"
    assert str(lin["readouts.0.linear"].irreps_out) == "1x0e"


def test_identity_at_init(full_base, mol_batch):
    model = copy.deepcopy(full_base)
    e0, f0 = evaluate(model, mol_batch)  # the same model object, before injection
    rep = inject_adapters(model, "mmea", rank=16, init="identity")
    assert [m.name for m in rep.modules] == linear_names(full_base)
    assert all(isinstance(m, MMEALinear) for m in adapted_modules(model).values())
    e1, f1 = evaluate(model, mol_batch)
    assert e1.dtype == torch.float64
    assert (e1 - e0).abs().max().item() <= 1e-12
    assert (f1 - f0).abs().max().item() <= 1e-12


def test_elora_identity_at_init(small_base, mol_batch, small_base_out):
    model = copy.deepcopy(small_base)
    inject_adapters(model, "elora", rank=4)
    e1, f1 = evaluate(model, mol_batch)
    assert (e1 - small_base_out[0]).abs().max().item() <= 1e-12
    assert (f1 - small_base_out[1]).abs().max().item() <= 1e-12


# ----------------------------------------------------------------------------------- 2. equivariance
@pytest.mark.parametrize("method,opts", METHODS)
def test_equivariance_random_adapters(full_base, molecules, full_base_out, mol_batch, method, opts):
    model = copy.deepcopy(full_base)
    inject_adapters(model, method, rank=8, **opts)
    # std 0.2: gates far from 1 (exp gates up to ~e^2) yet no overflow through the cubic products
    randomise_adapters(model, std=0.2, seed=1234)

    transforms = [random_orthogonal(seed, reflect) for seed in (0, 1, 2) for reflect in (False, True)]
    assert any(torch.det(q) < 0 for q in transforms) and any(torch.det(q) > 0 for q in transforms)
    atoms = list(molecules)
    for q in transforms:
        qn = q.numpy()
        for a in molecules:
            b = a.copy()
            b.positions = a.positions @ qn.T
            atoms.append(b)
    e, f = evaluate(model, batch64(atoms))  # all frames in one batch: one forward
    n_mol = len(molecules)
    n_at = sum(len(a) for a in molecules)
    e_ref, f_ref = e[:n_mol], f[:n_at]

    # the adapters really change the model (so the test could fail)
    e_base, f_base = full_base_out
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    assert torch.allclose(e_ref, evaluate(model, mol_batch)[0], rtol=1e-12, atol=0)
    assert max_rel(e_ref, e_base) > 1e-3
    assert max_rel(f_ref, f_base) > 1e-3

    for k, q in enumerate(transforms, start=1):
        e_k = e[k * n_mol:(k + 1) * n_mol]
        f_k = f[k * n_at:(k + 1) * n_at]
        assert max_rel(e_k, e_ref) <= 1e-9, f"energy not invariant under transform {k}"
        assert max_rel(f_k, f_ref @ q.T) <= 1e-9, f"forces do not rotate under transform {k}"


# ----------------------------------------------------------------------------------- 3. counts
@pytest.mark.parametrize("method,rank,expected", [("mmea", 16, 51842), ("mmea", 32, 101746),
                                                  ("elora", 16, 88656)])
def test_parameter_counts_mace_off23_medium(medium, method, rank, expected):
    model = copy.deepcopy(medium)
    base_total = sum(p.numel() for p in model.parameters())
    rep = inject_adapters(model, method, rank=rank)
    assert rep.method == method
    assert rep.options["rank"] == rank
    assert rep.trainable_parameters == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(m.parameters for m in rep.modules) == expected
    assert rep.total_parameters == base_total + expected
    names = linear_names(medium)
    assert len(names) == 10
    assert [m.name for m in rep.modules] == names
    text = str(rep)
    for n in names:
        assert n in text
    assert f"{expected:,}" in text


def test_mmea_count_formula_mace_off23_medium(medium):
    """Independent count: per layer r·(S_in+1) + (r+1)·(S_out+G) (down + up with biases)."""
    model = copy.deepcopy(medium)
    r = 16
    expected = 0
    for n in linear_names(medium):
        lin = medium.get_submodule(n)
        s_in = sum(mul for mul, ir in lin.irreps_in if ir.l == 0 and ir.p == 1)
        s_out = sum(mul for mul, ir in lin.irreps_out if ir.l == 0 and ir.p == 1)
        g = sum(mul for mul, ir in lin.irreps_out if not (ir.l == 0 and ir.p == 1))
        expected += r * (s_in + 1) + (r + 1) * (s_out + g)
    assert expected == 51842
    assert inject_adapters(model, "mmea", rank=r).trainable_parameters == expected


# ----------------------------------------------------------------------------------- 4. save/load
@pytest.mark.parametrize("method,opts", METHODS)
def test_save_load_round_trip(small_base, mol_batch, tmp_path, method, opts):
    base_sd = copy.deepcopy(small_base.state_dict())
    model = copy.deepcopy(small_base)
    inject_adapters(model, method, rank=4, **opts)
    randomise_adapters(model, std=0.3, seed=1234)
    e1, f1 = evaluate(model, mol_batch)

    state = adapter_state_dict(model)
    assert state["method"] == method
    assert not any("base." in k for k in state["state"])
    own = {f"{n}.{pn}" for n, m in adapted_modules(model).items()
           for pn, _ in m.named_parameters() if not pn.startswith("base.")}
    assert set(state["state"]) == own
    assert sum(v.numel() for v in state["state"].values()) == sum(p.numel() for p in adapter_params(model))
    torch.save(state, tmp_path / "a.pt")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)

    # fresh model with the same base weights and no adapters
    fresh = build_mace64(seed=99, **SMALL)
    fresh.load_state_dict(base_sd)
    rep = load_adapter_state_dict(fresh, loaded)
    assert rep.method == method
    assert [m.name for m in rep.modules] == linear_names(small_base)
    e2, f2 = evaluate(fresh, mol_batch)
    assert torch.equal(e1, e2)
    assert torch.equal(f1, f2)
    for k, v in loaded["state"].items():
        assert torch.equal(fresh.get_parameter(k), v)

    # loading into a model that already has (freshly initialised) adapters of the same kind
    again = build_mace64(seed=98, **SMALL)
    again.load_state_dict(base_sd)
    inject_adapters(again, method, rank=4, **opts)
    load_adapter_state_dict(again, loaded)
    e3, f3 = evaluate(again, mol_batch)
    assert torch.equal(e1, e3) and torch.equal(f1, f3)


@pytest.mark.parametrize("method,saved,have", [("elora", {"alpha": 16.0}, {"alpha": 4.0}),
                                               ("mmea", {"phi": "exp"}, {"phi": "residual"})])
def test_load_into_adapters_with_other_options_raises(small_base, method, saved, have):
    model = copy.deepcopy(small_base)
    inject_adapters(model, method, rank=4, **saved)
    randomise_adapters(model, std=0.2, seed=1234)
    state = adapter_state_dict(model)
    other = copy.deepcopy(small_base)
    inject_adapters(other, method, rank=4, **have)
    with pytest.raises(ValueError, match=r"module '.*' has %s adapters .* the state holds %s" % (method, method)):
        load_adapter_state_dict(other, state)


def test_load_into_mismatched_model_names_module_and_irreps(small_base, tmp_path):
    model = copy.deepcopy(small_base)
    inject_adapters(model, "mmea", rank=4)
    torch.save(adapter_state_dict(model), tmp_path / "a.pt")
    other = build_mace64(hidden_irreps="8x0e+8x1o")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"node_embedding\.linear.*3x0e -> 16x0e.*3x0e -> 8x0e"):
        load_adapter_state_dict(other, torch.load(tmp_path / "a.pt", weights_only=True))
    assert adapted_modules(other) == {}  # nothing injected on failure
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_load_rejects_foreign_state(small_base):
    model = copy.deepcopy(small_base)
    with pytest.raises(ValueError, match="not an mmea_kernels adapter state"):
        load_adapter_state_dict(model, model.state_dict())


# ----------------------------------------------------------------------------------- 5. unload etc.
@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_unload_restores_modules_and_outputs(small_base, mol_batch, small_base_out, method):
    model = copy.deepcopy(small_base)
    model.readouts[0].linear.weight.requires_grad_(False)  # a non-default flag to be restored
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    originals = {n: model.get_submodule(n) for n in linear_names(model)}
    weights = {n: m.weight.detach().clone() for n, m in originals.items()}

    inject_adapters(model, method, rank=4)
    randomise_adapters(model, std=0.3, seed=1234)
    e_ad, _ = evaluate(model, mol_batch)
    assert max_rel(e_ad, small_base_out[0]) > 1e-3

    assert unload(model) is model
    assert adapted_modules(model) == {}
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    for n, m in originals.items():
        assert model.get_submodule(n) is m
        assert torch.equal(m.weight, weights[n])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    e, f = evaluate(model, mol_batch)
    assert torch.equal(e, small_base_out[0]) and torch.equal(f, small_base_out[1])
    # a second injection works after unloading
    inject_adapters(model, method, rank=4)


def test_merge_and_unload_elora_is_exact(small_base, mol_batch, small_base_out):
    model = copy.deepcopy(small_base)
    originals = {n: model.get_submodule(n) for n in linear_names(model)}
    inject_adapters(model, "elora", rank=4)
    randomise_adapters(model, std=0.3, seed=1234)
    assert all(isinstance(m, ELoRALinear) for m in adapted_modules(model).values())
    e1, f1 = evaluate(model, mol_batch)
    assert max_rel(e1, small_base_out[0]) > 1e-3

    merge_and_unload(model)
    assert adapted_modules(model) == {}
    for n, m in originals.items():
        assert model.get_submodule(n) is m
    assert all(p.requires_grad for p in model.parameters())
    e2, f2 = evaluate(model, mol_batch)
    assert (e2 - e1).abs().max().item() <= 1e-10
    assert (f2 - f1).abs().max().item() <= 1e-10


def test_merge_and_unload_mmea_raises(small_base, mol_batch):
    model = copy.deepcopy(small_base)
    inject_adapters(model, "mmea", rank=4)
    randomise_adapters(model, std=0.3, seed=1234)
    e1, _ = evaluate(model, mol_batch)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        merge_and_unload(model)
    assert len(adapted_modules(model)) == len(linear_names(small_base))  # left as it was
    assert torch.equal(evaluate(model, mol_batch)[0], e1)


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_disable_adapters_gives_base_outputs(small_base, mol_batch, small_base_out, method):
    model = copy.deepcopy(small_base)
    inject_adapters(model, method, rank=4)
    randomise_adapters(model, std=0.3, seed=1234)
    e1, f1 = evaluate(model, mol_batch)
    assert max_rel(e1, small_base_out[0]) > 1e-3
    with disable_adapters(model) as m:
        assert m is model
        e0, f0 = evaluate(model, mol_batch)
    assert torch.equal(e0, small_base_out[0]) and torch.equal(f0, small_base_out[1])
    e2, f2 = evaluate(model, mol_batch)
    assert torch.equal(e1, e2) and torch.equal(f1, f2)
    # restored even when the block raises
    with pytest.raises(KeyError):
        with disable_adapters(model):
            raise KeyError("boom")
    assert all(m.adapter_enabled for m in adapted_modules(model).values())


# ----------------------------------------------------------------------------------- 6. fine-tuning
def _ethanol(rmd17, n):
    return ase.io.read(rmd17 / "ethanol" / "train.xyz", f":{n}")


def test_finetune_smoke_double_backward(rmd17):
    frames = _ethanol(rmd17, 8)
    counts = np.array([[np.sum(a.numbers == z) for z in Z] for a in frames], dtype=float)
    energies = np.array([a.info["REF_energy"] for a in frames])
    e0 = np.linalg.lstsq(counts, energies, rcond=None)[0]  # E0s by least squares
    torch.manual_seed(0)
    model = build_mace("tiny", atomic_energies=e0)
    batch = atoms_to_batch(frames, Z, R_MAX)
    assert batch["positions"].dtype == torch.float32
    n_atoms = (batch["ptr"][1:] - batch["ptr"][:-1]).to(torch.float32)

    base = [(p, p.detach().clone()) for p in model.parameters()]
    inject_adapters(model, "mmea", rank=8)
    params = adapter_params(model)
    assert all(p.requires_grad for p in params)
    ids = {id(p) for p in params}
    assert all(not p.requires_grad for p, _ in base)

    def loss_fn():
        e, f = energy_and_forces(model, batch, training=True)
        assert f.requires_grad  # create_graph: the force loss can be differentiated
        le = torch.mean(((e - batch["energy"]) / n_atoms) ** 2)
        lf = torch.mean((f - batch["forces"]) ** 2)
        return le + 10.0 * lf

    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    final = loss_fn().item()
    assert final < losses[0], losses + [final]

    for p, before in base:
        assert torch.equal(p.detach(), before)

    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert id(p) in ids, f"non-adapter parameter {n} got a gradient"
    for n, m in adapted_modules(model).items():
        for pn, p in m.named_parameters():
            if pn.startswith("base."):
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}.{pn} has no gradient"


def test_force_loss_gradient_matches_finite_differences(small_base, mol_batch):
    """The gradient of a force loss w.r.t. the adapter weights (double backward through the gate
    ops) agrees with a central finite difference along a random direction (float64)."""
    model = copy.deepcopy(small_base)
    inject_adapters(model, "mmea", rank=4)
    randomise_adapters(model, std=0.2, seed=1234)
    params = adapter_params(model)
    gen = torch.Generator().manual_seed(7)
    target = torch.randn(mol_batch["positions"].shape, generator=gen, dtype=torch.float64)

    def loss():
        e, f = energy_and_forces(model, mol_batch, training=True)
        return (e ** 2).sum() + ((f - target) ** 2).sum()

    grads = torch.autograd.grad(loss(), params)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    lp = loss().item()
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
    lm = loss().item()
    numeric = (lp - lm) / (2 * eps)
    # central difference error here is ~1e-9 relative; a 1 % error in one backward term is ~1e-6
    assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(analytic)), (analytic, numeric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_cache_equals_atoms_to_batch_frame_after_frame(dtype):
    """The calculator's per-frame input (``BatchCache``) against mace's own path, tensor for tensor
    (``torch.equal``, same dtype and shape): a molecule moving, a triclinic periodic cell whose
    atoms cross its faces while the cell itself is strained (NPT), then other atoms and other pbc
    (the cache must rebuild), then the first molecule again, one flying apart and one 1e4 Å from the
    origin (a molecule's neighbour list is a k-d tree's, not mace's: the same edges; in the same order for these small ones, not in general: tests/app/test_calculator_use.py)."""
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import BatchCache

    rng = np.random.default_rng(0)
    mol = toy_molecules("ethanol", 1, seed=1)[0]
    box = toy_molecules("toluene", 1, seed=2)[0]
    box.cell, box.pbc = np.diag([6.0, 6.5, 7.0]) + 0.4 * np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]), True
    slab = box.copy()
    slab.pbc = [True, True, False]
    spread = mol.copy()  # a molecule flying apart (MD at too high a temperature), then far from the origin
    spread.positions[0] += [40.0, -25.0, 10.0]
    far = mol.copy()
    far.positions += 1e4
    cache = BatchCache(Z, R_MAX, dtype=dtype)
    frames = []
    for atoms in (mol, box, slab, mol, spread, far):
        for _ in range(3):
            atoms = atoms.copy()
            atoms.positions += rng.normal(0, 0.3, atoms.positions.shape)
            if atoms.pbc.all():
                atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(0, 0.02, (3, 3))), scale_atoms=True)
            frames.append(atoms)
    edges = set()
    for atoms in frames:
        got, ref = cache(atoms), atoms_to_batch([atoms], Z, R_MAX, energy_key="__none__", forces_key="__none__",
                                                dtype=dtype)
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            if torch.is_tensor(v):
                assert v.dtype == got[k].dtype and v.shape == got[k].shape and torch.equal(v, got[k]), k
        edges.add(int(ref["edge_index"].shape[1]))
    assert len(edges) > 4  # the neighbour lists really changed from frame to frame
