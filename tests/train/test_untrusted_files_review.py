"""Files from someone else, second security review: a hard-linked lock file, a FIFO among a run's own
files, a checkpoint with non-finite or absurd fields, an E0 file with values or keys ``int()`` and
``float()`` take but nothing real has, an extended-XYZ header that declares more atoms than the file
has lines, and the log of ``--resume auto`` on a finished run. Each test was run against the code
before its fix and failed there (a victim file overwritten, a hang, exit 0 with NaN results, an
internal error, a misleading log line)."""
import copy
import json
import os
import shutil

import pytest
import torch

from mmea_kernels.app.cli import main

from test_untrusted_files import _finetune, run  # noqa: E402,F401 - the same finished 1-epoch run, and its CLI call

pytestmark = pytest.mark.usefixtures("one_thread")


def _crafted(run, tmp_path, change) -> str:
    d, _ = run
    ck = copy.copy(torch.load(str(d / "checkpoint.pt"), weights_only=True))
    ck.pop("probe", None)  # an older checkpoint: no reference prediction checks the weights
    change(ck)
    path = tmp_path / "ck.pt"
    torch.save(ck, str(path))
    return str(path)


# --------------------------------------------------------------------------------------- defect 1
def test_a_hard_linked_lock_file_is_refused_and_its_target_untouched(run, tmp_path, capsys):
    """``.mmea-kernels.lock`` hard-linked to a file elsewhere passed O_NOFOLLOW and S_ISREG: taking the
    lock emptied that file and wrote ``PID HOST`` into it. md's ``.NAME.lock`` (SiblingLock) the same."""
    from mmea_kernels.app.locks import SiblingLock
    from mmea_kernels.train.lockfile import LockIsLink, hold

    _, data = run
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / ".mmea-kernels.lock")
    with pytest.raises(LockIsLink, match="hard link"):
        hold(out / ".mmea-kernels.lock")
    assert victim.read_text() == "precious\n"
    assert _finetune(data, out, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert f"the lock file {out / '.mmea-kernels.lock'} is a hard link" in err and err.count("\n") == 1, err
    assert victim.read_text() == "precious\n"
    os.link(victim, tmp_path / ".state.npz.lock")
    with pytest.raises(LockIsLink, match="hard link"):
        SiblingLock(str(tmp_path / "state.npz"), "--save-state")
    assert victim.read_text() == "precious\n" and os.stat(victim).st_nlink == 3  # no name removed either


# --------------------------------------------------------------------------------------- defect 2
def test_a_run_file_that_is_not_a_regular_file_is_refused_not_waited_on(run, tmp_path, capsys):
    """A FIFO named metrics.json in a copied run directory made ``--resume auto`` block for ever reading
    it; any of the run's own files that is not a regular file is now refused by name."""
    from mmea_kernels.train.loop import RUN_FILES, refuse_linked_results

    d, data = run
    for name in RUN_FILES:  # checked directly first: the command would hang without the check
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        os.mkfifo(out / name)
        with pytest.raises(FileExistsError, match=f"{out / name} is not a regular file"):
            refuse_linked_results(out)
    out = tmp_path / "copy"
    shutil.copytree(d, out)
    (out / "metrics.json").unlink()
    os.mkfifo(out / "metrics.json")
    capsys.readouterr()
    assert _finetune(data, out, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert f"{out / 'metrics.json'} is not a regular file (a FIFO)" in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------- defect 3
def test_non_finite_checkpoint_weights_are_refused_by_key(run, tmp_path, capsys):
    """An older checkpoint (no 'probe') whose trainable tensors are NaN gave NaN errors with exit 0."""
    _, data = run

    def nan(ck):
        ck["trainable"] = dict(ck["trainable"])
        first = sorted(ck["trainable"])[0]
        ck["trainable"][first] = torch.full_like(ck["trainable"][first], float("nan"))
    path = _crafted(run, tmp_path, nan)
    assert main(["evaluate", "--checkpoint", path, "--data", str(data / "test.xyz")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path}: 'trainable' must be" in err and "non-finite values" in err and err.count("\n") == 1


def test_predict_refuses_non_finite_predictions(run, tmp_path, capsys):
    """Finite but absurd weights (1e200) overflow in the model: predict wrote inf/NaN energies with exit
    0 (MMEACalculator refused them already)."""
    _, data = run

    def huge(ck):
        ck["trainable"] = {k: torch.full_like(v, 1e200) for k, v in ck["trainable"].items()}
    path = _crafted(run, tmp_path, huge)
    out = tmp_path / "pred.xyz"
    assert main(["predict", "--checkpoint", path, "--data", str(data / "test.xyz") + "@:2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "frame 0: the model gives a non-finite energy" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_evaluate_refuses_non_finite_errors(run, tmp_path, capsys):
    """The same finite but absurd weights: evaluate printed NaN errors with exit 0."""
    _, data = run

    def huge(ck):
        ck["trainable"] = {k: torch.full_like(v, 1e200) for k, v in ck["trainable"].items()}
    path = _crafted(run, tmp_path, huge)
    assert main(["evaluate", "--checkpoint", path, "--data", str(data / "test.xyz") + "@:2"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} on " in err and "non-finite errors" in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------- defect 4
@pytest.mark.parametrize("text, expect", [
    ('{"1": 1%s, "6": -1}' % ("0" * 400), "Z=1: a 401-digit integer"),  # float() overflows: an internal OverflowError
    ('{"1": 1e300, "6": -1}', "Z=1: 1e+300"),  # finite in float64, inf in a float32 model
    ('{"1": -1, "6": -1, "1_0": 5}', "'1_0'"),  # int() reads it as 10
    ('{"1": -1, " 6": -1}', "' 6'"),
], ids=["bigint", "1e300", "underscore", "space"])
def test_e0_file_values_and_keys_nothing_real_has_are_refused(tmp_path, text, expect):
    from mmea_kernels.train.e0s import _given_e0s

    p = tmp_path / "e0s.json"
    p.write_text(text)
    with pytest.raises(ValueError) as info:
        _given_e0s(p, [1, 6], [0.0, 0.0], [], lambda *_: None)
    msg = str(info.value)
    assert f"E0 file {p}" in msg and expect in msg, msg
    p.write_text('{"1": -13.6, "6": -1.5e6}')  # the largest real ones are ~1e6 eV: accepted
    assert _given_e0s(p, [1, 6], [0.0, 0.0], [], lambda *_: None) == [-13.6, -1.5e6]


# --------------------------------------------------------------------------------------- defect 5
def test_an_absurd_adapter_rank_is_refused_before_anything_is_built(run, tmp_path, capsys):
    """rank 10**9 made prepare() allocate gate nets of that width before any shape check."""
    from mmea_kernels.train.checkpoint import read_checkpoint

    _, data = run
    for rank in (10 ** 9, 3):
        path = _crafted(run, tmp_path, lambda ck: ck.update(rank=rank))
        with pytest.raises(ValueError, match=f"checkpoint {path}: 'rank' must be"):
            read_checkpoint(path)  # checked before any model is built (no allocation)
        assert main(["evaluate", "--checkpoint", path, "--data", str(data / "test.xyz")]) == 2
        err = capsys.readouterr().err
        assert f"'rank' must be" in err and "mmea_down.weight" in err and str(rank) in err and err.count("\n") == 1
    path = _crafted(run, tmp_path, lambda ck: ck.update(rank=10 ** 9, trainable={}))  # no adapter weight to match
    with pytest.raises(ValueError, match=f"checkpoint {path}: 'rank' must be at most 4096 when no adapter weight"):
        read_checkpoint(path)


# --------------------------------------------------------------------------------------- defect 6
def _no_ase_read(monkeypatch):
    import ase.io

    def refuse(*a, **k):  # without the header scan ASE's reader spins through 1e12 empty lines
        raise AssertionError("ase.io.read was reached")
    monkeypatch.setattr(ase.io, "read", refuse)


@pytest.mark.parametrize("header, expect", [
    ("1000000000000", "declares 1000000000000 atoms, but only 2 lines follow"),
    ("-5", "the atom count '-5' is not a non-negative integer"),
    ("1_0", "the atom count '1_0' is not a non-negative integer"),
])
def test_an_xyz_header_with_more_atoms_than_lines_is_refused_before_ase_reads(tmp_path, monkeypatch, header, expect):
    from mmea_kernels.train.checks import DataError, read_structures

    p = tmp_path / "bad.xyz"
    good = "2\nProperties=species:S:1:pos:R:3 REF_energy=1.0\nH 0 0 0\nH 0 0 1\n"
    p.write_text(good * 2 + f"{header}\nProperties=species:S:1:pos:R:3 REF_energy=1.0\nH 0 0 0\nH 0 0 1\n")
    # ASE indexes the frame headers up to one past a slice's stop (all of them for an index): so does the scan
    assert len(read_structures(f"{p}@:1")) == 1
    _no_ase_read(monkeypatch)
    for spec in (str(p), f"{p}@:5", f"{p}@-1", f"{p}@0"):
        with pytest.raises(DataError) as info:
            read_structures(spec)
        assert f"data file {p} could not be read (XYZError: frame 2 (line 9): {expect}" in str(info.value)


def test_the_header_scan_is_one_fast_pass(tmp_path):
    """100 000 frames (300 000 lines) scan in well under a second; an '@' in a file's name is no selection."""
    import time

    from mmea_kernels.train.checks import _check_xyz_headers, read_structures

    p = tmp_path / "a@b.xyz"
    p.write_text("1\nc\nH 0 0 0\n" * 100_000)
    t = time.perf_counter()
    _check_xyz_headers(p, slice(None), "data file")
    assert time.perf_counter() - t < 1.0
    p.write_text("1\nc\nH 0 0 0\n" * 3)
    assert len(read_structures(str(p))) == 3 and len(read_structures(f"{p}@1:")) == 2


# --------------------------------------------------------------------------------------- defect 7
def test_resume_auto_on_a_finished_run_says_only_that_it_is_finished(run, tmp_path, capsys):
    d, data = run
    out = tmp_path / "copy"
    shutil.copytree(d, out)
    before = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert _finetune(data, out, "--resume", "auto") == 0
    said = capsys.readouterr().out
    assert "holds a finished run" in said and "resuming" not in said, said
    assert json.loads((out / "metrics.json").read_text()) == before
