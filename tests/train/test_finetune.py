"""The fine-tuning workflow: CLI end to end, evaluate reproduces the reported errors, resume gives
the same result, methods train what they say, E0 re-fit, ASE calculator, bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.train import FinetuneConfig, evaluate_checkpoint, finetune, load_finetuned, refit_e0s  # noqa: E402
from mmea_kernels.train.foundation import fingerprint, load_model, save_model  # noqa: E402
from mmea_kernels.train.methods import METHODS, apply_method  # noqa: E402
from mmea_kernels.integrations.mace import PRESETS, atoms_to_batch, build_mace, energy_and_forces  # noqa: E402

from helpers import TOL  # noqa: E402

TINY = PRESETS["tiny"]  # H, C, O


@pytest.fixture(scope="module")
def files(train_files):
    """The tiny base model and Morse-labelled xyz files (conftest's ``train_files``)."""
    return train_files


def _cli(files, out, *extra):
    return main(["finetune", "--train", str(files / "train.xyz"), "--valid", str(files / "valid.xyz"),
                 "--test", str(files / "test.xyz"), "--model", str(files / "base.pt"), "--out", str(out),
                 "--epochs", "2", "--batch-size", "4", "--no-progress", *extra])


def test_cli_end_to_end_and_evaluate_reproduces(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(files, out, "--method", "mmea", "--w-energy", "10", "--w-forces", "100") == 0
    for name in ("checkpoint.pt", "metrics.json", "learning_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "mmea" and m["test"]["frames"] == 6 and len(m["history"]) == 2
    assert m["trainable_parameters"] > 0
    capsys.readouterr()
    js = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(files / "test.xyz"),
                 "--json", str(js)]) == 0
    ev = json.loads(js.read_text())
    for k in ("energy_mae_meV", "forces_mae_meV_per_A", "energy_rmse_meV", "forces_rmse_meV_per_A", "loss"):
        assert math.isclose(ev[k], m["test"][k], rel_tol=1e-9), k  # the loss with the run's weights (10, 100)
    assert f"{m['test']['forces_mae_meV_per_A']:.3f}" in capsys.readouterr().out
    for extra in (["--batch-size", "1"], ["--max-batch-atoms", "10"], ["--max-batch-atoms", "0"]):  # other batches
        assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(files / "test.xyz"),
                     "--json", str(js), "--overwrite", *extra]) == 0
        other = json.loads(js.read_text())
        for k in ("energy_mae_meV", "forces_mae_meV_per_A", "energy_rmse_meV", "forces_rmse_meV_per_A", "loss"):
            assert math.isclose(other[k], ev[k], rel_tol=1e-9), (extra, k)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(files / "test.xyz"),
                 "--max-batch-atoms", "-2"]) == 2
    assert "--max-batch-atoms must be a whole number >= 0 (0: no limit), got -2" in capsys.readouterr().err
    many = [a.copy() for a in ase.io.read(str(files / "test.xyz"), ":")] * 50  # 300 frames: two graph chunks
    many = [a.copy() for a in many]
    many[280].positions[1] = many[280].positions[0] + [0.1, 0.0, 0.0]
    ase.io.write(str(tmp_path / "many.xyz"), many)
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(tmp_path / "many.xyz")]) == 2
    assert "frame 280: atoms 0 and 1 are 0.1 Å apart" in capsys.readouterr().err  # numbered as in the file
    # the adapter-only checkpoint holds adapter tensors only
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["trainable"] and all(".mmea_" in n for n in ck["trainable"])


def test_training_improves_and_checkpoint_is_best_ema(files, tmp_path):
    cfg = FinetuneConfig(train=str(files / "train.xyz"), valid=str(files / "valid.xyz"), model=str(files / "base.pt"),
                         out_dir=str(tmp_path / "r"), method="elora", epochs=6, batch_size=4, progress=False,
                         ema_decay=0.5)
    m = finetune(cfg, log=lambda *_: None)
    losses = [h["valid"]["loss"] for h in m["history"]]
    assert min(losses) < losses[0]
    best = int(np.argmin(losses)) + 1
    assert m["best_epoch"] == best
    assert math.isclose(m["valid"]["loss"], losses[best - 1], rel_tol=1e-9)  # final model = best EMA weights


def test_resume_gives_the_same_result(files, tmp_path):
    kw = dict(train=str(files / "train.xyz"), valid=str(files / "valid.xyz"), model=str(files / "base.pt"),
              method="mmea-paper", epochs=4, batch_size=4, progress=False, rank=4)
    full = finetune(FinetuneConfig(out_dir=str(tmp_path / "a"), **kw), log=lambda *_: None)
    part = finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), stop_after=2, **kw), log=lambda *_: None)
    assert part["stopped"] == "stop_after"
    with pytest.raises(FileExistsError, match="resume"):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), **kw), log=lambda *_: None)
    res = finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), resume=True, **kw), log=lambda *_: None)
    assert [h["valid"]["loss"] for h in res["history"]] == [h["valid"]["loss"] for h in full["history"]]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["trainable"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"belongs to a run with other settings: --lr 0\.01 there, 0\.001 now; "
                                         r"resume with the run's settings") as info:
        finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), resume=True, **dict(kw, lr=1e-3)), log=lambda *_: None)
    assert "{" not in str(info.value)  # the settings that differ, not both whole settings dicts
    with pytest.raises(ValueError, match=r"--method 'mmea-paper' there, 'mmea' now; --rank 4 there, 2 now"):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), resume=True, **dict(kw, method="mmea", rank=2)),
                 log=lambda *_: None)
    # the results of a run whose state.pt is gone are not overwritten by a new run (resumed or not)
    (tmp_path / "b" / "state.pt").unlink()
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    for resume in (False, True):
        with pytest.raises(FileExistsError, match=r"holds checkpoint\.pt and metrics\.json of an earlier run but no "
                                                  r"state\.pt"):
            finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), resume=resume, **kw), log=lambda *_: None)
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before


def test_resume_auto_starts_continues_and_leaves_a_finished_run(files, tmp_path, capsys):
    """``--resume auto`` (requeued job scripts): a fresh --out starts a run, the same command after an
    interruption continues it, and after the run finished neither trains nor rewrites anything; plain
    --resume still needs a state.pt, and another value is refused."""
    out = tmp_path / "r"
    assert _cli(files, out, "--resume", "auto", "--stop-after", "1") == 3  # started, then 'interrupted'
    assert torch.load(out / "state.pt", weights_only=False)["epoch"] == 1
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    assert _cli(files, out, "--resume", "auto") == 0
    assert "resuming" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["config"]["resume"] == "auto"
    files_before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert _cli(files, out, "--resume", "auto") == 0
    assert "holds a finished run (epoch 2, best 2; metrics.json): all 2 epochs done; a larger --epochs trains on" \
        in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == files_before
    # the API's form: the stored metrics back, nothing written
    kw = dict(train=str(files / "train.xyz"), valid=str(files / "valid.xyz"), test=str(files / "test.xyz"),
              model=str(files / "base.pt"), epochs=2, batch_size=4, progress=False)
    assert finetune(FinetuneConfig(out_dir=str(out), resume="auto", **kw), log=lambda *_: None) == m
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == files_before
    assert _cli(files, tmp_path / "new", "--resume") == 2  # plain --resume: there must be a run to continue
    assert "--resume auto" in capsys.readouterr().err and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):
        _cli(files, tmp_path / "new", "--resume", "yes")
    with pytest.raises(ValueError, match=r"resume must be False, True or 'auto'.*'yes'"):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "new"), resume="yes", **kw), log=lambda *_: None)
    from types import SimpleNamespace as NS

    from mmea_kernels.train.loop import _nothing_left

    cfg = FinetuneConfig(train="t.xyz", epochs=9, patience=1)  # an early-stopped run is finished too
    assert _nothing_left(cfg, NS(start_epoch=4, best={"epoch": 2})) and not _nothing_left(cfg, NS(start_epoch=3, best={"epoch": 2}))


def test_resume_refuses_inputs_replaced_under_the_same_name(files, tmp_path):
    """The base model or a data file replaced under the same path between the runs: a resume would
    pair adapters trained on the old inputs with the new ones (found in review); refused by name."""
    import shutil

    for name in ("base.pt", "train.xyz", "valid.xyz"):
        shutil.copy(files / name, tmp_path / name)
    kw = dict(train=str(tmp_path / "train.xyz"), valid=str(tmp_path / "valid.xyz"), model=str(tmp_path / "base.pt"),
              method="mmea", epochs=3, batch_size=4, progress=False, rank=2)
    finetune(FinetuneConfig(out_dir=str(tmp_path / "r"), stop_after=1, **kw), log=lambda *_: None)
    torch.manual_seed(1)
    save_model(build_mace(TINY), TINY, tmp_path / "base.pt")  # other weights, same name
    with pytest.raises(ValueError, match="other inputs under the same names: base model changed"):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "r"), resume=True, **kw), log=lambda *_: None)
    shutil.copy(files / "base.pt", tmp_path / "base.pt")
    ase.io.write(str(tmp_path / "train.xyz"), ase.io.read(str(files / "train.xyz"), ":")[:-1])
    with pytest.raises(ValueError, match="other inputs under the same names: --train changed"):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "r"), resume=True, **kw), log=lambda *_: None)
    shutil.copy(files / "train.xyz", tmp_path / "train.xyz")
    assert finetune(FinetuneConfig(out_dir=str(tmp_path / "r"), resume=True, **kw), log=lambda *_: None)["best_epoch"]


def test_resume_takes_one_file_named_relative_or_absolute_as_one_setting(files, tmp_path, monkeypatch):
    """--train, --valid, --test, --model, --model-config and --e0s name the same file relative, absolute,
    with ./ or a trailing slash: the same setting (a resume was refused for it); the selection of a
    data file and named models stay as given; another file, even with the same content, is refused.
    A run started with relative paths resumes from another working directory naming the same files."""
    import shutil

    from mmea_kernels.train.config import config_key

    for name in ("base.pt", "train.xyz", "valid.xyz", "test.xyz"):
        shutil.copy(files / name, tmp_path / name)
    (tmp_path / "e0s.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    rel = dict(train="train.xyz@:10", valid="./valid.xyz", test="test.xyz", model="base.pt", model_config="e0s.json",
               e0s="sub/../e0s.json")
    forms = [dict(train=str(tmp_path / "train.xyz") + "@:10", valid=str(tmp_path / "valid.xyz"),
                  test=f"{tmp_path}/./test.xyz", model=str(tmp_path / "base.pt"), model_config=f"{tmp_path}//e0s.json",
                  e0s="./e0s.json/")]
    assert all(config_key(FinetuneConfig(**f)) == config_key(FinetuneConfig(**rel)) for f in forms)
    for other in (dict(train="train.xyz@:9"), dict(train="valid.xyz@:10"), dict(model="preset:tiny"),
                  dict(e0s="keep"), dict(test=None)):
        assert config_key(FinetuneConfig(**dict(rel, **other))) != config_key(FinetuneConfig(**rel)), other
    assert json.loads(config_key(FinetuneConfig(train="t.xyz", model="builtin:mace-xtb-small", e0s="average"))) \
        ["model"] == "builtin:mace-xtb-small"
    # end to end: started here with relative paths, resumed from sub/ with ../ paths, then absolute ones
    kw = dict(method="mmea", rank=2, epochs=3, batch_size=4, progress=False)
    quiet = dict(log=lambda *_: None)
    finetune(FinetuneConfig(train="train.xyz", valid="./valid.xyz", model="base.pt", out_dir="r", stop_after=1, **kw),
             **quiet)
    monkeypatch.chdir(tmp_path / "sub")
    res = finetune(FinetuneConfig(train="../train.xyz", valid="../valid.xyz", model="./../base.pt", out_dir="../r",
                                  stop_after=1, resume=True, **kw), **quiet)
    assert res == {"stopped": "stop_after", "epoch": 2}
    shutil.copy(tmp_path / "train.xyz", tmp_path / "copy.xyz")
    with pytest.raises(ValueError, match=r"other settings: --train '/.*/train\.xyz' there, '/.*/copy\.xyz' now;"):
        finetune(FinetuneConfig(train=str(tmp_path / "copy.xyz"), valid=str(tmp_path / "valid.xyz"),
                                model=str(tmp_path / "base.pt"), out_dir=str(tmp_path / "r"), resume=True, **kw), **quiet)
    res = finetune(FinetuneConfig(train=str(tmp_path / "train.xyz"), valid=str(tmp_path / "valid.xyz"),
                                  model=str(tmp_path / "base.pt"), out_dir=str(tmp_path / "r"), resume=True, **kw), **quiet)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    monkeypatch.chdir(tmp_path)  # one more epoch, with relative paths: the checkpoint is written again
    res = finetune(FinetuneConfig(train="train.xyz", valid="valid.xyz", model="base.pt", out_dir="r", resume=True,
                                  **dict(kw, epochs=4)), **quiet)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    # the checkpoint names its base model by absolute path: it loads from any working directory ...
    monkeypatch.chdir(tmp_path / "sub")
    ckpt_path = tmp_path / "r" / "checkpoint.pt"
    assert torch.load(ckpt_path, weights_only=True)["model"] == os.path.join(os.path.abspath(tmp_path), "base.pt")
    load_finetuned(ckpt_path)
    # ... a project moved elsewhere loads from its own directory (the path as given at training) ...
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("base.pt", "r"):
        (tmp_path / name).rename(moved / name)
    monkeypatch.chdir(moved)
    load_finetuned("r/checkpoint.pt")
    # ... and a base model gone from both is named, with the way to name it again (weights still checked)
    monkeypatch.chdir(tmp_path / "sub")
    with pytest.raises(FileNotFoundError, match=r"names the base model '/.*/base\.pt', which is not there .*--model PATH"):
        load_finetuned(moved / "r" / "checkpoint.pt")
    load_finetuned(moved / "r" / "checkpoint.pt", model=str(moved / "base.pt"))


def test_resume_follows_a_data_link_to_a_new_copy_of_the_same_files(files, tmp_path, monkeypatch):
    """A requeued job stages its data anew and points a stable link at the copy: the same setting
    (the files' SHA-256 are checked anyway); the path is not resolved through the link."""
    import shutil

    for job in ("scratch1", "scratch2"):
        (tmp_path / job).mkdir()
        for name in ("base.pt", "train.xyz", "valid.xyz"):
            shutil.copy(files / name, tmp_path / job / name)
    monkeypatch.chdir(tmp_path)
    os.symlink("scratch1", "data")
    kw = dict(train="data/train.xyz", valid="data/valid.xyz", model="data/base.pt", out_dir="r", method="mmea", rank=2,
              epochs=2, batch_size=4, progress=False)
    finetune(FinetuneConfig(stop_after=1, **kw), log=lambda *_: None)
    os.remove("data")
    os.symlink("scratch2", "data")
    shutil.rmtree("scratch1")
    res = finetune(FinetuneConfig(resume="auto", **kw), log=lambda *_: None)
    assert [h["epoch"] for h in res["history"]] == [1, 2]


def test_checkpoint_from_a_preset_loads_back(files, tmp_path):
    """A preset's random weights come from a fixed seed, not from the caller's random state: the
    same spec is the same model (fingerprint) however much random state was used before, so a
    checkpoint fine-tuned from ``preset:tiny`` with an adapter method loads back."""
    state = torch.get_rng_state()
    first = fingerprint(load_model("preset:tiny"))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    torch.rand(1000)
    assert fingerprint(load_model("preset:tiny")) == first
    out = tmp_path / "r"
    m = finetune(FinetuneConfig(train=str(files / "train.xyz"), valid=str(files / "valid.xyz"), model="preset:tiny",
                                method="mmea", epochs=2, batch_size=4, out_dir=str(out), progress=False),
                 log=lambda *_: None)
    torch.rand(1000)
    net, ckpt = load_finetuned(out / "checkpoint.pt")  # also checks the checkpoint's own reference prediction
    assert ckpt["base_fingerprint"] == first == m["base_fingerprint"]
    again = evaluate_checkpoint(out / "checkpoint.pt", str(files / "valid.xyz"))
    assert math.isclose(again["loss"], m["valid"]["loss"], rel_tol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_methods_identity_trainable_set_and_equivariance(method):
    torch.manual_seed(0)
    base = build_mace(TINY).double()
    frames = toy_molecules("ethanol", 2, seed=5)
    b = atoms_to_batch(frames, TINY.atomic_numbers, TINY.r_max, dtype=torch.float64)
    e0, f0 = energy_and_forces(base, b)
    import copy

    model = copy.deepcopy(base)
    groups = apply_method(model, method, rank=4, seed=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(groups.values())
    e1, f1 = energy_and_forces(model, b)
    if method == "scratch":
        assert not torch.allclose(e1, e0)
        return
    torch.testing.assert_close(e1, e0, **TOL[torch.float64])  # identity at initialisation
    torch.testing.assert_close(f1, f0, **TOL[torch.float64])
    if method == "readout":
        assert trainable and all(n.startswith("readouts.") for n in trainable)
    if method == "mmea-paper":
        kinds = {"parametrizations.weight.original", "parametrizations.weights_max.original"}
        assert not any(any(k in n for k in kinds) for n in trainable)  # frozen originals
        assert any(".A." in n for n in trainable) and any("bessel_weights" in n for n in trainable)
        assert any(".weights.0" in n for n in trainable)
    # random trained-like values everywhere, then O(3): E invariant, F covariant
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rot = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    rot = -rot if torch.det(rot) > 0 else rot  # include a reflection
    rframes = [a.copy() for a in frames]
    for a in rframes:
        a.positions = a.positions @ rot.numpy().T
    br = atoms_to_batch(rframes, TINY.atomic_numbers, TINY.r_max, dtype=torch.float64)
    e, f = energy_and_forces(model, b)
    er, fr = energy_and_forces(model, br)
    assert not torch.allclose(e, e0)
    torch.testing.assert_close(er, e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fr, f @ rot.T, rtol=1e-9, atol=1e-9)


def test_low_rank_delta_matches_manual_update():
    from mmea_kernels.train.methods import LowRankDelta

    torch.manual_seed(0)
    w = torch.randn(2 * 3 + 4 * 5 + 3, dtype=torch.float64)
    blocks = [(0, 2, 3), (6, 4, 5)]
    lr = LowRankDelta(blocks, rank=2, alpha=2.0, dtype=torch.float64, device="cpu")
    for b in lr.B:
        b.data.normal_()
    out = lr(w)
    ref = w.clone()
    ref[0:6] += (2.0 / 2) * (lr.A[0] @ lr.B[0]).reshape(-1)
    ref[6:26] += (2.0 / 2) * (lr.A[1] @ lr.B[1]).reshape(-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    assert lr.A[0].shape == (2, 2) and lr.B[1].shape == (2, 5)


def test_e0_refit_recovers_known_offsets():
    torch.manual_seed(0)
    model = build_mace(TINY).double()
    frames = toy_molecules("ethanol", 3, seed=6) + toy_molecules("toluene", 3, seed=7)
    b = atoms_to_batch(frames, TINY.atomic_numbers, TINY.r_max, dtype=torch.float64)
    e_model, _ = energy_and_forces(model, b)
    # H/C/O counts of ethanol and toluene do not determine 3 elements; use a third composition
    water = ase.Atoms("OH2", positions=[(0, 0, 0), (0.96, 0, 0), (-0.24, 0.93, 0)])
    frames.append(water)
    e_w, _ = energy_and_forces(model, atoms_to_batch([water], TINY.atomic_numbers, TINY.r_max, energy_key="x",
                                                     forces_key="y", dtype=torch.float64))
    e_all = torch.cat([e_model, e_w]).detach().numpy()
    offsets = {1: -13.6, 6: -1029.5, 8: -2041.2}
    for a, e in zip(frames, e_all):
        a.info["REF_energy"] = float(e) + sum(offsets[int(z)] for z in a.numbers)  # E0_old are 0 in TINY
    got = refit_e0s(model, frames, TINY.atomic_numbers, "lstsq", "REF_energy")
    np.testing.assert_allclose(got, [offsets[z] for z in TINY.atomic_numbers], rtol=0, atol=1e-8)
    avg = refit_e0s(model, frames, TINY.atomic_numbers, "average", "REF_energy")  # mace-torch's name for it
    np.testing.assert_allclose(avg, got, rtol=0, atol=0)


def test_e0_refit_on_one_composition_changes_the_base_e0s_as_little_as_it_can():
    """Ethanol only (its counts determine one combination of the E0s), 5 eV lower per molecule at
    the new level of theory: the fit reproduces the training energies, changes the base E0s by the
    least (the minimum-norm correction) and leaves N, absent from the data, alone. The old
    minimum-norm fit of the absolute E0s gave H -616 eV and N 0 (found in review)."""
    from mmea_kernels.train.e0s import set_e0s

    torch.manual_seed(0)
    model = build_mace(PRESETS["xtb-small"]).double()
    zs = [int(z) for z in PRESETS["xtb-small"].atomic_numbers]
    assert zs == [1, 6, 7, 8]
    base_e0 = np.array([-13.0, -1030.0, -1480.0, -2040.0])
    set_e0s(model, list(base_e0))
    frames = toy_molecules("ethanol", 3, seed=6)
    b = atoms_to_batch(frames, zs, float(model.r_max), dtype=torch.float64)
    for a, e in zip(frames, energy_and_forces(model, b)[0].detach().numpy()):
        a.info["REF_energy"] = float(e) - 5.0
    delta = np.array(refit_e0s(model, frames, zs, "lstsq", "REF_energy")) - base_e0
    counts = np.array([6.0, 2.0, 0.0, 1.0])  # C2H6O
    assert counts @ delta == pytest.approx(-5.0, abs=1e-8)
    np.testing.assert_allclose(delta, -5.0 * counts / (counts @ counts), atol=1e-8)
    assert delta[2] == 0.0


def test_ase_calculator_forces_are_minus_energy_gradient(files, tmp_path):
    from mmea_kernels.app.calculator import MMEACalculator, nve_drift

    out = tmp_path / "r"
    finetune(FinetuneConfig(train=str(files / "train.xyz"), valid=str(files / "valid.xyz"), model=str(files / "base.pt"),
                            out_dir=str(out), method="mmea", epochs=1, batch_size=4, progress=False), log=lambda *_: None)
    calc = MMEACalculator(checkpoint=str(out / "checkpoint.pt"))
    atoms = toy_molecules("ethanol", 1, seed=9)[0]
    atoms.calc = calc
    f = atoms.get_forces()
    net, _ = load_finetuned(out / "checkpoint.pt")
    e_ref, f_ref = energy_and_forces(net, atoms_to_batch([atoms], TINY.atomic_numbers, TINY.r_max, dtype=torch.float64))
    assert math.isclose(atoms.get_potential_energy(), float(e_ref.detach()[0]), rel_tol=1e-12)
    np.testing.assert_allclose(f, f_ref.detach().numpy(), atol=1e-12)
    h = 1e-5
    for i, k in ((0, 0), (3, 2)):
        p = atoms.positions.copy()
        a = atoms.copy(); a.calc = calc; a.positions = p; a.positions[i, k] += h
        ep = a.get_potential_energy()
        a.positions = p.copy(); a.positions[i, k] -= h
        em = a.get_potential_energy()
        assert abs(-(ep - em) / (2 * h) - f[i, k]) < 1e-6 * max(1.0, abs(f[i, k]))
    md = nve_drift(atoms, calc, steps=40, dt_fs=0.25, temperature_K=100)
    assert md["steps"] == 40 and np.isfinite(md["drift_meV_per_atom_per_ps"])
    assert md["max_deviation_meV_per_atom"] < 5.0  # a smooth potential conserves energy at a small step
    with pytest.raises(ValueError, match="exactly one"):
        MMEACalculator()


# ------------------------------------------------------------------------------------ bad input
def _err(capsys):
    return capsys.readouterr().err


def test_missing_keys_named(files, tmp_path, capsys):
    assert _cli(files, tmp_path / "r", "--energy-key", "DFT_energy") == 2
    err = _err(capsys)
    assert "DFT_energy" in err and "train.xyz" in err
    assert _cli(files, tmp_path / "r2", "--forces-key", "DFT_forces") == 2
    assert "DFT_forces" in _err(capsys)


def test_unknown_elements_listed(files, tmp_path, capsys):
    """The first frame and atom with an element the model lacks are named as numbered in the file
    (the validation frames are split off in shuffled order); a model with many elements is summarised
    (SevenNet-0's 89 made a 1.5 kB line)."""
    from mmea_kernels.integrations.mace import check_elements

    frames = []
    for formula in ("CH4", "OH2", "CH4", "NH3", "CH4", "OH2"):
        mol = ase.Atoms(formula)
        mol.positions = [(0, 0, 0), (1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0), (1, 1, 1)][:len(mol)]
        mol.info["REF_energy"] = -1.0
        mol.arrays["REF_forces"] = np.zeros((len(mol), 3))
        frames.append(mol)
    ase.io.write(str(tmp_path / "n.xyz"), frames)
    rc = main(["finetune", "--train", str(tmp_path / "n.xyz"), "--model", str(files / "base.pt"),
               "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress", "--valid-fraction", "0.5"])
    assert rc == 2
    err = _err(capsys)
    assert "n.xyz: frame 3: atom 0 is N (Z=7)" in err and "the data contains N (Z=7)" in err and "H (Z=1)" in err, err
    with pytest.raises(ValueError, match=r"^x: frame 0: atom 0 is N \(Z=7\); .* \(it knows 88 elements \(Z 1\.\.89\), not"):
        check_elements(frames[3:], [z for z in range(1, 90) if z != 7], "x")


def test_mismatched_checkpoint_and_model(files, tmp_path, capsys):
    out = tmp_path / "r"
    assert _cli(files, out, "--epochs", "1") == 0
    torch.manual_seed(123)
    save_model(build_mace(TINY), TINY, tmp_path / "other.pt")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(files / "test.xyz"),
                 "--model", str(tmp_path / "other.pt")]) == 2
    err = _err(capsys)
    assert "fingerprint" in err and "other.pt" in err
    save_model(build_mace(TINY, hidden_irreps="4x0e+4x1o"), dict(TINY.to_dict(), hidden_irreps="4x0e+4x1o"),
               tmp_path / "small.pt")
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(files / "test.xyz"),
                 "--model", str(tmp_path / "small.pt")]) == 2
    assert "small.pt" in _err(capsys)


def test_unwritable_output_directory(files, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _cli(files, blocker / "sub") == 2
    err = _err(capsys)
    assert "not writable" in err and str(blocker / "sub") in err


def test_corrupt_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "r"
    assert _cli(files, out, "--epochs", "1") == 0
    data = (out / "checkpoint.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(bad), "--data", str(files / "test.xyz")]) == 2
    assert "bad.pt" in _err(capsys)
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "foreign.pt"), "--data", str(files / "test.xyz")]) == 2
    assert "mmea_kernels.finetune/1" in _err(capsys)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(files / "test.xyz")]) == 2
    assert "does not exist" in _err(capsys)


def test_only_rank_zero_may_write(tmp_path, monkeypatch):
    import torch.distributed as dist

    from mmea_kernels.train.checkpoint import atomic_save

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    with pytest.raises(RuntimeError, match="process 1 tried to write .*x.pt: only rank 0 writes"):
        atomic_save({"a": 1}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_e0s_json_must_name_every_element(tmp_path):
    model = build_mace(TINY).double()
    frames = toy_molecules("ethanol", 2, seed=1)
    (tmp_path / "e0.json").write_text(json.dumps({"1": -13.6, "6": -1030.0}))
    with pytest.raises(KeyError, match=r"no E0 for elements \[8\]"):
        refit_e0s(model, frames, TINY.atomic_numbers, str(tmp_path / "e0.json"), "REF_energy")
    (tmp_path / "e0.json").write_text(json.dumps({"1": -13.6, "6": -1030.0, "8": -2040.0}))
    assert refit_e0s(model, frames, TINY.atomic_numbers, str(tmp_path / "e0.json"), "REF_energy") == [-13.6, -1030.0, -2040.0]
    with pytest.raises(ValueError, match="lstsq, average, keep or a JSON file"):
        refit_e0s(model, frames, TINY.atomic_numbers, "median", "REF_energy")


def test_mace_only_methods_name_the_problem():
    from e3nn import o3

    net = torch.nn.Sequential(o3.Linear("4x0e+2x1o", "4x0e+2x1o"))
    with pytest.raises(ValueError, match="'readout' needs a model with a `readouts` attribute"):
        apply_method(net, "readout")
    with pytest.raises(ValueError, match="mmea-paper: found nothing for"):
        apply_method(torch.nn.Sequential(o3.Linear("4x0e+2x1o", "4x0e+2x1o")), "mmea-paper")
    with pytest.raises(ValueError, match="unknown fine-tuning method 'lora'"):
        apply_method(net, "lora")


def test_refit_e0s_after_training(files, tmp_path, capsys):
    """--refit-e0s-after: the E0s are re-fitted with the trained model by least squares on the
    training frames, stored in the checkpoint (evaluate reproduces the re-fitted errors); the errors
    before the re-fit are kept beside; forces do not change, and the training energy RMSE cannot
    grow (the old E0s are one of the candidates the least squares minimise over)."""
    out = tmp_path / "run"
    assert _cli(files, out, "--method", "mmea", "--refit-e0s-after") == 0
    m = json.loads((out / "metrics.json").read_text())
    before = m["before_e0_refit"]
    assert m["e0s"] != m["e0s_before_refit"] and len(m["e0s"]) == 3
    assert m["train"]["energy_rmse_meV"] <= before["train"]["energy_rmse_meV"] * (1 + 1e-9)
    for split in ("train", "valid", "test"):
        assert math.isclose(m[split]["forces_mae_meV_per_A"], before[split]["forces_mae_meV_per_A"], rel_tol=1e-9)
    assert "E0s before re-fit" in capsys.readouterr().out
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["e0s"] == m["e0s"]
    js = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(files / "test.xyz"),
                 "--json", str(js)]) == 0
    ev = json.loads(js.read_text())
    assert math.isclose(ev["energy_mae_meV"], m["test"]["energy_mae_meV"], rel_tol=1e-9)
    # the re-fit residual is orthogonal to the compositions: summed per element it vanishes
    frames = ase.io.read(str(files / "train.xyz"), ":")
    net, _ = load_finetuned(out / "checkpoint.pt")
    e_pred = np.concatenate([energy_and_forces(net, atoms_to_batch(frames[i:i + 6], TINY.atomic_numbers, TINY.r_max,
                                                                    dtype=torch.float64))[0].detach().numpy()
                             for i in range(0, len(frames), 6)])
    counts = np.array([[int((a.numbers == z).sum()) for z in TINY.atomic_numbers] for a in frames], dtype=float)
    resid = np.array([a.info["REF_energy"] for a in frames]) - e_pred
    assert np.abs(counts.T @ resid).max() < 1e-6 * np.abs(counts.T @ np.abs(resid)).max() + 1e-9


def test_resume_settings_diff_names_options_as_given():
    """The settings a refused resume names: defaults config_key leaves out (w_stress 0, no adapter
    options) are shown as those values, not '(unset)', and adapter options under their options."""
    from mmea_kernels.train.checkpoint import _settings_diff
    from mmea_kernels.train.config import config_key

    base = FinetuneConfig(train="t.xyz")
    assert _settings_diff(config_key(base), FinetuneConfig(train="t.xyz", w_stress=1.0)) == \
        "--w-stress 0.0 there, 1.0 now"
    assert _settings_diff(config_key(base), FinetuneConfig(train="t.xyz", adapter_options={"phi": "residual"})) == \
        "adapter options (--phi, --init, --alpha) {} there, {'phi': 'residual'} now"


def test_python_api_takes_paths_checks_types_and_leaves_the_random_state(files, tmp_path):
    """From a notebook (a user review): pathlib.Path settings crashed writing metrics.json after the
    whole run (and the directory left then blocked the re-run); wrong types gave bare Python errors;
    finetune / load_finetuned reset torch's global random state to the run's seed."""
    import pathlib

    kw = dict(train=files / "train.xyz", valid=files / "valid.xyz", model=files / "base.pt", method="mmea", rank=2,
              epochs=1, batch_size=4, progress=False)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = finetune(FinetuneConfig(out_dir=tmp_path / f"r{seed}", **kw), log=lambda *_: None)
        draws.append(torch.rand(3))
        assert m["config"]["train"] == str(files / "train.xyz") and (tmp_path / f"r{seed}" / "metrics.json").is_file()
    assert not torch.equal(*draws)  # both were the draws after torch.manual_seed(0)
    torch.manual_seed(1)
    load_finetuned(pathlib.Path(tmp_path / "r1" / "checkpoint.pt"))
    after_load = torch.rand(3)
    torch.manual_seed(2)
    load_finetuned(tmp_path / "r1" / "checkpoint.pt")
    assert not torch.equal(after_load, torch.rand(3))
    frames = ase.io.read(str(files / "train.xyz"), ":2")
    for bad, expect in [(dict(epochs="10"), r"epochs must be an integer, got '10' \(str\)"),
                        (dict(lr="1e-3"), r"lr must be a number, got '1e-3' \(str\)"),
                        (dict(batch_size=2.5), r"batch_size must be an integer, got 2\.5"),
                        (dict(train=frames), r"train must be a file path .*got list; frames in memory: write them "
                                             r"first with ase\.io\.write"),
                        (dict(train=None), r"train must be a file path .*got NoneType")]:
        with pytest.raises(TypeError, match=expect):
            finetune(FinetuneConfig(out_dir=tmp_path / "bad", **dict(kw, **bad)), log=lambda *_: None)
    assert not (tmp_path / "bad").exists()
