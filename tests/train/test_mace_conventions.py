"""mace-torch's data conventions, as a MACE user brings them (a review): per-frame loss weights were
dropped without a word (frames marked ``config_weight=0`` were trained on as any other), isolated-atom
frames (mace's E0s) were trained on and folded into the E0 fit, ``--e0s average`` meant something
else than mace's ``--E0s average``, virials could be trained as stresses, and a repeated ``--train``
kept the last file silently. The loss is checked against mace-torch's own weighted loss."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
import ase.build  # noqa: E402
import ase.io  # noqa: E402

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch  # noqa: E402
from mmea_kernels.train.checks import DataError  # noqa: E402
from mmea_kernels.train.data import check_mace_conventions  # noqa: E402
from mmea_kernels.train.foundation import ASSETS, load_model  # noqa: E402
from mmea_kernels.train.loss import errors, loss  # noqa: E402

DATA = ASSETS / "ethanol_pbe"


def _frames(n=6):
    return ase.io.read(str(DATA / "train.xyz"), f":{n}")


def test_the_loss_weighs_frames_as_mace_torchs_weighted_loss():
    from mace.modules.loss import WeightedEnergyForcesLoss

    model = load_model("builtin:mace-xtb-small").double()
    frames = _frames()
    frames[1].info["config_weight"] = 0.0
    frames[2].info["config_forces_weight"] = 3.0
    frames[3].info["config_energy_weight"] = 0.5
    frames[4].info.update(config_weight=2.0, config_forces_weight=0.0)
    batch = atoms_to_batch(frames, [1, 6, 7, 8], 5.0, energy_key="REF_energy", forces_key="REF_forces",
                           dtype=torch.float64)
    ours = loss(model, dict(batch), w_energy=1.0, w_forces=100.0)
    out = model(dict(batch), training=True, compute_force=True)
    ref = type("Batch", (dict,), {"__getattr__": dict.__getitem__})(batch)  # mace reads ref.weight, ref.ptr
    want = WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)(ref=ref, pred=out)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=0)
    unweighted = atoms_to_batch(_frames(), [1, 6, 7, 8], 5.0, energy_key="REF_energy", forces_key="REF_forces",
                                dtype=torch.float64)
    assert abs(float(loss(model, dict(unweighted), 1.0, 100.0)) - float(ours)) > 1e-6 * float(ours)
    # errors(): the reported loss is the training loss; MAE / RMSE count every frame alike
    got = errors(model, [batch], 1.0, 100.0)
    assert got["loss"] == pytest.approx(float(want), rel=1e-10)
    assert got["energy_mae_meV"] == pytest.approx(errors(model, [unweighted], 1.0, 100.0)["energy_mae_meV"], rel=1e-12)


def test_a_zero_weight_frame_changes_nothing_in_training(tmp_path, capsys):
    """Garbage frames (+50 eV, forces x -20) with config_weight=0 next to clean frames: the run trains as
    on the clean frames alone (the E0 fit, by default, leaves them out too: same final errors on the
    clean validation frames), and says so. Its state.pt, made to look as an older version's, is not
    resumed (that loss ignored the weights), while an unweighted run's is."""
    clean = _frames(6)
    junk = [a.copy() for a in _frames(3)]
    for a in junk:
        a.info["REF_energy"] += 50.0
        a.arrays["REF_forces"] = -20.0 * a.arrays["REF_forces"]
        a.info["config_weight"] = 0.0
    water = ase.Atoms("OH2", positions=[(0, 0, 0), (0.96, 0, 0), (-0.24, 0.93, 0)])  # a composition seen only here
    water.info.update(REF_energy=-2000.0, config_weight=0.0)
    water.arrays["REF_forces"] = np.zeros((3, 3))
    junk.append(water)
    ase.io.write(str(tmp_path / "clean.xyz"), clean)
    ase.io.write(str(tmp_path / "mixed.xyz"), clean + junk)
    ase.io.write(str(tmp_path / "valid.xyz"), ase.io.read(str(DATA / "valid.xyz"), ":3"))
    res = {}
    for name in ("clean", "mixed"):
        capsys.readouterr()
        assert main(["finetune", "--train", str(tmp_path / f"{name}.xyz"), "--valid", str(tmp_path / "valid.xyz"),
                     "--epochs", "2", "--batch-size", "10", "--out", str(tmp_path / name),
                     "--no-progress", "--dtype", "float64"]) == 0
        res[name] = (json.loads((tmp_path / name / "metrics.json").read_text()), capsys.readouterr().out)
    for k in ("energy_mae_meV", "forces_mae_meV_per_A"):  # to Adam's epsilon: the loss is a mean over all frames,
        # so 10 frames scale it by 6/10 (as mace's); with the junk counted the energy MAE is ~16,500 meV
        assert res["mixed"][0]["valid"][k] == pytest.approx(res["clean"][0]["valid"][k], rel=1e-5), k
    assert "4 of 10 train frames carry loss weights other than 1" in res["mixed"][1]
    from mmea_kernels.train.e0s import outside_span

    span = torch.load(str(tmp_path / "mixed" / "checkpoint.pt"), weights_only=True)["e0_span"]
    assert outside_span(span, [water]) == [0] and outside_span(span, clean[:1]) == []  # water: not fitted on
    for name, refused in (("mixed", True), ("clean", False)):
        st = torch.load(str(tmp_path / name / "state.pt"), weights_only=True)
        del st["semantics"]
        torch.save(st, str(tmp_path / name / "state.pt"))
        capsys.readouterr()
        assert main(["finetune", "--train", str(tmp_path / f"{name}.xyz"), "--valid", str(tmp_path / "valid.xyz"),
                     "--epochs", "2", "--batch-size", "10", "--out", str(tmp_path / name), "--no-progress",
                     "--dtype", "float64", "--resume", "auto"]) == 0  # finished: left as it is, whatever its version
        assert "holds a finished run" in capsys.readouterr().out
        rc = main(["finetune", "--train", str(tmp_path / f"{name}.xyz"), "--valid", str(tmp_path / "valid.xyz"),
                   "--epochs", "3", "--batch-size", "10", "--out", str(tmp_path / name), "--no-progress",
                   "--dtype", "float64", "--resume"])
        assert rc == (2 if refused else 0), name
        if refused:
            assert "was written by an older version of this package: its loss ignored per-frame weights" in \
                capsys.readouterr().err
    iso = ase.Atoms("H", positions=[(0.0, 0.0, 0.0)])
    iso.info.update(REF_energy=-13.6, config_type="IsolatedAtom")
    iso.arrays["REF_forces"] = np.zeros((1, 3))
    ase.io.write(str(tmp_path / "with_iso.xyz"), ase.io.read(str(tmp_path / "valid.xyz"), ":") + [iso])
    assert main(["evaluate", "--checkpoint", str(tmp_path / "clean" / "checkpoint.pt"), "--data",
                 str(tmp_path / "with_iso.xyz")]) == 0  # evaluated as a frame (refused for training only)
    junk_only = [a.copy() for a in junk[:3]]
    for a in junk_only:
        a.info["config_energy_weight"] = 0.0
    ase.io.write(str(tmp_path / "zero.xyz"), junk_only)
    capsys.readouterr()
    assert main(["finetune", "--train", str(tmp_path / "zero.xyz"), "--valid", str(tmp_path / "valid.xyz"),
                 "--e0s", "keep", "--refit-e0s-after", "--epochs", "1", "--out", str(tmp_path / "z"),
                 "--no-progress"]) == 0
    assert "nothing to fit the E0s on; they stay as trained" in capsys.readouterr().out
    assert main(["finetune", "--train", str(tmp_path / "zero.xyz"), "--valid", str(tmp_path / "valid.xyz"),
                 "--epochs", "1", "--out", str(tmp_path / "z2"), "--no-progress"]) == 2  # the default fit: nothing to fit
    assert "--e0s: every training frame has energy weight 0" in capsys.readouterr().err
    bad = ase.io.read(str(tmp_path / "valid.xyz"), ":")
    bad[0].info["config_weight"] = -1.0
    ase.io.write(str(tmp_path / "bad.xyz"), bad)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "clean" / "checkpoint.pt"), "--data",
                 str(tmp_path / "bad.xyz")]) == 2
    assert "frame 0: config_weight=-1.0; a weight must be a finite number >= 0" in capsys.readouterr().err


def test_isolated_atoms_bad_weights_and_virials_are_refused_by_name(tmp_path, capsys):
    frames = _frames(3)
    iso = []
    for z, e in ((1, -13.6), (8, -2040.9)):
        a = ase.Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        a.info.update(REF_energy=e, config_type="IsolatedAtom")
        a.arrays["REF_forces"] = np.zeros((1, 3))
        iso.append(a)
    with pytest.raises(DataError, match=r"t.xyz: frames 3, 4 are isolated atoms \(config_type=IsolatedAtom\).*"
                                        r'--e0s FILE.json, the file holding \{"1": -13.6, "8": -2040.9\}'):
        check_mace_conventions(frames + iso, "t.xyz", "REF_energy")
    bad = [a.copy() for a in frames]
    bad[2].info["config_forces_weight"] = -1.0
    with pytest.raises(DataError, match=r"t.xyz: frame 2: config_forces_weight=-1.0; a weight must be a finite"):
        check_mace_conventions(bad, "t.xyz", "REF_energy")
    ase.io.write(str(tmp_path / "iso.xyz"), frames + iso)
    capsys.readouterr()
    assert main(["finetune", "--train", str(tmp_path / "iso.xyz"), "--out", str(tmp_path / "r"), "--epochs", "1",
                 "--no-progress"]) == 2
    assert "are isolated atoms" in capsys.readouterr().err and not (tmp_path / "r").exists()
    box = ase.build.bulk("C", "diamond", a=3.57, cubic=True)
    box.info.update(REF_energy=-1000.0, REF_virials=np.eye(3).ravel().tolist())
    box.arrays["REF_forces"] = np.zeros((len(box), 3))
    ase.io.write(str(tmp_path / "box.xyz"), [box])
    assert main(["finetune", "--train", str(tmp_path / "box.xyz"), "--valid", str(tmp_path / "box.xyz"),
                 "--stress-key", "REF_virials", "--w-stress", "1", "--out", str(tmp_path / "v"), "--epochs", "1",
                 "--no-progress"]) == 2
    assert "--stress-key REF_virials: virials are not stresses" in capsys.readouterr().err


def test_repeated_file_options_and_a_fraction_for_valid_are_named(tmp_path, capsys):
    ase.io.write(str(tmp_path / "a.xyz"), _frames(4))
    with pytest.raises(SystemExit):
        main(["finetune", "--train", str(tmp_path / "a.xyz"), "--train", str(tmp_path / "a.xyz"),
              "--out", str(tmp_path / "r")])
    assert "--train given twice" in capsys.readouterr().err
    assert main(["finetune", "--train", str(tmp_path / "a.xyz"), "--valid", "0.1", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert "(a fraction of the training frames is --valid-fraction 0.1)" in capsys.readouterr().err
