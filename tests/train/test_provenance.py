"""What a run's files record for a reader who wants to reproduce it (a reproducibility review,
2026-12-01): the validation frames split off ``--train`` (they depend on the order of the frames in
the file, and were recorded nowhere), test frames that are validation frames (not flagged: only
overlaps with the training frames were), versions, threads, command and the data files' full SHA-256,
and a resume at another thread count (not to the bit for full fine-tuning) says so."""
import hashlib
import json

import ase.io
import torch

from mmea_kernels import __version__
from mmea_kernels.app.cli import main
from mmea_kernels.train import FinetuneConfig, finetune


def test_the_split_overlaps_and_provenance_are_recorded(train_files, tmp_path, capsys):
    frames = ase.io.read(str(train_files / "train.xyz"), ":")
    out = tmp_path / "run"

    def argv(out, *extra):
        return ["finetune", "--train", str(train_files / "train.xyz"), "--valid-fraction", "0.25", "--model",
                str(train_files / "base.pt"), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                "--no-progress", "--dtype", "float64", *extra]

    assert main(argv(out)) == 0
    split = json.loads((out / "metrics.json").read_text())["provenance"]["validation_split"]
    assert split["seed"] == 0 and len(split["positions"]) == 3
    valid = [frames[i] for i in split["positions"]]
    ase.io.write(str(tmp_path / "valid.xyz"), valid)
    ase.io.write(str(tmp_path / "test.xyz"), valid[::-1])  # the validation frames again, as the test set
    capsys.readouterr()
    assert main(argv(tmp_path / "leak", "--test", str(tmp_path / "test.xyz"))) == 0
    printed = capsys.readouterr().out
    assert (f"note: 3 of 3 test frames ({tmp_path / 'test.xyz'}) are also validation frames (same atoms and "
            "positions): their errors are not held-out errors") in printed, printed
    metrics = json.loads((tmp_path / "leak" / "metrics.json").read_text())
    rec = metrics["provenance"]
    assert rec["overlap"] == {"test_in_valid": 3}
    # the recorded frames are the validation set: evaluated alone, they give the run's validation errors
    assert main(["evaluate", "--checkpoint", str(tmp_path / "leak" / "checkpoint.pt"), "--data",
                 str(tmp_path / "valid.xyz"), "--json", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert abs(ev["forces_mae_meV_per_A"] - metrics["valid"]["forces_mae_meV_per_A"]) < 1e-9
    assert rec["versions"]["mmea_kernels"] == __version__ and rec["versions"]["torch"] == str(torch.__version__)
    assert rec["intra_op_threads"] == torch.get_num_threads()
    data = rec["data"]["--train"]
    assert data["sha256"] == hashlib.sha256((train_files / "train.xyz").read_bytes()).hexdigest()
    assert data["path"] == str(train_files / "train.xyz") and data["selection"] == ""
    ck = torch.load(str(tmp_path / "leak" / "checkpoint.pt"), weights_only=True)  # plain types only
    assert ck["provenance"] == rec and ck["config"]["valid_fraction"] == 0.25


def test_a_resume_at_another_thread_count_says_so(train_files, tmp_path):
    cfg = dict(train=str(train_files / "train.xyz"), valid=str(train_files / "valid.xyz"),
               model=str(train_files / "base.pt"), out_dir=str(tmp_path / "r"), batch_size=4, progress=False)
    finetune(FinetuneConfig(epochs=1, **cfg), log=lambda *a: None)
    state = torch.load(str(tmp_path / "r" / "state.pt"), weights_only=True)
    assert state["intra_op_threads"] == torch.get_num_threads()
    state["intra_op_threads"] = torch.get_num_threads() + 3
    torch.save(state, str(tmp_path / "r" / "state.pt"))
    lines = []
    finetune(FinetuneConfig(epochs=2, resume=True, **cfg), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any(f"written with {torch.get_num_threads() + 3} intra-op threads, this process has "
               f"{torch.get_num_threads()}" in line for line in lines), lines


def test_numpy_settings_from_python_give_a_loadable_checkpoint(train_files, tmp_path):
    """(diff review) the checkpoint's new ``config`` kept numpy scalars given from Python
    (``lr=np.float64(...)``): weights-only loading then refused the run's own checkpoint."""
    import numpy as np

    from mmea_kernels.train import load_finetuned

    finetune(FinetuneConfig(train=str(train_files / "train.xyz"), valid=str(train_files / "valid.xyz"),
                            model=str(train_files / "base.pt"), out_dir=str(tmp_path / "r"), batch_size=4,
                            epochs=1, lr=np.float64(1e-3), progress=False), log=lambda *a: None)
    _, ck = load_finetuned(str(tmp_path / "r" / "checkpoint.pt"))
    assert type(ck["config"]["lr"]) is float and ck["config"]["lr"] == 1e-3


def test_each_data_file_is_hashed_once_a_run(train_files, tmp_path, monkeypatch):
    """(long runs) the data files' SHA-256 was read for the record and again for every saved state:
    a multi-GB training set paid a full read per epoch. Once a run now, and the state's inputs are
    the same hash's first 16 digits, so a resume still refuses a file replaced under its name."""
    import mmea_kernels.integrations.files as files

    seen = []
    real = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda path, digits=16: seen.append(str(path)) or real(path, digits))
    train, valid = train_files / "train.xyz", train_files / "valid.xyz"
    finetune(FinetuneConfig(train=str(train), valid=str(valid), model=str(train_files / "base.pt"),
                            out_dir=str(tmp_path / "r"), batch_size=4, epochs=3, progress=False), log=lambda *a: None)
    assert sorted(seen) == sorted([str(train), str(valid)]), seen
    state = torch.load(str(tmp_path / "r" / "state.pt"), weights_only=True)
    assert state["epoch"] == 3 and state["inputs"]["--train"] == hashlib.sha256(train.read_bytes()).hexdigest()[:16]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["provenance"]["data"]["--valid"]["sha256"] == hashlib.sha256(valid.read_bytes()).hexdigest()
