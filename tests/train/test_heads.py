"""Multi-head mace models (mace's multi-head fine-tuning, ``mace-mp:mh-*``): the chosen head is the
one mace-torch's own calculator runs for that head, and fine-tuning, E0 fitting, evaluation, the ASE
calculator and every export use it. Before this, training used head 0 (mace's data default), the
E0 fit crashed on the per-head E0 table, and the LAMMPS files ran the last head."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402

from mmea_kernels.app.calculator import MMEACalculator  # noqa: E402
from mmea_kernels.integrations.heads import choose_head, head_e0s, model_heads, use_head  # noqa: E402
from mmea_kernels.train import FinetuneConfig, evaluate_checkpoint, finetune, load_finetuned  # noqa: E402
from mmea_kernels.train.foundation import load_model  # noqa: E402

from helpers import default_dtype  # noqa: E402

E0 = [[-13.6, -1029.0, -2041.0], [-10.0, -1000.0, -2000.0]]  # per head: H, C, O


def _two_heads(heads=("pt_head", "Default")):
    from e3nn import o3
    from mace import modules

    with torch.random.fork_rng(devices=[]), default_dtype(torch.float64):
        torch.manual_seed(3)
        model = modules.ScaleShiftMACE(
            r_max=5.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=3, hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=np.array(E0), avg_num_neighbors=8.0, atomic_numbers=[1, 6, 8], correlation=2,
            gate=torch.nn.functional.silu, radial_MLP=[16, 16], radial_type="bessel", atomic_inter_scale=[1.0, 3.0],
            atomic_inter_shift=[0.0, 0.2], heads=list(heads), use_reduced_cg=False)
    return model


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "mh.model"
    torch.save(_two_heads(), path)  # a whole pickled model, as mace's multi-head fine-tuning writes
    return path


def _mace_reference(path, head, atoms):
    """Energy and forces of mace-torch's own calculator with ``head``."""
    from mace.calculators import MACECalculator

    a = atoms.copy()
    a.calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64", head=head)
    return a.get_potential_energy(), a.get_forces()


@pytest.mark.parametrize("head", [None, "pt_head", "Default"])
def test_chosen_head_is_the_one_mace_runs(two_heads, train_files, head):
    atoms = ase.io.read(train_files / "valid.xyz", 0)
    model = load_model(str(two_heads), trust_pickle=True, head=head)
    name = head or "Default"  # without --head: the one named Default, as mace's calculator picks it
    assert model.mmea_head == name
    assert head_e0s(model).tolist() == E0[model_heads(model).index(name)]
    a = atoms.copy()
    a.calc = MMEACalculator(module=model)
    e_ref, f_ref = _mace_reference(two_heads, name, atoms)
    other_e, _ = _mace_reference(two_heads, "pt_head" if name == "Default" else "Default", atoms)
    assert abs(e_ref - other_e) > 1.0  # the heads differ, so the comparison can fail
    assert a.get_potential_energy() == pytest.approx(e_ref, rel=1e-12)
    np.testing.assert_allclose(a.get_forces(), f_ref, rtol=1e-9, atol=1e-10)


def test_head_choice_errors(two_heads):
    with pytest.raises(ValueError, match=r"has no head 'nope'; its heads are pt_head, Default"):
        load_model(str(two_heads), trust_pickle=True, head="nope")
    with pytest.raises(ValueError, match=r"2 heads \(omat, spice\) and none is named Default.*--head NAME"):
        choose_head(["omat", "spice"])
    assert choose_head(["omat", "DEFAULT"]) == "DEFAULT" and choose_head(["one"]) == "one"
    with pytest.raises(ValueError, match="preset:tiny has no head 'x'; its heads are Default"):  # one head, one name
        load_model("preset:tiny", head="x")
    with pytest.raises(ValueError, match=r"multi-head model \(heads pt_head, Default\) with no head chosen"):
        MMEACalculator(module=_two_heads())  # a model the user built: run no head silently


@pytest.mark.parametrize("head", ["pt_head", "Default"])
def test_finetune_trains_evaluates_and_exports_the_chosen_head(two_heads, train_files, tmp_path, head):
    out = tmp_path / "run"
    res = finetune(FinetuneConfig(train=str(train_files / "train.xyz"), valid=str(train_files / "valid.xyz"),
                                  model=str(two_heads), trust_pickle=True, head=head, out_dir=str(out), epochs=2,
                                  batch_size=4, progress=False, device="cpu"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["head"] == head
    net, _ = load_finetuned(out / "checkpoint.pt", str(two_heads), trust_pickle=True)
    table = net.atomic_energies_fn.atomic_energies
    i = model_heads(net).index(head)
    assert table[i].tolist() == pytest.approx(ckpt["e0s"], abs=1e-12)  # the fitted E0s went to this head's row
    assert ckpt["e0s"] != pytest.approx(E0[i], abs=1e-3)
    assert table[1 - i].tolist() == E0[1 - i]  # the other head's are untouched
    again = evaluate_checkpoint(out / "checkpoint.pt", str(train_files / "valid.xyz"), model=str(two_heads),
                                trust_pickle=True)
    assert again["loss"] == pytest.approx(res["valid"]["loss"], rel=1e-9)

    from mmea_kernels.app.deploy import export_checkpoint as export

    for fmt in ("lammps", "torchscript", "lammps-mliap"):  # each verified against the eager model on its frames
        summary = export(out / "checkpoint.pt", tmp_path / f"m.{fmt}.pt", fmt=fmt, model=str(two_heads),
                         trust_pickle=True)
        assert summary["head"] == head
    lammps = torch.jit.load(str(tmp_path / "m.lammps.pt"))
    assert int(lammps.head) == i  # mace's LAMMPS_MACE would otherwise run its last head


def test_resume_refuses_another_head(two_heads, train_files, tmp_path):
    cfg = dict(train=str(train_files / "train.xyz@:4"), model=str(two_heads), trust_pickle=True, out_dir=str(tmp_path),
               epochs=2, batch_size=4, progress=False, device="cpu", stop_after=1, valid_fraction=0.25)
    finetune(FinetuneConfig(head="Default", **cfg))
    with pytest.raises(ValueError, match="--head 'Default' there, 'pt_head' now"):
        finetune(FinetuneConfig(head="pt_head", resume=True, **cfg))


def test_conversions_and_in_place_scripting_keep_the_head(two_heads, train_files):
    """cuEquivariance conversions build new models (found in review: they ran head 0), and scripting
    in place took the hook off the caller's model; both keep the chosen head now."""
    pytest.importorskip("cuequivariance_torch")
    import mmea_kernels as mk
    from mmea_kernels.integrations.cueq import convert_adapted_to_cueq, convert_adapted_to_e3nn, convert_to_cueq
    from mmea_kernels.integrations.export import lammps_model, script_model
    from mmea_kernels.integrations.mace import atoms_to_batch

    atoms = ase.io.read(train_files / "valid.xyz", 0)
    batch = atoms_to_batch([atoms], [1, 6, 8], 5.0, dtype=torch.float64)

    def energy(m):
        return float(m(dict(batch), compute_force=False)["energy"][0])

    model = load_model(str(two_heads), trust_pickle=True)  # Default
    want = energy(model)
    assert abs(want - energy(_two_heads())) > 1.0  # head 0 differs
    assert energy(convert_to_cueq(model, layout="mul_ir")) == pytest.approx(want, rel=1e-9)
    mk.inject_adapters(model, method="mmea", rank=2)
    cueq = convert_adapted_to_cueq(model, layout="mul_ir")
    assert energy(cueq) == pytest.approx(want, rel=1e-9)
    assert energy(convert_adapted_to_e3nn(cueq)) == pytest.approx(want, rel=1e-9)
    for script in (script_model, lammps_model):
        copy = load_model(str(two_heads), trust_pickle=True)
        script(copy, in_place=True)
        assert energy(copy) == pytest.approx(want, rel=1e-12)


def test_mace_torchs_own_conversion_keeps_the_chosen_head(two_heads, train_files):
    """mace-torch's cuEquivariance conversion, called as MACECalculator(enable_cueq=True) calls it, on
    a model set to a head that is not the batch's (this package's hook): the same head after it,
    with and without adapters (mmea_kernels.integrations.mace_convert_guard)."""
    pytest.importorskip("cuequivariance_torch")
    import mmea_kernels as mk
    from mace.cli.convert_e3nn_cueq import run
    from mmea_kernels.integrations.mace import atoms_to_batch

    batch = atoms_to_batch([ase.io.read(train_files / "valid.xyz", 0)], [1, 6, 8], 5.0, dtype=torch.float64)
    assert int(batch["head"][0]) == 0  # the data's default head: pt_head

    def energy(m):
        return float(m(dict(batch), compute_force=False)["energy"][0])

    for adapters in (False, True):
        model = load_model(str(two_heads), trust_pickle=True, head="Default")
        if adapters:
            mk.inject_adapters(model, method="mmea", rank=2)
        want = energy(model)
        assert abs(want - energy(_two_heads())) > 1.0  # head 0 differs
        with default_dtype(torch.float64):
            converted = run(model, device="cpu", return_model=True)
        assert bool(mk.adapted_modules(converted)) == adapters
        assert energy(converted) == pytest.approx(want, rel=1e-9)


def test_a_checkpoint_from_before_heads_were_chosen_is_refused_by_name(two_heads):
    """Such a checkpoint (--e0s keep was its only way to run) holds the flattened E0 table of every
    head; it was refused as made 'for a base model with other elements' (found in review)."""
    from mmea_kernels.train.e0s import set_e0s

    model = load_model(str(two_heads), trust_pickle=True)
    with pytest.raises(ValueError, match="holds the E0s of all 2 heads of a multi-head base: it was trained before"):
        set_e0s(model, [v for row in E0 for v in row], "checkpoint old.pt")
    set_e0s(model, E0[0], "the fitted E0s")  # one head's: into the Default row
    assert model.atomic_energies_fn.atomic_energies.tolist() == [E0[0], E0[0]]


def _randomized(method):
    import mmea_kernels as mk

    model = _two_heads()
    mk.inject_adapters(model, method=method, rank=2)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _ef(model, head):
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch

    batch = atoms_to_batch(toy_molecules("ethanol", 2, seed=4), [1, 6, 8], 5.0, dtype=torch.float64)
    batch["head"] = torch.full_like(batch["head"], head)
    out = model(dict(batch), compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_mace_remove_pt_head_carries_the_adapters_of_the_kept_head(method):
    """mace's remove_pt_head (mace_select_head, a multi-head foundation in run_train) rebuilds a
    single-head model and loads the state dict with strict=False: it dropped every adapter without a
    word (the unpatched function, below). Now the adapters follow the kept head's readout channels:
    the single-head model equals the adapted multi-head model on that head (float64, 1e-10), for
    either head, with MMEA and ELoRA (and ELoRA equals mace's own result for the merged model)."""
    import copy

    import mmea_kernels as mk
    from mace.tools.scripts_utils import remove_pt_head

    model = _randomized(method)
    for idx, name in enumerate(model.heads):
        e_ref, f_ref = _ef(model, idx)
        with default_dtype(torch.float64):
            one = remove_pt_head(model, name)
        assert one.heads == [name] and set(mk.adapted_modules(one)) == set(mk.adapted_modules(model))
        assert all(p.requires_grad for n, p in one.named_parameters() if ".mmea_" in n or ".elora_" in n)
        e, f = _ef(one, 0)
        torch.testing.assert_close(e, e_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
        if method == "elora":  # mace's own head removal of the merged (plain) model
            with default_dtype(torch.float64):
                plain = remove_pt_head(mk.merge_and_unload(copy.deepcopy(model)), name)
            torch.testing.assert_close(_ef(plain, 0)[0], e_ref, rtol=1e-10, atol=1e-10)
        with default_dtype(torch.float64):
            dropped = remove_pt_head.__wrapped__(model, name)  # mace's function without this package's patch
        assert not mk.adapted_modules(dropped) and (_ef(dropped, 0)[0] - e_ref).abs().max() > 1e-3


def test_mace_remove_pt_head_refuses_what_cannot_follow_a_head(monkeypatch):
    """A head-split layer whose adapter has no per-head form (a weight this package has no rule for)
    is refused by name instead of being dropped, also through mace's remove_pt_head."""
    from mace.tools.scripts_utils import remove_pt_head
    from mmea_kernels.integrations.heads import one_head_adapter_state

    import mmea_kernels as mk

    model = _randomized("mmea")
    state = mk.adapter_state_dict(model)
    state["state"]["readouts.1.linear_2.mmea_extra"] = torch.zeros(2)
    with default_dtype(torch.float64):
        one = remove_pt_head(_two_heads(), "Default")
    with pytest.raises(ValueError, match=r"readouts\.1\.linear_2: no rule to split its adapter weight mmea_extra"):
        one_head_adapter_state(state, one, 1, 2)
    with pytest.raises(ValueError, match=r"readouts\.0\.linear: its output irreps change from 2x0e to 1x0e, not "
                                         r"one head's block of 3"):
        one_head_adapter_state(mk.adapter_state_dict(model), one, 1, 3)
    from mmea_kernels.integrations import heads

    def with_extra(state, *args):  # the same state with a weight no rule splits, through the real function
        return one_head_adapter_state({**state, "state": {**state["state"], "readouts.1.linear_2.mmea_extra":
                                                          torch.zeros(2, dtype=torch.float64)}}, *args)

    monkeypatch.setattr(heads, "one_head_adapter_state", with_extra)
    with default_dtype(torch.float64), pytest.raises(ValueError, match=r"remove_pt_head changes layers that carry "
                                                                       r"adapters, which cannot follow \(readouts\.1\."
                                                                       r"linear_2: no rule to split"):
        remove_pt_head(model, "Default")
