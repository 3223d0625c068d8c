"""The commands that write files (md, relax, predict, export) never replace one they read, with
--overwrite or without; predict never writes its predictions over the labels of the data; md
refuses an option it would not use whenever it is given, even at its default value; and run_md's
keywords are MDSettings' field names, an unknown one named with the field it likely meant. Small:
a 1-epoch checkpoint of the shipped model (``train_checkpoint``: tests/app/conftest.py) and a few
shipped frames; the refusals come before any model is loaded."""
import os
import shutil

import pytest

pytest.importorskip("mace")
import ase.io  # noqa: E402

from helpers import REPO  # noqa: E402
from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.md import run_md  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = REPO / "mmea_kernels" / "assets" / "ethanol_pbe"


@pytest.fixture
def files(tmp_path, train_checkpoint):
    """A copy of the checkpoint, 3 labelled frames, a copy of the base model, and their bytes."""
    ck = tmp_path / "checkpoint.pt"
    shutil.copy(train_checkpoint, ck)
    s = tmp_path / "s.xyz"
    ase.io.write(str(s), ase.io.read(str(DATA / "train.xyz"), ":3"))
    model = tmp_path / "base.pt"
    shutil.copy(REPO / "mmea_kernels" / "assets" / "mace-xtb-small.pt", model)
    return ck, s, model, {p: p.read_bytes() for p in (ck, s, model)}


def _refused(capsys, argv, *words):
    """``mmea-kernels argv`` exits 2 with a one-line error holding ``words``."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert str(w) in err, (argv, err)
    return err


def test_an_output_is_never_an_input(files, tmp_path, capsys):
    ck, s, model, before = files
    os.link(ck, tmp_path / "hard.pt")  # another name for the same file
    md = ["md", "--checkpoint", ck, "--structure", f"{s}@0", "--steps", "1"]
    cases = [(md + ["--log", ck], "--log", "--checkpoint", ck),
             (md + ["--trajectory", s], "--trajectory", "--structure", s),
             (md + ["--save-state", model, "--model", model], "--save-state", "--model", model),
             (md + ["--log", tmp_path / "hard.pt"], "--log", "--checkpoint", tmp_path / "hard.pt"),
             (["export", "--checkpoint", ck, "--out", ck], "--out", "--checkpoint", ck),
             (["predict", "--checkpoint", ck, "--data", f"{s}@:2", "--out", s], "--out", "--data", s),
             (["relax", "--checkpoint", ck, "--structure", s, "--out", s], "--out", "--structure", s),
             (["relax", "--checkpoint", ck, "--structure", s, "--out", tmp_path / "r.xyz", "--log", model,
               "--model", model], "--log", "--model", model)]
    for argv, out, src, path in cases:
        err = _refused(capsys, argv + ["--overwrite"], f"{out} {path} is the {src} file",
                       "an output never replaces an input")
        assert "\n" not in err.strip()
        assert {p: p.read_bytes() for p in before} == before, argv  # byte-identical
    assert not (tmp_path / "r.xyz").exists()


def test_the_base_model_a_checkpoint_names_and_evaluate_json_are_inputs_too(files, tmp_path, capsys):
    """Without --model, the base model is the file the checkpoint names: no output may replace it
    (an md --log did, and the checkpoint was unusable after); evaluate's --json (rewritten on each call)
    is never one of its inputs either (it replaced the checkpoint)."""
    import torch

    ck, s, model, before = files
    named = tmp_path / "named.pt"
    torch.save(dict(torch.load(str(ck), weights_only=True), model=str(model)), str(named))
    before[named] = named.read_bytes()
    for argv, out in [(["md", "--checkpoint", named, "--structure", f"{s}@0", "--steps", "1", "--log", model,
                        "--overwrite"], "--log"),
                      (["export", "--checkpoint", named, "--out", model, "--overwrite"], "--out"),
                      (["relax", "--checkpoint", named, "--structure", s, "--out", tmp_path / "r.xyz", "--log", model,
                        "--overwrite"], "--log")]:
        _refused(capsys, argv, f"{out} {model} is the checkpoint's base model file")
    for path, src in ((named, "--checkpoint"), (s, "--data"), (model, "checkpoint's base model")):
        _refused(capsys, ["evaluate", "--checkpoint", named, "--data", s, "--json", path], f"--json {path} is the {src}")
    assert {p: p.read_bytes() for p in before} == before


def test_md_save_state_may_be_its_resume_file_but_no_other_output(files, tmp_path, capsys):
    ck, s, _, _ = files
    state = tmp_path / "state.npz"
    assert main(["md", "--checkpoint", str(ck), "--structure", f"{s}@0", "--steps", "1",
                 "--save-state", str(state)]) == 0
    kept = state.read_bytes()
    _refused(capsys, ["md", "--checkpoint", ck, "--resume", state, "--steps", "1", "--log", state, "--overwrite"],
             f"--log {state} is the --resume file")
    assert state.read_bytes() == kept
    # the documented exception: --save-state updates the --resume file in place (no --overwrite)
    assert main(["md", "--checkpoint", str(ck), "--resume", str(state), "--steps", "1",
                 "--save-state", str(state)]) == 0
    assert state.read_bytes() != kept


def test_predict_refuses_a_prefix_that_would_replace_labels(files, tmp_path, capsys):
    ck, s, _, before = files
    out = tmp_path / "p.xyz"
    err = _refused(capsys, ["predict", "--checkpoint", ck, "--data", s, "--out", out, "--prefix", "REF_"],
                   "--prefix REF_", "already holds REF_energy", "choose another --prefix", "--prefix MMEA_")
    assert "\n" not in err.strip() and not out.exists() and s.read_bytes() == before[s]
    assert main(["predict", "--checkpoint", str(ck), "--data", str(s), "--out", str(out)]) == 0  # default MMEA_
    got, ref = ase.io.read(str(out), ":"), ase.io.read(str(s), ":")
    assert [a.info["REF_energy"] for a in got] == [a.info["REF_energy"] for a in ref]  # the labels kept
    assert all("MMEA_energy" in a.info and "MMEA_forces" in a.arrays for a in got)
    _refused(capsys, ["predict", "--checkpoint", ck, "--data", out, "--out", tmp_path / "q.xyz"],
             "--prefix MMEA_", "already holds MMEA_energy", "--prefix PRED_")


def test_md_refuses_unused_options_given_at_their_default(files, tmp_path, capsys):
    ck, s, _, _ = files
    md = ["md", "--checkpoint", ck, "--structure", f"{s}@0", "--steps", "1",
          "--trajectory", tmp_path / "t.traj"]
    for extra, opt, needs in [(["--tdamp", "100"], "--tdamp", "a thermostat"),
                              (["--ensemble", "nve", "--tdamp", "100"], "--tdamp", "a thermostat"),
                              (["--pressure", "1.01325"], "--pressure", "--ensemble npt"),
                              (["--ensemble", "nvt", "--pdamp", "1000"], "--pdamp", "--ensemble npt"),
                              (["--save-state-every", "1000"], "--save-state-every", "--save-state")]:
        _refused(capsys, md + extra, f"{opt} is for {needs}", "would not use it")
    assert not (tmp_path / "t.traj").exists()
    # the Python API: a keyword given counts as given, as does a value other than the default; the error
    # names the keyword (the field), not md's option
    mol = ase.io.read(str(s), 0)
    for kw, needs in [(dict(tdamp_fs=100.0), r"a thermostat \(ensemble='nvt' or 'npt'\)"),
                      (dict(ensemble="nvt", pressure_bar=1.01325), "ensemble='npt'"),
                      (dict(ensemble="nvt", pdamp_fs=1000.0), "ensemble='npt'"),
                      (dict(save_state_every=1000), "save_state")]:
        with pytest.raises(ValueError, match=f"^{list(kw)[-1]} is for {needs}; this run") as info:
            run_md(mol, None, steps=1, **kw)
        assert "--" not in str(info.value)


def test_run_md_names_an_unknown_keyword_and_the_field(files):
    mol = ase.io.read(str(files[1]), 0)
    with pytest.raises(TypeError) as exc:
        run_md(mol, None, ensemble="nvt", temperature=300)
    msg = str(exc.value)
    assert "'temperature'" in msg and "--temperature is the field temperature_K" in msg
    assert all(f in msg for f in ("dt_fs", "temperature_K", "tdamp_fs", "pressure_bar", "pdamp_fs", "steps"))
    with pytest.raises(TypeError, match="unknown keyword 'frobnicate'; the MDSettings fields"):
        run_md(mol, None, frobnicate=1)
