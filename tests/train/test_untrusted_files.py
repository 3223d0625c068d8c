"""Files from someone else (an adversarial review, 2026-12-01): a run directory or md state directory
with planted symlinks, a checkpoint whose fallback base path is an output, crafted checkpoint fields,
a TorchScript file where a checkpoint belongs, ``builtin:`` names that are paths. Each case was
reproduced against the code before its fix (the victim file was emptied / overwritten, or an internal
error came out)."""
import copy
import os
import shutil

import pytest
import torch

from mmea_kernels.app.cli import main
from mmea_kernels.train import FinetuneConfig, finetune
from mmea_kernels.train.foundation import load_model

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def run(train_files, tmp_path_factory):
    """A 1-epoch mmea run on the tiny file base: (its directory, the data directory)."""
    d = tmp_path_factory.mktemp("untrusted") / "run"
    finetune(FinetuneConfig(train=str(train_files / "train.xyz"), valid=str(train_files / "valid.xyz"),
                            model=str(train_files / "base.pt"), out_dir=str(d), epochs=1, batch_size=4,
                            progress=False, dtype="float64"), **QUIET)
    return d, train_files


def _finetune(train_files, out, *extra):
    return main(["finetune", "--train", str(train_files / "train.xyz"), "--valid", str(train_files / "valid.xyz"),
                 "--model", str(train_files / "base.pt"), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--no-progress", *extra])


def test_a_planted_lock_link_is_refused_and_its_target_untouched(run, tmp_path, capsys):
    """The run's lock file was opened through a symlink, emptied and written (``PID HOST``): a run
    directory received with ``.mmea-kernels.lock -> ~/notes.txt`` cost the user that file, even when
    the run was then refused. md's ``.NAME.lock`` beside ``--save-state`` the same."""
    from mmea_kernels.app.locks import SiblingLock
    from mmea_kernels.train.lockfile import LockIsLink, hold

    _, data = run
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".mmea-kernels.lock").symlink_to(victim)
    assert _finetune(data, out) == 2
    err = capsys.readouterr().err
    assert "lock file" in err and "is a symbolic link" in err and str(victim) in err and err.count("\n") == 1
    assert victim.read_text() == "precious\n"
    (tmp_path / ".state.npz.lock").symlink_to(victim)
    with pytest.raises(LockIsLink, match="symbolic link"):
        SiblingLock(str(tmp_path / "state.npz"), "--save-state")
    assert victim.read_text() == "precious\n"
    os.mkfifo(tmp_path / "fifo.lock")  # not a file: refused, never waited on
    with pytest.raises(LockIsLink, match="not a regular file"):
        hold(tmp_path / "fifo.lock")


@pytest.mark.parametrize("name", ["learning_curve.png", "checkpoint.pt", "state.pt"])
def test_a_run_never_writes_through_a_link_in_its_directory(run, tmp_path, capsys, name):
    """A fresh run wrote ``learning_curve.png`` through a planted link (the victim became a PNG) and
    created a dangling link's target outside ``--out``; its own files in ``--out`` are now refused
    when they are links (a linked ``--out`` directory is fine: tests/train/test_finetune.py)."""
    _, data = run
    victim = tmp_path / "victim"
    if name != "checkpoint.pt":
        victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    assert _finetune(data, out, *(["--resume"] if name == "state.pt" else [])) == 2
    err = capsys.readouterr().err
    assert f"{out / name} is a symbolic link (to {victim})" in err and err.count("\n") == 1
    assert (victim.read_text() == "precious\n") if name != "checkpoint.pt" else not victim.exists()
    if name == "learning_curve.png":  # (diff review) the refused run let go of its lock: a retry in this process runs
        (out / name).unlink()
        assert _finetune(data, out) == 0


def test_an_output_never_replaces_the_base_model_the_checkpoint_falls_back_to(run, tmp_path, capsys, monkeypatch):
    """A project moved elsewhere: the checkpoint's absolute base path is gone and loading falls back
    to the path given at training (``model_as_given``); that file was not among the inputs outputs
    are checked against, so ``evaluate --json base.pt`` replaced the base model by JSON."""
    d, data = run
    monkeypatch.chdir(tmp_path)
    shutil.copy(data / "base.pt", tmp_path / "base.pt")
    ck = torch.load(str(d / "checkpoint.pt"), weights_only=True)
    ck["model"], ck["model_as_given"] = str(tmp_path / "moved" / "base.pt"), "base.pt"
    torch.save(ck, str(tmp_path / "ck.pt"))
    before = (tmp_path / "base.pt").read_bytes()
    test = str(data / "test.xyz")
    assert main(["evaluate", "--checkpoint", "ck.pt", "--data", test]) == 0  # it loads through the fallback
    for argv in (["evaluate", "--checkpoint", "ck.pt", "--data", test, "--json", "base.pt"],
                 ["export", "--checkpoint", "ck.pt", "--out", "base.pt", "--overwrite"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert "is the checkpoint's base model file: an output never replaces an input" in capsys.readouterr().err
        assert (tmp_path / "base.pt").read_bytes() == before


@pytest.mark.parametrize("key, value, expect", [
    ("adapter_options", {"rank": 3}, "'adapter_options' must be made of phi, init, init_std, backend"),
    ("adapter_options", "abc", "'adapter_options' must be a dict"),
    ("method", "evil", "'method' must be one of mmea"),
    ("rank", "16", "'rank' must be an integer"),
    ("seed", "x", "'seed' must be an integer"),
    ("e0s", "abc", "'e0s' must be a list of finite numbers"),
    ("e0s", [float("nan")] * 4, "'e0s' must be a list of finite numbers"),
    ("e0_span", "zzz", "'e0_span' must be None or the span"),
    ("w_energy", "abc", "'w_energy' must be a finite number >= 0"),
    ("energy_key", 5, "'energy_key' must be a string or None"),
    ("trainable", [1, 2], "'trainable' must be a dict of tensors"),
    ("probe", {"x": 1}, "'probe' must be the reference frame"),
    ("model", 5, "'model' must be a string"),
])
def test_crafted_checkpoint_fields_are_named_not_internal_errors(run, tmp_path, capsys, key, value, expect):
    """Each of these gave an internal error (exit 1: TypeError deep in loading) or a message without the
    file's name ('could not convert string to float', 'holds 3 reference energies' for ``e0s='abc'``)."""
    d, data = run
    ck = copy.copy(torch.load(str(d / "checkpoint.pt"), weights_only=True))
    ck[key] = value
    path = tmp_path / "ck.pt"
    torch.save(ck, str(path))
    assert main(["evaluate", "--checkpoint", str(path), "--data", str(data / "test.xyz")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path}: {expect}" in err and err.count("\n") == 1, err


def test_a_torchscript_file_is_named_as_such_and_builtin_takes_names_only(run, tmp_path, capsys):
    """A TorchScript file given as ``--checkpoint`` was 'truncated?' with torch's advice to load it
    with ``weights_only=False``; ``builtin:`` joined any path (``builtin:../../x``, ``builtin:/abs``)
    onto the assets directory."""
    d, data = run
    ts = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(ts))
    assert main(["evaluate", "--checkpoint", str(ts), "--data", str(data / "test.xyz")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ts} is a TorchScript file" in err and "weights_only" not in err
    shutil.copy(d / "checkpoint.pt", tmp_path / "x.pt")
    from mmea_kernels.train.foundation import ASSETS

    for name in (str(tmp_path / "x"), os.path.relpath(tmp_path / "x", ASSETS)):
        with pytest.raises(FileNotFoundError, match="no built-in model .*a file is named without 'builtin:'"):
            load_model(f"builtin:{name}")


def test_an_older_torch_reads_no_file(tmp_path, monkeypatch):
    """torch < 2.6's weights-only unpickler can be made to run code (CVE-2025-32434): setup.py needs
    torch >= 2.6, and a torch installed past it (``--no-deps``) reads nothing."""
    from mmea_kernels.train import safe_load

    torch.save({"a": torch.zeros(1)}, str(tmp_path / "f.pt"))
    assert safe_load.safe_load(tmp_path / "f.pt", "checkpoint")["a"].shape == (1,)
    monkeypatch.setattr(safe_load, "_TORCH", (2, 5))
    with pytest.raises(ValueError, match="CVE-2025-32434.*install torch >= 2.6"):
        safe_load.safe_load(tmp_path / "f.pt", "checkpoint")
