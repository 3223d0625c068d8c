"""A chemist's review of the workflow (2026-12-03): an existing file named as `evaluate --json` is
kept unless --overwrite; E0 files with non-number energies, options a run would not use, bad seeds,
a directory given as data and MD on a structure with nothing to move are refused by name; labels
with the forces' sign flipped or energies in Hartree, a data file cut short at its end, and
validation/test compositions outside the span the E0s are fitted on get a note instead of passing
silently. Small: the shipped model and a few shipped frames; a 1-epoch checkpoint
(``train_checkpoint``) where one is needed."""
import json
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402

from helpers import REPO  # noqa: E402
from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.md import run_md  # noqa: E402
from mmea_kernels.train import FinetuneConfig, finetune  # noqa: E402
from mmea_kernels.train.checks import DataChecks, TruncationWarning, checked_graphs, read_structures  # noqa: E402
from mmea_kernels.train.foundation import load_model, model_info  # noqa: E402
from mmea_kernels.train.loss import label_scale_note  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = REPO / "mmea_kernels" / "assets" / "ethanol_pbe"


def _exit2(capsys, argv, *words):
    """``mmea-kernels argv`` exits 2 (a refusal, or argparse's usage error) naming ``words``."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    for w in words:
        assert w in err, (w, err)


def test_evaluate_json_keeps_an_existing_file_unless_overwrite(tmp_path, capsys, train_checkpoint):
    ck = tmp_path / "checkpoint.pt"
    shutil.copy(train_checkpoint, ck)
    data = f"{DATA / 'test.xyz'}@:2"
    record = tmp_path / "metrics.json"
    record.write_text('{"the run": "record"}')
    _exit2(capsys, ["evaluate", "--checkpoint", ck, "--data", data, "--json", record], "--json", "exists",
           "--overwrite")
    assert record.read_text() == '{"the run": "record"}'
    assert main(["evaluate", "--checkpoint", str(ck), "--data", data, "--json", str(record), "--overwrite"]) == 0
    assert json.loads(record.read_text())["frames"] == 2
    stream = tmp_path / "stream"  # a FIFO (as /dev/stdout in a pipe) is written into, no --overwrite needed
    os.mkfifo(stream)
    got = []
    reader = threading.Thread(target=lambda: got.append(stream.read_text()))
    reader.start()
    assert main(["evaluate", "--checkpoint", str(ck), "--data", data, "--json", str(stream)]) == 0
    reader.join(30)
    assert json.loads(got[0])["frames"] == 2


@pytest.mark.parametrize("value,shown", [("true", "true"), ('"-13.6"', '"-13.6"'), ("null", "null")])
def test_e0_file_with_a_value_that_is_not_a_number_is_refused(tmp_path, capsys, value, shown):
    e0 = tmp_path / "e0.json"
    e0.write_text('{"1": %s, "6": -1029.0, "8": -2041.0}' % value)
    _exit2(capsys, ["finetune", "--train", f"{DATA / 'train.xyz'}@:4", "--e0s", e0, "--out", tmp_path / "run"],
           f"E0 file {e0}", f"the value of '1' is {shown}, not a number")
    assert not (tmp_path / "run").exists()


def test_options_a_run_would_not_use_and_bad_seeds_are_refused(tmp_path, capsys):
    train = f"{DATA / 'train.xyz'}@:4"
    base = ["finetune", "--train", train, "--out", tmp_path / "run"]
    _exit2(capsys, base + ["--valid", f"{DATA / 'valid.xyz'}@:2", "--valid-fraction", "0.3"],
           "--valid-fraction is the share of --train held out when there is no --valid")
    _exit2(capsys, base + ["--no-fused-gate"], "--no-fused-gate keeps the e3nn Gate layers of a sevenn: base",
           "builtin:mace-xtb-small")
    for seed in ("-1", "99999999999999999999", "1.5"):
        _exit2(capsys, base + ["--seed", seed], "--seed must be an integer")
    _exit2(capsys, ["md", "--checkpoint", "x.pt", "--seed", "-1"], "--seed must be an integer in [0, 2**63)")
    _exit2(capsys, base + ["--valid-fraction", "1"], "--valid-fraction must be in (0, 1)")
    _exit2(capsys, ["finetune", "--train", tmp_path, "--out", tmp_path / "run"], "is a directory")
    assert not (tmp_path / "run").exists()


def test_md_on_a_structure_with_nothing_to_move_is_refused():
    for atoms, integrator in ((Atoms("H", positions=[[0, 0, 0]]), {}),
                              (Atoms("Cu", cell=[2.5, 2.5, 2.5], pbc=True), {"ensemble": "nvt"})):
        with pytest.raises(ValueError, match="1 atom with no degree of freedom left to move"):
            run_md(atoms, None, steps=1, **integrator)


def _graphs(frames):
    model = load_model("builtin:mace-xtb-small", dtype=torch.float64)
    z, r_max = model_info(model)
    return model, checked_graphs(frames, z, r_max, "train.xyz", dtype=torch.float64, checks=DataChecks())


def test_flipped_forces_and_energies_in_hartree_get_a_note():
    frames = ase.io.read(str(DATA / "train.xyz"), ":8")
    model, graphs = _graphs(frames)
    assert label_scale_note(model, graphs) == ""  # eV and eV/Å, -dE/dx: no note
    from mmea_kernels.app.calculator import MMEACalculator

    calc = MMEACalculator(module=model)
    flipped = [a.copy() for a in frames]
    for a in flipped:  # labels that are the model's own forces, negated: cosine exactly -1
        b = a.copy()
        b.calc = calc
        a.arrays["REF_forces"] = -b.get_forces()
    note = label_scale_note(model, _graphs(flipped)[1])
    assert note == ("note: the training labels' forces point against the base model's on the same frames (cosine "
                    "-1.00 over 8 frames): energy gradients (dE/dx) stored as forces look like this; forces must be "
                    "-dE/dx")
    hartree = [a.copy() for a in frames]
    for a in hartree:
        a.info["REF_energy"] = a.info["REF_energy"] / 27.211386
    note = label_scale_note(model, _graphs(hartree)[1])
    spread = np.std([a.info["REF_energy"] for a in hartree], ddof=1)
    assert note.startswith("note: the training labels' energies spread 0.0") and f"{spread:.3g} eV against" in note


def test_a_file_cut_short_at_its_end_gets_a_warning(tmp_path, capsys, train_checkpoint):
    text = (DATA / "train.xyz").read_text()
    whole = tmp_path / "whole.xyz"
    whole.write_text(text)
    cut = tmp_path / "cut.xyz"
    cut.write_text(text.rstrip("\n")[:-6])  # the last force component cut mid-number, as a killed writer leaves it
    with pytest.warns(TruncationWarning, match=r"cut.xyz does not end with a line break"):
        frames = read_structures(str(cut))
    assert len(frames) == len(ase.io.read(str(whole), ":"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        read_structures(str(whole))
    with warnings.catch_warnings():  # the command line prints it as one line, as its errors
        warnings.simplefilter("always")
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(train_checkpoint), "--data", f"{cut}@:2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmea-kernels evaluate: warning: data file {cut} does not end"), err


def test_valid_and_test_compositions_outside_the_fitted_span_get_a_note(tmp_path):
    frames = ase.io.read(str(DATA / "train.xyz"), ":6")
    other = []
    for a in ase.io.read(str(DATA / "valid.xyz"), ":2"):
        keep = np.flatnonzero(np.arange(len(a)) != np.flatnonzero(a.numbers == 1)[0])  # one H less: C2H5O
        b = Atoms(a.numbers[keep], positions=a.positions[keep])
        b.info["REF_energy"] = a.info["REF_energy"]
        b.arrays["REF_forces"] = a.arrays["REF_forces"][keep]
        other.append(b)
    ase.io.write(str(tmp_path / "train.xyz"), frames)
    ase.io.write(str(tmp_path / "other.xyz"), other)
    lines = []
    finetune(FinetuneConfig(train=str(tmp_path / "train.xyz"), valid=str(tmp_path / "other.xyz"),
                            test=str(tmp_path / "other.xyz"), epochs=1, batch_size=3, out_dir=str(tmp_path / "run"),
                            progress=False), log=lines.append)
    notes = [ln for ln in "\n".join(lines).splitlines() if "outside the span of the training compositions" in ln]
    assert len(notes) == 2, lines
    assert notes[0].startswith("note: --valid: 2 of 2 frames") and "this run's E0s" in notes[0] \
        and "the validation loss, which picks the best epoch" in notes[0] and "C2H5O" in notes[0]
    assert notes[1].startswith("note: --test: 2 of 2 frames")


def test_a_file_as_out_a_directory_as_checkpoint_and_a_raw_pickle_are_named(tmp_path, capsys, train_checkpoint):
    import pickle

    afile = tmp_path / "afile"
    afile.write_text("")
    _exit2(capsys, ["finetune", "--train", f"{DATA / 'train.xyz'}@:4", "--out", afile],
           f"output directory {afile} is a file, not a directory")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(train_checkpoint, run / "checkpoint.pt")
    data = f"{DATA / 'test.xyz'}@:1"
    _exit2(capsys, ["evaluate", "--checkpoint", run, "--data", data],
           f"checkpoint {run} is a directory; the run's checkpoint is {run / 'checkpoint.pt'}")
    (tmp_path / "empty").mkdir()
    _exit2(capsys, ["evaluate", "--checkpoint", tmp_path / "empty", "--data", data],
           f"checkpoint {tmp_path / 'empty'} is a directory; give a file")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["evaluate", "--checkpoint", str(raw), "--data", data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not plain tensor data" in err[0], err
    assert not [w for w in seen if "pickle protocol" in str(w.message)]  # torch's notice about the file refused

