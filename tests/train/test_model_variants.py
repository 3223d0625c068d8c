"""MACE architecture variants beyond the plain ScaleShiftMACE (a review built the ones mace-torch
0.3.16 offers): models that take charge and spin, dipole-only models and cuEquivariance-form models
are refused by name where this package would run them wrongly or cannot export them; MACE-MPA/OMAT's
non-linear interaction blocks export (their GatedEquivariantBlock, which TorchScript cannot compile,
is swapped for FusedGate in the exported copy, and the file is checked against the eager model)."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.train import FinetuneConfig, finetune  # noqa: E402
from mmea_kernels.train.foundation import load_model  # noqa: E402

from helpers import default_dtype  # noqa: E402


def _kwargs(**kw):
    from e3nn import o3
    from mace import modules

    blocks = modules.interaction_classes
    d = dict(r_max=5.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
             interaction_cls=blocks["RealAgnosticResidualInteractionBlock"],
             interaction_cls_first=blocks["RealAgnosticInteractionBlock"], num_interactions=2, num_elements=3,
             hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
             atomic_energies=np.array([-13.6, -1029.0, -2041.0]), avg_num_neighbors=8.0, atomic_numbers=[1, 6, 8],
             correlation=2, gate=torch.nn.functional.silu, radial_MLP=[16, 16], radial_type="bessel",
             use_reduced_cg=False, atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    d.update(kw)
    return d


def _save(tmp_path, name, build):
    with torch.random.fork_rng(devices=[]), default_dtype(torch.float64):
        torch.manual_seed(1)
        model = build()
    path = tmp_path / f"{name}.model"
    torch.save(model, path)
    return path


def test_models_with_charge_and_spin_inputs_or_without_energies_are_refused(tmp_path):
    from mace import modules

    specs = {"total_charge": {"type": "categorical", "num_classes": 11, "emb_dim": 8, "per": "graph", "offset": 5},
             "total_spin": {"type": "categorical", "num_classes": 5, "emb_dim": 8, "per": "graph", "offset": 0}}
    charged = _save(tmp_path, "charged", lambda: modules.ScaleShiftMACE(**_kwargs(embedding_specs=specs)))
    with pytest.raises(ValueError, match="takes total_charge, total_spin as inputs besides the structure .* every "
                                         "structure would run as charge 0, spin 1; it is not supported"):
        load_model(str(charged), trust_pickle=True)  # it ran every structure as neutral singlet, silently
    kw = {k: v for k, v in _kwargs(atomic_energies=None).items() if not k.startswith("atomic_inter")}
    dipoles = _save(tmp_path, "dipoles", lambda: modules.AtomicDipolesMACE(**kw))
    with pytest.raises(ValueError, match="is a AtomicDipolesMACE, which has no per-element energies"):
        load_model(str(dipoles), trust_pickle=True)  # an internal AttributeError in the E0 fit before


def test_non_linear_blocks_export_and_cueq_form_exports_are_refused_by_name(train_files, tmp_path, capsys):
    from mace import modules

    blocks = modules.interaction_classes
    nonlinear = _save(tmp_path, "nonlinear", lambda: modules.ScaleShiftMACE(**_kwargs(
        interaction_cls=blocks["RealAgnosticResidualNonLinearInteractionBlock"],
        interaction_cls_first=blocks["RealAgnosticResidualInteractionBlock"])))
    run = dict(train=str(train_files / "train.xyz@:6"), valid=str(train_files / "valid.xyz@:2"), trust_pickle=True,
               epochs=1, batch_size=3, progress=False, device="cpu")
    finetune(FinetuneConfig(model=str(nonlinear), out_dir=str(tmp_path / "nl"), **run), log=lambda *_: None)
    for fmt in ("lammps", "torchscript"):  # "does not script (Unknown type name 'o3.Irreps')" before
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(tmp_path / "nl" / "checkpoint.pt"), "--model", str(nonlinear),
                     "--trust-pickle", "--format", fmt, "--out", str(tmp_path / f"nl.{fmt}.pt")]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["fused_gates"] == 1 and res["verified_max_rel_diff"] <= 1e-9  # checked against the eager model

    pytest.importorskip("cuequivariance_torch")
    from mace.modules.wrapper_ops import CuEquivarianceConfig

    cueq = _save(tmp_path, "cueq", lambda: modules.ScaleShiftMACE(**_kwargs(cueq_config=CuEquivarianceConfig(
        enabled=True, layout="ir_mul", group="O3_e3nn", optimize_all=True))))
    finetune(FinetuneConfig(model=str(cueq), out_dir=str(tmp_path / "cq"), **run), log=lambda *_: None)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "cq" / "checkpoint.pt"), "--model", str(cueq),
                 "--trust-pickle", "--out", str(tmp_path / "cq.pt")]) == 2  # an internal error in the check before
    assert "holds a cuEquivariance-form MACE, which does not script" in capsys.readouterr().err
    assert not (tmp_path / "cq.pt").exists()
