"""Fine-tuning on stresses (``w_stress > 0``, periodic frames with stress labels): the loss term and
the stress errors against the ASE calculator's stresses (an independent path: ASE's Voigt form,
itself tested against finite differences), the term reaching the trained weights, the workflow
end to end (metrics, checkpoint, evaluate), and bad stress data named."""
import json
import math
from re import search as re_search

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402
from ase.stress import voigt_6_to_full_3x3_stress  # noqa: E402

import mmea_kernels as mk  # noqa: E402
from mmea_kernels.app.calculator import MMEACalculator  # noqa: E402
from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import PRESETS, build_mace, collate  # noqa: E402
from mmea_kernels.train import FinetuneConfig, evaluate_checkpoint, finetune  # noqa: E402
from mmea_kernels.train.checks import DataError, checked_graphs  # noqa: E402
from mmea_kernels.train.config import config_key  # noqa: E402
from mmea_kernels.train.foundation import save_model  # noqa: E402
from mmea_kernels.train.loss import errors, loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = PRESETS["tiny"]
QUIET = dict(log=lambda *_: None)


def _boxes(n, seed):
    """Rattled ethanol molecules in triclinic periodic cells wider than the cutoff, labelled with
    the energy, forces and stress (Voigt) of a random 'teacher' MACE."""
    torch.manual_seed(100)
    teacher = MMEACalculator(module=build_mace(TINY).double())
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(toy_molecules("ethanol", n, "B", seed=seed)):
        a.positions += 1.5
        a.cell = np.diag(rng.uniform(5.6, 6.4, 3)) + rng.uniform(-0.3, 0.3, (3, 3)) * (1 - np.eye(3))
        a.pbc = True
        a.calc = teacher
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = None
        a.info["REF_energy"], a.info["REF_stress"] = e, s
        a.arrays["REF_forces"] = f
        out.append(a)
    return out


@pytest.fixture(scope="module")
def stress_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stress")
    torch.manual_seed(0)
    save_model(build_mace(TINY), TINY, d / "base.pt")
    ase.io.write(str(d / "train.xyz"), _boxes(6, 1))
    ase.io.write(str(d / "valid.xyz"), _boxes(3, 2))
    return d


def _adapted():
    torch.manual_seed(0)
    net = build_mace(TINY).double()
    mk.inject_adapters(net, method="mmea", rank=4)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    return net


def test_stress_loss_term_and_errors_match_the_calculator(stress_files):
    frames = ase.io.read(str(stress_files / "train.xyz"), ":")
    net = _adapted()
    graphs = checked_graphs(frames, TINY.atomic_numbers, TINY.r_max, "train.xyz", dtype=torch.float64,
                            stress_key="REF_stress")
    batch = collate(graphs)
    # the independent path: ASE's stress of every frame (Voigt -> 3 x 3) against the label
    calc = MMEACalculator(module=net)
    diffs = []
    for a in frames:
        b = a.copy()
        b.calc = calc
        diffs.append(voigt_6_to_full_3x3_stress(b.get_stress()) - voigt_6_to_full_3x3_stress(a.info["REF_stress"]))
    diffs = np.array(diffs)
    assert np.abs(diffs).max() > 1e-4  # the adapted model's stresses differ from the teacher's
    w = 2.5
    term = float(loss(net, batch, w_stress=w) - loss(net, batch, w_stress=0.0)) / w
    assert math.isclose(term, float((diffs ** 2).mean()), rel_tol=1e-9)
    m = errors(net, [batch], w_stress=w)
    assert math.isclose(m["stress_mae_meV_per_A3"], 1000 * float(np.abs(diffs).mean()), rel_tol=1e-9)
    assert math.isclose(m["stress_rmse_meV_per_A3"], 1000 * float(np.sqrt((diffs ** 2).mean())), rel_tol=1e-9)
    assert math.isclose(m["loss"] - errors(net, [batch])["loss"], w * float((diffs ** 2).mean()), rel_tol=1e-9)
    # the term reaches the trained weights: the stress loss alone has a gradient in the adapters, and
    # it is the derivative (central differences on a few adapter weights, float64)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    g = torch.autograd.grad(loss(net, batch, w_energy=0.0, w_forces=0.0, w_stress=1.0), [p for _, p in named])
    assert sum(float(t.abs().sum()) for t in g) > 0
    h = 1e-6
    for k in (0, len(named) // 2, len(named) - 1):
        p, grad = named[k][1], g[k]
        i = int(grad.abs().argmax())
        vals = []
        for step in (h, -2 * h, h):  # +h, -h, back
            with torch.no_grad():
                p.view(-1)[i] += step
            vals.append(float(loss(net, batch, w_energy=0.0, w_forces=0.0, w_stress=1.0)))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(fd - float(grad.view(-1)[i])) <= 1e-5 * max(abs(fd), 1e-8), (named[k][0], fd, float(grad.view(-1)[i]))


def test_finetune_on_stresses_end_to_end(stress_files, tmp_path, capsys):
    cfg = FinetuneConfig(train=str(stress_files / "train.xyz"), valid=str(stress_files / "valid.xyz"),
                         test=str(stress_files / "valid.xyz"), model=str(stress_files / "base.pt"),
                         out_dir=str(tmp_path / "r"), method="mmea", epochs=2, batch_size=3, progress=False,
                         w_stress=10.0, allow_small_cells=True)
    m = finetune(cfg, **QUIET)
    for split in ("train", "valid", "test"):
        assert m[split]["stress_mae_meV_per_A3"] > 0 and "stress_rmse_meV_per_A3" in m[split]
    assert all("stress_mae_meV_per_A3" in h["valid"] for h in m["history"])
    again = evaluate_checkpoint(tmp_path / "r" / "checkpoint.pt", str(stress_files / "valid.xyz"),
                                checks=cfg.data_checks())
    for k in ("stress_mae_meV_per_A3", "forces_mae_meV_per_A", "loss"):
        assert math.isclose(again[k], m["test"][k], rel_tol=1e-9), k
    js = tmp_path / "e.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "r" / "checkpoint.pt"), "--data",
                 str(stress_files / "valid.xyz"), "--allow-small-cells", "--device", "cpu", "--json", str(js)]) == 0
    assert "σ MAE" in capsys.readouterr().out
    assert math.isclose(json.loads(js.read_text())["stress_mae_meV_per_A3"], m["test"]["stress_mae_meV_per_A3"],
                        rel_tol=1e-9)
    # --no-stress: the same energies and forces without stress errors; molecules (no stress labels, not
    # periodic) were refused for a checkpoint trained on stresses, with no way to turn them off
    ck_s = str(tmp_path / "r" / "checkpoint.pt")
    no_stress = evaluate_checkpoint(ck_s, str(stress_files / "valid.xyz"), checks=cfg.data_checks(), stress=False)
    assert "stress_mae_meV_per_A3" not in no_stress and no_stress["forces_mae_meV_per_A"] == again["forces_mae_meV_per_A"]
    molecules = ase.io.read(str(stress_files / "valid.xyz"), ":")
    for a in molecules:
        a.pbc, a.cell = False, None
        del a.info["REF_stress"]
    ase.io.write(str(tmp_path / "mol.xyz"), molecules)
    assert main(["evaluate", "--checkpoint", ck_s, "--data", str(tmp_path / "mol.xyz"), "--device", "cpu"]) == 2
    assert "no stress under info['REF_stress']" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", ck_s, "--data", str(tmp_path / "mol.xyz"), "--device", "cpu",
                 "--no-stress"]) == 0
    assert "F MAE" in capsys.readouterr().out
    # a stress key for a run that reads no stresses is refused, not ignored
    with pytest.raises(ValueError, match="--stress-key DFT_stress names the stress labels of a run on stresses; with "
                                         "--w-stress 0 stresses are not read"):
        finetune(FinetuneConfig(**dict(vars(cfg), w_stress=0.0, stress_key="DFT_stress")), **QUIET)
    assert main(["finetune", "--train", str(stress_files / "train.xyz"), "--stress-key", "REF_stress",
                 "--out", str(tmp_path / "k")]) == 2
    assert "--stress-key REF_stress names the stress labels" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
    # the training steps use the stress term: the same run without it starts from the same weights
    # and batches, and its first epoch's training loss is lower by the stress term
    plain_run = finetune(FinetuneConfig(**dict(vars(cfg), w_stress=0.0, out_dir=str(tmp_path / "p"), epochs=1)), **QUIET)
    assert plain_run["history"][0]["train_loss"] < m["history"][0]["train_loss"]
    assert "stress_mae_meV_per_A3" not in plain_run["valid"]
    # a checkpoint trained without stresses is evaluated on them on request (--stress-key), its loss unchanged
    ck = str(tmp_path / "p" / "checkpoint.pt")
    plain_eval = evaluate_checkpoint(ck, str(stress_files / "valid.xyz"), checks=cfg.data_checks())
    with_stress = evaluate_checkpoint(ck, str(stress_files / "valid.xyz"), checks=cfg.data_checks(),
                                      stress_key="REF_stress")
    assert "stress_mae_meV_per_A3" not in plain_eval and with_stress["stress_mae_meV_per_A3"] > 0
    assert with_stress["loss"] == plain_eval["loss"]
    assert main(["evaluate", "--checkpoint", ck, "--data", str(stress_files / "valid.xyz"), "--allow-small-cells",
                 "--device", "cpu", "--stress-key", "REF_stress"]) == 0
    assert f"σ MAE {with_stress['stress_mae_meV_per_A3']:.3f} meV/Å³" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", ck, "--data", str(stress_files / "valid.xyz"), "--allow-small-cells",
                 "--stress-key", "DFT_stress"]) == 2
    assert "no stress under info['DFT_stress']" in capsys.readouterr().err
    # the stress settings belong to the run's key (a resume must use them); runs without stresses keep
    # the key they had before the settings existed
    assert "w_stress" in config_key(cfg) and "stress_key" in config_key(cfg)
    plain = FinetuneConfig(train="x.xyz")
    assert "w_stress" not in config_key(plain) and "stress_key" not in config_key(plain)


def test_stress_labels_in_other_units_or_sign_get_a_note(stress_files):
    """Stresses in kbar or with VASP's sign trained without a word (a bulk user's review): labels
    equal to the model's get no note; negated, or in kbar, they do (forces untouched: no force note);
    near zero pressure (both below an RMS of 1e-3 eV/Å³) a sign says nothing and gets no note."""
    from mmea_kernels.train.loss import label_scale_note

    frames = ase.io.read(str(stress_files / "train.xyz"), ":")
    for k, factor, expect in ((20.0, 1.0, None), (20.0, -1.0, r"1x the base model's, with cosine -1.00"),
                              (20.0, 1602.0, r"1.6e\+03x the base model's, with cosine 1.00"), (1.0, -1.0, None)):
        torch.manual_seed(100)
        teacher = build_mace(TINY, scale=k).double()  # the labels' model (_boxes) with stresses k times larger
        scaled = [a.copy() for a in frames]
        for a in scaled:
            a.info["REF_stress"] = a.info["REF_stress"] * k * factor
            a.arrays["REF_forces"] = a.arrays["REF_forces"] * k
            a.info["REF_energy"] = a.info["REF_energy"] * k  # consistent labels: no energy note either
        graphs = checked_graphs(scaled, TINY.atomic_numbers, TINY.r_max, "train.xyz", dtype=torch.float64,
                                stress_key="REF_stress", checks=mk_checks())
        note = label_scale_note(teacher, graphs, stress=True)
        assert "forces" not in note and "energies spread" not in note
        if expect is None:
            assert note == "" and label_scale_note(teacher, graphs) == ""
        else:
            assert re_search(r"^note: the training labels' stresses \(RMS [\d.e-]+ eV/Å³ over 6 frames\) are "
                             + expect + ".*VASP's and LAMMPS' pressure tensors have the opposite sign", note), note
            assert label_scale_note(teacher, graphs) == ""  # without stresses in the loss: no stress note


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_stress_run_on_cuda_matches_the_cpu_run(stress_files, tmp_path):
    """The same run on stresses on the GPU and on the CPU (float64): the same errors."""
    kw = dict(train=str(stress_files / "train.xyz"), valid=str(stress_files / "valid.xyz"),
              model=str(stress_files / "base.pt"), method="mmea", epochs=2, batch_size=3, progress=False,
              w_stress=10.0, allow_small_cells=True)
    cpu = finetune(FinetuneConfig(out_dir=str(tmp_path / "c"), device="cpu", **kw), **QUIET)
    gpu = finetune(FinetuneConfig(out_dir=str(tmp_path / "g"), device="cuda", **kw), **QUIET)
    for k in ("stress_mae_meV_per_A3", "forces_mae_meV_per_A", "loss"):
        assert math.isclose(gpu["valid"][k], cpu["valid"][k], rel_tol=1e-6), k


def test_progress_bar_and_log_on_a_run_on_stresses(stress_files, tmp_path, capsys):
    """The progress bar shows the validation stress MAE; the log line lists the E0s of the elements in
    the training data only (the tiny model knows H, C, O; ethanol has all three, so none is left out)."""
    from mmea_kernels.train.loop import _e0_text

    assert main(["finetune", "--train", str(stress_files / "train.xyz"), "--valid", str(stress_files / "valid.xyz"),
                 "--model", str(stress_files / "base.pt"), "--out", str(tmp_path / "r"), "--epochs", "1",
                 "--batch-size", "3", "--w-stress", "1", "--allow-small-cells", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "σ " in out.err and "meV/Å³" in out.err  # the bar (tqdm) writes to stderr, the table to stdout
    assert "E0s {1: " in out.out and "not in the training data" not in out.out
    frames = ase.io.read(str(stress_files / "train.xyz"), ":")
    for a in frames:
        del a[[n != 1 for n in a.numbers]]  # hydrogen only
    assert _e0_text([1, 6, 8], [0.5, 1.0, 2.0], frames) == "{1: 0.5} (and 2 elements not in the training data)"
    assert _e0_text([1, 6], [0.5, 1.0], frames) == "{1: 0.5} (and 1 element not in the training data)"


def test_bad_stress_data_is_named(stress_files, tmp_path, capsys):
    frames = ase.io.read(str(stress_files / "train.xyz"), ":")
    z, r = TINY.atomic_numbers, TINY.r_max
    missing = [a.copy() for a in frames]
    del missing[2].info["REF_stress"]
    with pytest.raises(KeyError, match=r"frame 2 has no stress under info\['REF_stress'\]"):
        checked_graphs(missing, z, r, "m.xyz", stress_key="REF_stress")
    shaped = [a.copy() for a in frames]
    shaped[1].info["REF_stress"] = np.zeros(4)
    with pytest.raises(DataError, match=r"frame 1: info\['REF_stress'\] has shape \(4,\)"):
        checked_graphs(shaped, z, r, "s.xyz", stress_key="REF_stress")
    nan = [a.copy() for a in frames]
    nan[0].info["REF_stress"] = np.array([0.0, np.nan, 0, 0, 0, 0])
    with pytest.raises(DataError, match=r"frame 0: non-finite stress"):
        checked_graphs(nan, z, r, "n.xyz", stress_key="REF_stress")
    slab = [a.copy() for a in frames]
    slab[3].pbc = [True, True, False]
    with pytest.raises(DataError, match=r"frame 3 has a stress label but is not periodic in all three directions"):
        checked_graphs(slab, z, r, "p.xyz", stress_key="REF_stress")
    checked_graphs(slab, z, r, "p.xyz", checks=mk_checks())  # without stress training the slab is fine
    args = ["finetune", "--train", str(stress_files / "train.xyz"), "--model", str(stress_files / "base.pt"),
            "--out", str(tmp_path / "x"), "--no-progress", "--allow-small-cells"]
    assert main(args + ["--w-stress", "1", "--stress-key", "DFT_stress"]) == 2
    assert "no stress under info['DFT_stress']" in capsys.readouterr().err
    assert main(args + ["--w-stress", "-1"]) == 2
    assert "--w-stress must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def mk_checks():
    from mmea_kernels.train.checks import DataChecks

    return DataChecks(allow_small_cells=True)
