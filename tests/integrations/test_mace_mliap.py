"""A fine-tuned MACE for LAMMPS' ML-IAP interface (``pair_style mliap unified``), run as LAMMPS runs it
on one process owning every atom (:func:`run_like_mliap`: ghost atoms for periodic images, their
features exchanged between mace's layers): the unadapted model gives the eager model's energy,
forces and virial (which checks the emulation against mace-torch's own ML-IAP path), and so do
adapted models, in the e3nn and the cuEquivariance forms."""
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch  # noqa: E402
from mmea_kernels.integrations.mace_mliap import _OneProcessData, mliap_model, run_like_mliap  # noqa: E402

from helpers import build_mace64, perturb_trainable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return build_mace64(seed=3).eval()


def _atoms(r_max):
    """Ethanol in vacuum, ethanol in a box half a cutoff wider than itself (it sees its images) and a
    small periodic cell of the model's elements (each atom sees many images of every atom)."""
    import ase

    mol = toy_molecules("ethanol", 1, seed=5)[0]
    boxed = mol.copy()
    pos = boxed.get_positions()
    boxed.set_positions(pos - pos.min(0) + 0.25 * r_max)
    boxed.cell, boxed.pbc = np.eye(3) * (float((pos.max(0) - pos.min(0)).max()) + 0.5 * r_max), True
    cell = ase.Atoms("CHOH", scaled_positions=[[0, 0, 0], [0.5, 0.1, 0.2], [0.1, 0.5, 0.6], [0.6, 0.55, 0.1]],
                     cell=[[3.1, 0.2, 0.0], [0.3, 3.3, 0.1], [0.0, 0.4, 3.2]], pbc=True)
    return [mol, boxed, cell]


def _eager(model, atoms):
    batch = atoms_to_batch([atoms], model.atomic_numbers.tolist(), float(model.r_max), dtype=torch.float64)
    pbc = bool(atoms.pbc.all())
    out = model(dict(batch), training=False, compute_force=True, compute_virials=pbc)
    return out["energy"].detach().sum(), out["forces"].detach(), out["virials"].detach().reshape(3, 3) if pbc else None


def _close(got, want, rel):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert float((g - w).abs().max()) <= rel * max(1.0, float(w.abs().max())), (g, w)


def _adapted(base, method, seed):
    import mmea_kernels as mk
    from mmea_kernels.app.deploy import _fold_parametrizations
    from mmea_kernels.train.methods import apply_method

    m = copy.deepcopy(base)
    if method == "mmea-paper":
        apply_method(m, method)
    else:
        mk.inject_adapters(m, method=method)
    perturb_trainable(m, seed, 0.05)
    _fold_parametrizations(m)
    return m


def test_the_unadapted_model_gives_the_eager_model(base):
    """mace-torch's ML-IAP path under the emulation equals its eager model: energy, forces on local
    atoms with the ghosts' forces added to their owners, the virial -Σ r_ij ⊗ f_ij. Ghosts are
    present and their features exchanged (a copy that skips the exchange fails this)."""
    obj = mliap_model(base, backend="e3nn")
    r_max = float(base.r_max)
    for atoms in _atoms(r_max):
        data = _OneProcessData(atoms, r_max, obj.element_types)
        assert (data.ntotal > data.nlocal) == bool(atoms.pbc.all())
        _close(run_like_mliap(obj, atoms, virial=bool(atoms.pbc.all())), _eager(base, atoms), 1e-10)


@pytest.mark.parametrize("method", ["mmea", "elora", "mmea-paper"])
def test_adapted_models_give_the_eager_model_in_both_forms(base, method):
    m = _adapted(base, method, seed=7)
    r_max = float(m.r_max)
    frames = _atoms(r_max)
    changed = max(float((a - b).abs().max()) for a, b in zip(_eager(m, frames[1])[:2], _eager(base, frames[1])[:2]))
    assert changed > 1e-3  # the adapters change the model
    e3nn_obj = mliap_model(m, backend="e3nn")
    cueq_obj = mliap_model(m, backend="cueq")
    assert type(cueq_obj.model.model.interactions[0].linear.base).__module__.startswith("cuequivariance_torch")
    for atoms in frames:
        want = _eager(m, atoms)
        pbc = bool(atoms.pbc.all())
        _close(run_like_mliap(e3nn_obj, atoms, virial=pbc), want, 1e-10)
        _close(run_like_mliap(cueq_obj, atoms, virial=pbc), want, 1e-10)
    assert m.interactions[0].linear.base.__class__.__module__.startswith("e3nn")  # m itself is untouched


def test_unknown_elements_and_backends_are_named(base):
    import ase

    obj = mliap_model(base, backend="e3nn")
    with pytest.raises(ValueError, match=r"not \['Og'\]"):
        run_like_mliap(obj, ase.Atoms("OgH", positions=[[0, 0, 0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match="unknown ML-IAP backend 'openequivariance'; expected one of cueq, e3nn"):
        mliap_model(base, backend="openequivariance")


def test_the_ghosts_features_matter_to_the_check(base, monkeypatch):
    """The check exercises the exchange: with ghosts' rows left as mace pads them (no forward
    exchange), an adapted model's file no longer gives the eager forces on a frame with ghosts."""
    from mmea_kernels.integrations import mace_mliap

    m = _adapted(base, "mmea", seed=7)
    boxed = _atoms(float(m.r_max))[1]
    obj = mliap_model(m, backend="e3nn")
    want = _eager(m, boxed)
    _close(run_like_mliap(obj, boxed, virial=True), want, 1e-10)
    monkeypatch.setattr(mace_mliap._OneProcessData, "forward_exchange", lambda self, feats, out, n: out.copy_(feats))
    _, f, _ = run_like_mliap(obj, boxed, virial=True)
    assert float((f - want[1]).abs().max()) > 1e-4


@pytest.mark.parametrize("adapted", [False, True])
def test_the_cueq_form_leaves_the_default_dtype(base, adapted):
    """mace-torch's conversion sets torch's default dtype to the model's for the whole process; the
    export puts it back (it leaked once and made a later test build its model in float64)."""
    m = _adapted(base, "mmea", seed=1) if adapted else base
    before = torch.get_default_dtype()
    assert before == torch.float32 and m.r_max.dtype == torch.float64
    mliap_model(m, backend="cueq")
    assert torch.get_default_dtype() == before
