"""``mmea-paper`` on mace-torch MACE variants: the non-linear interaction blocks (MACE-MPA/OMAT
style, whose radial MLP is a mace ``RadialMLP`` and whose skip connection is an ``o3.Linear``), the
cuEquivariance form (refused, instead of silently running the SevenNet recipe), Gaussian and
Chebyshev radial bases (no Bessel frequencies), and a refusal that names the missing part."""
import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

pytest.importorskip("mace")

from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch  # noqa: E402
from mmea_kernels.peft import adapted_modules  # noqa: E402
from mmea_kernels.train.methods import apply_method  # noqa: E402

from helpers import default_dtype  # noqa: E402

PROMISED = ("low-rank: radial MLPs", "low-rank: top-order symmetric contraction",
            "dense: lower-order symmetric contraction")  # on every MACE of these tests


def _mace(first="RealAgnosticInteractionBlock", rest="RealAgnosticResidualInteractionBlock", **kw):
    from e3nn import o3
    from mace import modules

    ic = modules.interaction_classes
    args = dict(r_max=5.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2, interaction_cls=ic[rest],
                interaction_cls_first=ic[first], num_interactions=2, num_elements=3,
                hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
                atomic_energies=np.array([-13.6, -1029.0, -2041.0]), avg_num_neighbors=8.0,
                atomic_numbers=[1, 6, 8], correlation=2, gate=torch.nn.functional.silu, radial_MLP=[16, 16],
                radial_type="bessel", use_reduced_cg=False, atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    args.update(kw)
    with torch.random.fork_rng(devices=[]), default_dtype(torch.float64):
        torch.manual_seed(7)
        return modules.ScaleShiftMACE(**args)


def _energy_forces(model):
    frames = toy_molecules("ethanol", 1, seed=5)
    b = atoms_to_batch(frames, [1, 6, 8], 5.0, dtype=torch.float64)
    out = model(dict(b), compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


def _paper(base):
    """Apply mmea-paper to a copy; check identity at initialisation and the reported counts."""
    model = copy.deepcopy(base)
    groups = apply_method(model, "mmea-paper", rank=4, seed=0)
    e0, f0 = _energy_forces(base)
    e1, f1 = _energy_forces(model)
    torch.testing.assert_close(e1, e0, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(f1, f0, rtol=1e-12, atol=1e-12 * float(f0.abs().max()))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(groups.values())
    for name in PROMISED:
        assert groups.get(name, 0) > 0, (name, groups)
    assert all(v > 0 for k, v in groups.items() if not k.startswith("none: ")), groups
    return model, groups


@pytest.mark.parametrize("first", ["RealAgnosticResidualNonLinearInteractionBlock",
                                   "RealAgnosticResidualInteractionBlock"])
def test_nonlinear_blocks_radial_mlps(first):
    """Every nn.Linear of every non-linear block's RadialMLP carries a low-rank update; the
    non-linear blocks' skip connection is an o3.Linear under MMEA, reported as no weighted TP."""
    base = _mace(first=first, rest="RealAgnosticResidualNonLinearInteractionBlock")
    model, groups = _paper(base)
    for i, block in enumerate(model.interactions):
        linears = [m for m in block.conv_tp_weights.modules() if isinstance(m, nn.Linear)]
        if type(block).__name__ == "RealAgnosticResidualNonLinearInteractionBlock":
            assert len(linears) == 3, i
            assert f"interactions.{i}.skip_tp" in adapted_modules(model)
        assert all(parametrize.is_parametrized(m, "weight") for m in linears), i
    radial = sum(sum(p.numel() for p in m.parametrizations.weight[0].parameters())
                 for m in model.modules() if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"))
    assert radial > 0
    nonlinear = [str(i) for i, b in enumerate(model.interactions) if "NonLinear" in type(b).__name__]
    assert groups[f"none: weighted tensor product in interactions {', '.join(nonlinear)} (the skip connection is "
                  "an o3.Linear, under MMEA)"] == 0
    if first == "RealAgnosticResidualInteractionBlock":  # interaction 0 has a weighted skip_tp
        assert groups["low-rank: weighted tensor products"] > 0
        assert parametrize.is_parametrized(model.interactions[0].skip_tp, "weight")
    assert groups["dense: Bessel weights"] == 6


@pytest.mark.parametrize("radial_type", ["gaussian", "chebyshev"])
def test_radial_bases_without_bessel_frequencies(radial_type):
    model, groups = _paper(_mace(radial_type=radial_type))
    assert "dense: Bessel weights" not in groups
    basis = type(model.radial_embedding.bessel_fn).__name__
    assert groups[f"none: Bessel weights (the {basis} radial basis has no frequencies)"] == 0
    assert groups["low-rank: weighted tensor products"] > 0


def test_cuequivariance_mace_refused():
    """A MACE in cuEquivariance form is refused before any change (it used to get the SevenNet
    recipe: its cuet skip tensor products and symmetric contractions stayed frozen)."""
    pytest.importorskip("cuequivariance_torch")
    from mace.modules.wrapper_ops import CuEquivarianceConfig

    cfg = CuEquivarianceConfig(enabled=True, layout="ir_mul", group="O3_e3nn", optimize_all=True)
    model = _mace(cueq_config=cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"mmea-paper: this ScaleShiftMACE is in cuEquivariance form "
                                         r"\(interactions\.0\.skip_tp.*convert it to e3nn first"):
        apply_method(model, "mmea-paper", rank=4)
    assert not adapted_modules(model) and dict(model.named_parameters()).keys() == before.keys()
    assert apply_method(model, "mmea", rank=4)  # the plain MMEA method still takes it


def test_refusal_names_what_is_missing():
    """A MACE part the recipe does not know is named in the refusal, not called 'not a MACE'."""
    model = _mace()
    old = model.interactions[1].conv_tp_weights
    with default_dtype(torch.float64):
        model.interactions[1].conv_tp_weights = nn.Sequential(OrderedDict(
            lin=nn.Linear(old.hs[0], old.hs[-1], bias=False)))
    with pytest.raises(ValueError, match=r"in this ScaleShiftMACE the recipe found nothing to train for: "
                                         r"interactions\.1\.conv_tp_weights \(Sequential") as err:
        apply_method(model, "mmea-paper", rank=4)
    assert "SevenNet" not in str(err.value)
