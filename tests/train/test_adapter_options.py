"""Adapter options in the fine-tuning workflow (phi, init, alpha: checked, stored in the checkpoint,
used again when it is loaded) and the mmea-tp method (MMEA gates on tensor-product outputs)."""
import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402
from e3nn import o3  # noqa: E402
from e3nn.util.test import assert_equivariant  # noqa: E402

from helpers import TOL, default_dtype  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import PRESETS, build_mace  # noqa: E402
from mmea_kernels.nn.mmea import MMEATensorProduct  # noqa: E402
from mmea_kernels.train import FinetuneConfig, finetune, load_finetuned  # noqa: E402
from mmea_kernels.train.foundation import save_model  # noqa: E402
from mmea_kernels.train.methods import apply_method  # noqa: E402

TINY = PRESETS["tiny"]


@pytest.mark.parametrize("phi", ["exp", "residual"])
def test_tensor_product_gate_is_identity_at_init_and_equivariant(phi):
    torch.manual_seed(0)
    with default_dtype(torch.float64):  # e3nn bakes its Clebsch-Gordan constants in the default dtype
        tp = o3.FullyConnectedTensorProduct("4x0e+2x1o+1x2e", "1x0e+1x1o", "3x0e+2x1o+2x2e+1x1e")
    g = MMEATensorProduct(tp, rank=3, phi=phi).double()
    x, y = torch.randn(7, 15, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    assert torch.equal(g(x, y), tp(x, y))
    with torch.no_grad():
        for n, p in g.named_parameters():
            if not n.startswith("base."):
                p.add_(0.3 * torch.randn_like(p))
    with torch.profiler.profile() as prof:
        out = g(x, y)
    ref = tp(x, y)
    assert not torch.allclose(out, ref)
    from mmea_kernels.ops.gated_linear import kernel_backend
    if kernel_backend(None, x) == "cpp":  # the gate net runs as one C++ op there
        assert "mmea_kernels_ext::gate_net_fwd" in {e.name for e in prof.events()}
    # by hand: 0e outputs shifted, every other (order, multiplicity) block scaled by its gate
    gamma = g.mmea_up(torch.nn.functional.silu(g.mmea_down(x[:, :4])))
    add, logit = gamma[:, :3], gamma[:, 3:]
    gates = logit.exp() if phi == "exp" else 1 + logit
    blocks = [ref[:, 3:9].reshape(7, 2, 3), ref[:, 9:19].reshape(7, 2, 5), ref[:, 19:22].reshape(7, 1, 3)]
    expect = torch.cat([ref[:, :3] + add] + [(b * gates[:, k0:k0 + b.shape[1], None]).reshape(7, -1)
                                              for b, k0 in zip(blocks, (0, 2, 4))], 1)
    torch.testing.assert_close(out, expect, **TOL[torch.float64])
    with default_dtype(torch.float64):  # assert_equivariant draws its rotations in the default dtype
        assert_equivariant(g, args_in=[x, y], irreps_in=[tp.irreps_in1, tp.irreps_in2],
                           irreps_out=[tp.irreps_out], tolerance=1e-10)


def test_mmea_tp_gates_every_tensor_product_of_mace():
    torch.manual_seed(0)
    model = build_mace(TINY).double()
    n_tp = sum(isinstance(m, o3.TensorProduct) for m in model.modules())
    groups = apply_method(model, "mmea-tp", rank=4, seed=0, phi="residual")
    wrapped = [m for m in model.modules() if isinstance(m, MMEATensorProduct)]
    assert n_tp > 0 and len(wrapped) == n_tp and all(w.phi == "residual" for w in wrapped)
    assert groups[f"MMEA gates on {n_tp} tensor-product outputs"] == sum(
        p.numel() for w in wrapped for n, p in w.named_parameters() if not n.startswith("base."))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(groups.values())


def test_config_checks_adapter_options():
    with pytest.raises(ValueError, match="method 'full' has no adapters"):
        FinetuneConfig(train="x.xyz", method="full", adapter_options={"phi": "exp"}).check()
    with pytest.raises(ValueError, match=r"unknown adapter option\(s\) \['alpha'\] for method 'mmea'"):
        FinetuneConfig(train="x.xyz", method="mmea", adapter_options={"alpha": 4.0}).check()
    FinetuneConfig(train="x.xyz", method="elora", adapter_options={"alpha": 4.0}).check()


def test_adapter_options_are_stored_and_used_when_loading(tmp_path):
    torch.manual_seed(0)
    save_model(build_mace(TINY), TINY, tmp_path / "base.pt")
    ase.io.write(str(tmp_path / "train.xyz"), toy_molecules("ethanol", 6, "B", seed=1))
    ase.io.write(str(tmp_path / "valid.xyz"), toy_molecules("ethanol", 3, "B", seed=2))
    cfg = FinetuneConfig(train=str(tmp_path / "train.xyz"), valid=str(tmp_path / "valid.xyz"),
                         model=str(tmp_path / "base.pt"), out_dir=str(tmp_path / "run"), method="mmea-tp",
                         adapter_options={"phi": "residual", "init": "paper"}, epochs=2, batch_size=3, rank=4,
                         progress=False)
    finetune(cfg, log=lambda *_: None)
    net, ckpt = load_finetuned(tmp_path / "run" / "checkpoint.pt")  # re-checks the reference prediction
    assert ckpt["adapter_options"] == {"phi": "residual", "init": "paper"}
    gates = [m for m in net.modules() if hasattr(m, "phi")]
    assert gates and all(m.phi == "residual" and m.init == "paper" for m in gates)
    assert any(isinstance(m, MMEATensorProduct) for m in gates)


def test_cli_adapter_options(tmp_path, capsys):
    from mmea_kernels.app.cli import main

    torch.manual_seed(0)
    save_model(build_mace(TINY), TINY, tmp_path / "base.pt")
    ase.io.write(str(tmp_path / "train.xyz"), toy_molecules("ethanol", 6, "B", seed=1))
    common = ["finetune", "--train", str(tmp_path / "train.xyz"), "--model", str(tmp_path / "base.pt"),
              "--epochs", "1", "--batch-size", "3", "--rank", "4", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "a"), "--method", "mmea", "--phi", "residual"]) == 0
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["adapter_options"] == {"phi": "residual"}
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "b"), "--method", "mmea", "--alpha", "2"]) == 2
    assert "unknown adapter option(s) ['alpha'] for method 'mmea'" in capsys.readouterr().err


def test_default_learning_rate_per_method():
    # plain MMEA defaults to 5e-3 (bench/ablation.py), the other methods to 1e-2; a given lr is kept
    assert FinetuneConfig(train="t.xyz").lr == 5e-3
    assert FinetuneConfig(train="t.xyz", method="elora").lr == 1e-2
    assert FinetuneConfig(train="t.xyz", method="mmea-paper").lr == 1e-2
    assert FinetuneConfig(train="t.xyz", lr=2e-3).lr == 2e-3
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        FinetuneConfig(train="t.xyz", lr=0.0).check()
