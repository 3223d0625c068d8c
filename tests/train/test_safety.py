"""Issue #9: untrusted files never run code, bad data is refused before training with a message that
names it, training that turns non-finite keeps the last good state, checkpoints are self-contained
or refused, nothing half-done is left behind. Small: the shipped model and a few shipped frames."""
import importlib.util
import json
import math
import os
import pathlib
import re

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
import ase  # noqa: E402
import ase.io  # noqa: E402

from mmea_kernels.train import loop as ft  # noqa: E402  (patched: loss, errors, train_one_epoch)
from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.train.foundation import ASSETS, fingerprint, load_model, save_model  # noqa: E402
from mmea_kernels.train.checkpoint import load_finetuned  # noqa: E402

from helpers import REPO  # noqa: E402

DATA = ASSETS / "ethanol_pbe"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train (4 frames), valid (2), test (2) of the shipped PBE ethanol set, and a 1-epoch mmea run."""
    d = tmp_path_factory.mktemp("safety")
    frames = ase.io.read(str(DATA / "train.xyz"), ":8")
    for a in frames:  # keep only what the tests need (no momenta, xtb labels)
        for k in [k for k in a.arrays if k not in ("numbers", "positions", "REF_forces")]:
            del a.arrays[k]
        a.info = {"REF_energy": a.info["REF_energy"]}
    ase.io.write(str(d / "train.xyz"), frames[:4])
    ase.io.write(str(d / "valid.xyz"), frames[4:6])
    ase.io.write(str(d / "test.xyz"), frames[6:8])
    assert _cli(d, d / "mmea") == 0
    return d


def _cli(d, out, *extra, train=None):
    return main(["finetune", "--train", str(train or d / "train.xyz"), "--valid", str(d / "valid.xyz"),
                 "--out", str(out), "--epochs", "1", "--batch-size", "2", "--no-progress", *extra])


def _frames(d, name="train.xyz"):
    return ase.io.read(str(d / name), ":")


def _write(path, frames):
    ase.io.write(str(path), frames)
    return path


# ------------------------------------------------------------------------------ untrusted files
class _Payload:
    """Unpickling this creates the marker file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_crafted_pickle_is_refused_everywhere_and_never_runs(data, tmp_path, capsys):
    from mmea_kernels.app.calculator import MMEACalculator

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "mmea_kernels.finetune/1", "x": _Payload(marker)}, str(evil))
    test = str(data / "test.xyz")
    runs = {
        "evaluate": ["evaluate", "--checkpoint", str(evil), "--data", test],
        "md": ["md", "--checkpoint", str(evil), "--structure", test, "--steps", "2"],
        "finetune --model": ["finetune", "--train", str(data / "train.xyz"), "--model", str(evil), "--out",
                             str(tmp_path / "m"), "--epochs", "1", "--no-progress"],
        "evaluate --model": ["evaluate", "--checkpoint", str(data / "mmea" / "checkpoint.pt"), "--data", test,
                             "--model", str(evil)],
    }
    run = tmp_path / "resume"
    run.mkdir()
    (run / "state.pt").write_bytes(evil.read_bytes())
    runs["--resume"] = ["finetune", "--train", str(data / "train.xyz"), "--valid", str(data / "valid.xyz"),
                        "--out", str(run), "--epochs", "1", "--no-progress", "--resume"]
    for name, argv in runs.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "full unpickling" in err and "refers to getattr" in err and err.count("\n") == 1, (name, err)
        if "--model" in name:
            assert "--trust-pickle" in err, name
        assert not marker.exists(), name
    with pytest.raises(ValueError, match="full unpickling"):
        MMEACalculator(checkpoint=str(evil))
    assert not marker.exists()
    assert not (tmp_path / "m").exists()  # the refused finetune left no directory behind


def test_base_model_specs_never_unpickle_an_untrusted_file(data, tmp_path, capsys, monkeypatch):
    """Found in review, each with a payload that ran: a plain (weights-only-safe) checkpoint naming
    ``sevenn:<path>`` as its base made sevenn unpickle that file in evaluate/md/...; ``sevenn:7net-0``
    read a file called ``7net-0`` from the current directory; ``mace-mp:<path>`` went to
    mace-torch, which unpickles paths. Now: a pretrained name is looked up first, a SevenNet path
    needs --trust-pickle, mace-mp/mace-off take size names only, and a base the checkpoint names is
    never unpickled, even with --trust-pickle (the user names it with --model to vouch for it)."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save(_Payload(marker), str(evil))
    whole = tmp_path / "whole.model"
    torch.save(_Payload(marker), str(whole))
    test = str(data / "test.xyz")

    def crafted(spec):
        path = tmp_path / f"ck-{abs(hash(spec))}.pt"
        torch.save({"format": "mmea_kernels.finetune/1", "method": "mmea", "rank": 4, "model": spec,
                    "base_fingerprint": "0", "e0s": [0.0], "trainable": {}, "seed": 0, "dtype": "float64"}, str(path))
        return str(path)

    cases = [(["evaluate", "--checkpoint", crafted(f"sevenn:{evil}"), "--data", test],
              "a base named by a checkpoint is never unpickled"),
             (["evaluate", "--checkpoint", crafted(f"sevenn:{evil}"), "--data", test, "--trust-pickle"],
              "a base named by a checkpoint is never unpickled"),
             (["md", "--checkpoint", crafted(str(whole)), "--structure", f"{test}@0", "--steps", "1", "--trust-pickle"],
              "a base named by a checkpoint is never unpickled"),
             (["evaluate", "--checkpoint", crafted(f"mace-mp:{whole}"), "--data", test], "not a path"),
             (["finetune", "--train", str(data / "train.xyz"), "--model", f"mace-off:{whole}", "--out",
               str(tmp_path / "m1"), "--epochs", "1", "--no-progress"], "give one of mace-torch's model names"),
             (["finetune", "--train", str(data / "train.xyz"), "--model", f"sevenn:{evil}", "--out",
               str(tmp_path / "m2"), "--epochs", "1", "--no-progress"], "pass --trust-pickle")]
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
        assert not marker.exists(), argv
    if importlib.util.find_spec("sevenn") is not None:  # a file named like a pretrained model is not read
        from mmea_kernels.integrations.sevenn import _checkpoint_path

        monkeypatch.chdir(tmp_path)
        (tmp_path / "7net-0").write_bytes(evil.read_bytes())
        assert pathlib.Path(_checkpoint_path("7net-0")).resolve() != (tmp_path / "7net-0").resolve()
    assert not marker.exists()


def test_unreadable_e0_files_are_named(tmp_path):
    from mmea_kernels.train.e0s import refit_e0s
    from mmea_kernels.train.foundation import load_model

    m = load_model("preset:tiny")
    for text, why in (("[1, 2]", "a JSON list"), ('{"H": 1}', "invalid literal"), ("{", "Expecting")):
        (tmp_path / "e0.json").write_text(text)
        with pytest.raises(ValueError, match=rf"E0 file .*e0\.json: expected a JSON object .*{why}"):
            refit_e0s(m, [], [1, 6, 8], str(tmp_path / "e0.json"), "REF_energy")


def test_an_old_pickle_trajectory_as_structure_is_refused_and_never_runs(data, tmp_path, capsys):
    """ASE's pre-2015 trajectory format is a pickle; md and relax read --structure with ASE, which
    reads .traj files as ULM only (no unpickling), so a crafted one is refused as unreadable."""
    import pickle

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.traj"
    evil.write_bytes(b"PickleTrajectory" + pickle.dumps(_Payload(marker)) + pickle.dumps(_Payload(marker)))
    ck = str(data / "mmea" / "checkpoint.pt")
    for argv in (["md", "--checkpoint", ck, "--structure", str(evil), "--steps", "2"],
                 ["relax", "--checkpoint", ck, "--structure", str(evil), "--out", str(tmp_path / "r.xyz")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "evil.traj could not be read" in err and err.count("\n") == 1, err
        assert not marker.exists()
    assert not (tmp_path / "r.xyz").exists()


def test_whole_pickled_model_needs_trust_pickle(tmp_path):
    base = load_model("builtin:mace-xtb-small")
    torch.save(base, str(tmp_path / "whole.model"))  # a whole-model pickle, as mace-torch writes them
    with pytest.raises(ValueError, match=r"whole\.model .*ScaleShiftMACE.*--trust-pickle"):
        load_model(str(tmp_path / "whole.model"))
    assert fingerprint(load_model(str(tmp_path / "whole.model"), trust_pickle=True)) == fingerprint(base)


def test_a_text_file_as_model_or_checkpoint_is_unreadable_not_a_pickle_to_trust(data, tmp_path, capsys):
    """An .xyz passed where a .pt belongs: torch's weights-only unpickler calls it 'Unsupported
    operand', which once read as a pickle to trust (and --trust-pickle then failed anyway)."""
    xyz = data / "train.xyz"
    for kwargs in ({}, {"trust_pickle": True}):
        with pytest.raises(ValueError, match=r"train\.xyz could not be read as a torch file .*not a zip archive or a "
                                             r"pickle.*is it truncated or not a checkpoint") as info:
            load_model(str(xyz), **kwargs)
        assert "trust" not in str(info.value)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(xyz), "--data", str(xyz)]) == 2
    err = capsys.readouterr().err
    assert "could not be read as a torch file" in err and "--trust-pickle" not in err
    assert _cli(data, tmp_path / "r", "--model", str(xyz)) == 2
    err = capsys.readouterr().err
    assert "could not be read as a torch file" in err and "--trust-pickle" not in err


def test_bare_state_dict_with_model_config(data, tmp_path, capsys):
    """--model-config: the right config gives the same model; a wrong one, a missing file, bad JSON or a
    non-object are named (a wrong architecture once escaped as an 'internal error')."""
    shipped = torch.load(str(ASSETS / "mace-xtb-small.pt"), weights_only=True)
    torch.save(shipped["state_dict"], str(tmp_path / "bare.pt"))
    (tmp_path / "cfg.json").write_text(json.dumps(shipped["config"]))
    base = load_model("builtin:mace-xtb-small")
    assert fingerprint(load_model(str(tmp_path / "bare.pt"), config=str(tmp_path / "cfg.json"))) == fingerprint(base)
    (tmp_path / "narrow.json").write_text(json.dumps(dict(shipped["config"], hidden_irreps="16x0e")))
    (tmp_path / "bad.json").write_text("{hidden_irreps: 16x0e")
    (tmp_path / "list.json").write_text("[1, 2]")
    for cfg, expect in [("narrow.json", r"bare\.pt: the state dict does not fit the config: \d+ tensor\(s\) of another "
                                        r"shape \([\w.]+: \([\d, ]+\) in the file, \([\d, ]+\) for the config"),
                        ("nothere.json", r"model config .*nothere\.json does not exist"),
                        ("bad.json", r"model config .*bad\.json is not JSON \(Expecting"),
                        ("list.json", r"model config .*list\.json holds a JSON list, not an object")]:
        capsys.readouterr()
        assert _cli(data, tmp_path / "r", "--model", str(tmp_path / "bare.pt"),
                    "--model-config", str(tmp_path / cfg)) == 2, cfg
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re_search(expect, err) and "internal error" not in err, err
    assert not (tmp_path / "r").exists()
    # a checkpoint of that base whose config file is gone names the config, not the (present) model
    assert _cli(data, tmp_path / "ok", "--model", str(tmp_path / "bare.pt"), "--model-config", str(tmp_path / "cfg.json"),
                "--method", "mmea") == 0
    (tmp_path / "cfg.json").rename(tmp_path / "cfg-moved.json")
    with pytest.raises(FileNotFoundError, match=r"names the base model's config '/.*/cfg\.json', which is not there"):
        load_finetuned(tmp_path / "ok" / "checkpoint.pt")
    load_finetuned(tmp_path / "ok" / "checkpoint.pt", model=str(tmp_path / "bare.pt"),
                   model_config=str(tmp_path / "cfg-moved.json"))


@pytest.mark.parametrize("extra, expect", [
    (["--w-forces=-1000"], r"--w-forces must be a finite number >= 0, got -1000"),
    (["--w-energy", "nan"], r"--w-energy must be a finite number >= 0, got nan"),
    (["--w-energy", "0", "--w-forces", "0"], r"are all 0: the loss would have no term"),
    (["--clip-grad=-1"], r"--clip-grad must be a finite number >= 0, got -1.0 \(0 turns clipping off\)"),
    (["--patience=-1"], r"--patience must be >= 0 epochs, got -1"),
    (["--plateau-factor", "2"], r"--plateau-factor must be in \(0, 1\)"),
    (["--valid-fraction", "0.2"], r"--valid-fraction is the share of --train held out when there is no --valid"),
    (["--model-config", "x.json"], r"--model-config is for a base model file that holds a bare state dict; "
                                   r"builtin:mace-xtb-small brings its own architecture"),
    (["--model", str(ASSETS / "mace-xtb-small.pt"), "--model-config", "x.json"],
     r"--model-config is for .*mace-xtb-small\.pt holds a whole model"),
    (["--resume"], r"--resume: no .*state\.pt, so no run in --out .* to continue; leave out --resume"),
    (["--method", "full", "--rank", "4"], r"--rank is the adapters' rank; --method full has none"),
    (["--e0s", "nothere.json"], r"--e0s must be lstsq, average, keep or a JSON file of E0s; 'nothere\.json': no such file"),
    (["--e0s", "lsq"], r"--e0s must be .*; 'lsq': none of these"),
])
def test_settings_that_cannot_be_meant_are_refused(data, tmp_path, capsys, extra, expect):
    """Settings a reviewer passed that trained anyway (a negative force weight trains away from the labels, a
    zero loss, a negative patience stopped after one epoch, a --model-config nothing read, --resume of
    nothing started a new run): refused before anything is written."""
    capsys.readouterr()
    assert _cli(data, tmp_path / "r", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re_search(expect, err), err
    assert not (tmp_path / "r").exists()


def test_a_finished_run_without_its_state_is_neither_resumed_nor_replaced(data, tmp_path, capsys):
    """Its checkpoint and metrics without state.pt: --resume says there is nothing to resume and that
    a new run goes elsewhere (not 'leave out --resume', which is refused next); without --resume too."""
    import shutil

    shutil.copytree(data / "mmea", tmp_path / "r")
    (tmp_path / "r" / "state.pt").unlink()
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    for extra, expect in ((["--resume"], r"--resume: no .*state\.pt, so no run .* to continue; it holds a finished "
                                         r"run's results without it: start a new run in another --out"),
                          ([], r"holds checkpoint\.pt and metrics\.json of an earlier run but no state\.pt")):
        capsys.readouterr()
        assert _cli(data, tmp_path / "r", *extra) == 2
        assert re_search(expect, capsys.readouterr().err)
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before


def test_checkpoints_that_kept_an_unused_model_config_still_load(data, tmp_path, capsys):
    """Before --model-config was checked, one given with a model that has its own architecture was
    ignored but saved in the checkpoint: such checkpoints still load (it is ignored again)."""
    ck = torch.load(str(data / "mmea" / "checkpoint.pt"), weights_only=True)
    torch.save(dict(ck, model_config=str(tmp_path / "cfg.json")), str(tmp_path / "old.pt"))
    js = tmp_path / "e.json"
    for c in ("mmea/checkpoint.pt", "old.pt"):
        assert main(["evaluate", "--checkpoint", str(data / c if c.startswith("mmea") else tmp_path / c),
                     "--data", str(data / "valid.xyz"), "--json", str(js), "--overwrite"]) == 0
        capsys.readouterr()
        if c == "mmea/checkpoint.pt":
            want = json.loads(js.read_text())
    assert json.loads(js.read_text()) == want


def test_validation_or_test_frames_that_are_training_frames_are_named(data, tmp_path, capsys):
    """The training frames given again as --test (or some of them as --valid): trained on, so their
    errors are not held-out errors; the run says so (a reviewer's test MAE equalled the valid MAE)."""
    frames = _frames(data)
    _write(tmp_path / "valid.xyz", [frames[1]] + _frames(data, "valid.xyz"))
    capsys.readouterr()
    assert main(["finetune", "--train", str(data / "train.xyz"), "--valid", str(tmp_path / "valid.xyz"), "--test",
                 str(data / "train.xyz"), "--out", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re_search(r"note: 1 of 3 valid frames \(.*valid\.xyz\) and 4 of 4 test frames \(.*train\.xyz\) are also "
                     r"training frames; 1 of 4 test frames \(.*train\.xyz\) are also validation frames \(same atoms "
                     r"and positions\): their errors are not held-out errors", out), out  # (frame 1 is in all three)
    assert _cli(data, tmp_path / "r2") == 0  # held-out files: no note
    assert "are also training frames" not in capsys.readouterr().out


def test_package_files_load_weights_only_including_the_old_format(data, tmp_path, capsys):
    run = data / "mmea"
    for name in ("checkpoint.pt", "state.pt"):
        assert isinstance(torch.load(str(run / name), weights_only=True), dict)
    ck = torch.load(str(run / "checkpoint.pt"), weights_only=True)
    assert {"probe", "trainable", "e0s"} <= set(ck)
    old = {k: v for k, v in ck.items() if k not in ("probe", "buffers")}  # what the code before #9 wrote
    torch.save(old, str(tmp_path / "old.pt"))
    capsys.readouterr()
    for ckpt in (run / "checkpoint.pt", tmp_path / "old.pt"):
        assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data / "valid.xyz"),
                     "--json", str(tmp_path / "e.json"), "--overwrite"]) == 0
        ev = json.loads((tmp_path / "e.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        assert math.isclose(ev["forces_mae_meV_per_A"], metrics["valid"]["forces_mae_meV_per_A"], rel_tol=1e-9)


# ----------------------------------------------------------------------------------- data checks
def _corrupt(d, tmp_path, edit, name="bad.xyz"):
    frames = _frames(d)
    edit(frames)
    return _write(tmp_path / name, frames)


@pytest.mark.parametrize("case, edit, expect", [
    ("nan energy", lambda f: f[2].info.update(REF_energy=float("nan")),
     r"bad\.xyz: frame 2: the energy info\['REF_energy'\] is nan"),
    ("inf forces", lambda f: f[1].arrays["REF_forces"].__setitem__((3, 0), np.inf),
     r"bad\.xyz: frame 1: non-finite forces arrays\['REF_forces'\] on atoms 3"),
    ("nan positions", lambda f: f[3].positions.__setitem__((5, 2), np.nan),
     r"bad\.xyz: frame 3: non-finite positions on atoms 5"),
    ("coincident atoms", lambda f: f[0].positions.__setitem__(4, f[0].positions[1]),
     r"bad\.xyz: frame 0: atoms (1 and 4|4 and 1) are 0 Å apart \(closer than --min-distance 0\.1 Å"),
    ("pbc without lattice", lambda f: setattr(f[1], "pbc", True),
     r"bad\.xyz: frame 1 is periodic along a, b, c .* but has no \(or a degenerate\) lattice along a, b, c"),
    ("small cell", lambda f: [(a.set_cell([3.0, 3.0, 3.0]), a.set_pbc(True)) for a in f],
     r"bad\.xyz: frame 0: the periodic cell is narrower than the model's cutoff 5 Å \(a 3 Å, b 3 Å, c 3 Å wide\)"),
    ("energy not a number", lambda f: f[2].info.update(REF_energy="abc"),
     r"bad\.xyz: frame 2: info\['REF_energy'\] is 'abc', not a number"),
])
def test_bad_data_is_refused_before_training(data, tmp_path, capsys, case, edit, expect):
    bad = _corrupt(data, tmp_path, edit)
    out = tmp_path / "run"
    capsys.readouterr()
    assert _cli(data, out, train=bad) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("mmea-kernels finetune: error: ") and err.count("\n") == 1, err
    import re
    assert re.search(expect, err), err
    assert not out.exists()  # nothing half-done: the directory the command made is gone


def test_neighbour_bound_and_thresholds_are_configurable(data, tmp_path, capsys):
    def dense(f):
        for a in f:
            a.set_cell([11.0, 11.0, 11.0])
            a.pbc = True
    bad = _corrupt(data, tmp_path, dense)
    assert _cli(data, tmp_path / "r", "--max-neighbors", "5", train=bad) == 2
    assert re_search(r"bad\.xyz: frame 0: atom \d+ has \d+ neighbours within the cutoff \(bound 5, --max-neighbors\)",
                     capsys.readouterr().err)
    # a tiny dense cell is caught by the estimate before any neighbour list is built
    def tiny(f):
        for a in f:
            a.set_cell([1.0, 1.0, 1.0], scale_atoms=True)
            a.pbc = True
    bad = _corrupt(data, tmp_path, tiny, "tiny.xyz")
    assert _cli(data, tmp_path / "r", "--allow-small-cells", train=bad) == 2
    assert re_search(r"tiny\.xyz: frame 0: about \d+ neighbours per atom .*\(bound 500", capsys.readouterr().err)
    # atoms 0.5 Å apart pass the default threshold and fail a stricter one
    close = _corrupt(data, tmp_path, lambda f: f[0].positions.__setitem__(4, f[0].positions[1] + [0.5, 0, 0]), "c.xyz")
    from mmea_kernels.train.checks import DataChecks, checked_graphs

    frames = _frames(tmp_path, "c.xyz")
    checked_graphs(frames, [1, 6, 7, 8], 5.0, "c.xyz")
    with pytest.raises(ValueError, match=r"c\.xyz: frame 0: atoms (1 and 4|4 and 1) are 0\.5 Å apart"):
        checked_graphs(frames, [1, 6, 7, 8], 5.0, "c.xyz", checks=DataChecks(min_distance=0.6))
    assert close.exists()


def re_search(pattern, text):
    import re

    assert re.search(pattern, text), text
    return True


def test_a_path_with_an_at_sign_is_read_whole_or_with_a_selection(tmp_path):
    """``runs@v2/train.xyz`` is a file, ``runs@v2/train.xyz@1:3`` a selection of it (the path was
    once split at its first ``@``)."""
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.train.checks import read_structures, split_spec

    d = tmp_path / "runs@v2"
    d.mkdir()
    ase.io.write(str(d / "train.xyz"), toy_molecules("ethanol", 4, seed=1))
    assert len(read_structures(str(d / "train.xyz"))) == 4
    assert len(read_structures(f"{d / 'train.xyz'}@1:3")) == 2
    assert split_spec("a@b/c.xyz@-1") == ("a@b/c.xyz", "-1")


@pytest.mark.parametrize("spec, expect", [
    ("empty.xyz", r"empty\.xyz is empty"),
    ("trunc.xyz", r"trunc\.xyz could not be read \(XYZError: .*\); is it truncated"),
    ("train.xyz@abc", r"train\.xyz@abc: bad frame selection '@abc'"),
    ("train.xyz@1:2:0", r"the step cannot be 0"),
    ("train.xyz@10:", r"train\.xyz@10: selects no frames \(.*train\.xyz has 4 frames\)"),
    ("train.foo", r"train\.foo: ASE cannot tell its format"),
])
def test_unreadable_inputs_name_the_problem(data, tmp_path, capsys, spec, expect):
    (tmp_path / "empty.xyz").write_text("")
    (tmp_path / "trunc.xyz").write_text("".join((data / "train.xyz").read_text().splitlines(True)[:5]))
    (tmp_path / "train.xyz").write_text((data / "train.xyz").read_text())
    (tmp_path / "train.foo").write_text((data / "train.xyz").read_text())
    capsys.readouterr()
    for argv in (["finetune", "--train", str(tmp_path / spec), "--out", str(tmp_path / "r"), "--no-progress"],
                 ["evaluate", "--checkpoint", str(data / "mmea" / "checkpoint.pt"), "--data", str(tmp_path / spec)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re_search(expect, err)
    assert not (tmp_path / "r").exists()


def test_empty_validation_or_test_selection_is_an_error(data, tmp_path, capsys):
    capsys.readouterr()
    assert main(["finetune", "--train", str(data / "train.xyz"), "--valid", str(data / "valid.xyz") + "@5:",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "valid.xyz@5: selects no frames" in capsys.readouterr().err
    assert _cli(data, tmp_path / "r", "--test", str(data / "test.xyz") + "@:0") == 2
    assert "test.xyz@:0 selects no frames" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- training
def test_non_finite_loss_keeps_the_last_good_state(data, tmp_path, monkeypatch):
    kw = dict(train=str(data / "train.xyz"), valid=str(data / "valid.xyz"), epochs=2, batch_size=2, progress=False)
    real_loss, calls = ft.loss, {"n": 0}

    def poisoned(*a, **k):  # NaN from the 2nd batch of epoch 2 on (2 batches per epoch)
        calls["n"] += 1
        v = real_loss(*a, **k)
        return v * float("nan") if calls["n"] >= 4 else v

    monkeypatch.setattr(ft, "loss", poisoned)
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"the training loss is nan in epoch 2, batch 2; .*state\.pt keeps epoch 1, "
                                         r"the last good state \(resumable with --resume\)"):
        ft.finetune(ft.FinetuneConfig(out_dir=str(out), **kw), log=lambda *_: None)
    st = torch.load(str(out / "state.pt"), weights_only=True)
    assert st["epoch"] == 1 and all(torch.isfinite(t).all() for t in st["params"].values())
    monkeypatch.setattr(ft, "loss", real_loss)
    resumed = ft.finetune(ft.FinetuneConfig(out_dir=str(out), resume=True, **kw), log=lambda *_: None)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]  # (resume exactness: test_finetune)
    assert resumed["history"][0] == st["history"][0] and math.isfinite(resumed["valid"]["loss"])
    # NaN in the first epoch: nothing saved, the message says so, the new directory is removed
    calls["n"] = 3
    monkeypatch.setattr(ft, "loss", poisoned)
    with pytest.raises(ValueError, match="no training state was saved"):
        ft.finetune(ft.FinetuneConfig(out_dir=str(tmp_path / "n"), **kw), log=lambda *_: None)
    assert not (tmp_path / "n").exists()


def test_interrupt_message_is_true(data, tmp_path, monkeypatch):
    kw = dict(train=str(data / "train.xyz"), valid=str(data / "valid.xyz"), epochs=3, batch_size=2, progress=False)
    real, calls = ft.train_one_epoch, {"n": 0}

    def interrupted(cfg, r, epoch, *a):
        if epoch == calls["stop"]:
            raise KeyboardInterrupt
        return real(cfg, r, epoch, *a)

    monkeypatch.setattr(ft, "train_one_epoch", interrupted)
    logs = []
    calls["stop"] = 1
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(ft.FinetuneConfig(out_dir=str(tmp_path / "a"), **kw), log=logs.append)
    assert "interrupted in epoch 1, before any epoch finished: no state was saved" in logs[-1]
    assert not (tmp_path / "a").exists()
    calls["stop"] = 2
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(ft.FinetuneConfig(out_dir=str(tmp_path / "b"), **kw), log=logs.append)
    assert f"interrupted in epoch 2; {tmp_path / 'b' / 'state.pt'} holds epoch 1" in logs[-1]
    assert torch.load(str(tmp_path / "b" / "state.pt"), weights_only=True)["epoch"] == 1


# ------------------------------------------------------------------------------------ checkpoints
def test_full_checkpoint_is_self_contained_or_refused(data, tmp_path, capsys):
    out = tmp_path / "full"
    assert _cli(data, out, "--method", "full", "--test", str(data / "test.xyz")) == 0
    saved = json.loads((out / "metrics.json").read_text())["test"]
    ck = torch.load(str(out / "checkpoint.pt"), weights_only=True)
    assert any("scale_shift" in n for n in ck["buffers"])
    # another base: same weights and architecture, other scale/shift (and E0s)
    base = load_model("builtin:mace-xtb-small")
    cfg = torch.load(str(ASSETS / "mace-xtb-small.pt"), weights_only=True)["config"]
    with torch.no_grad():
        base.scale_shift.scale.mul_(1.7)
        base.scale_shift.shift.add_(0.3)
    save_model(base, dict(cfg, scale=float(base.scale_shift.scale), shift=float(base.scale_shift.shift)),
               tmp_path / "other.pt")
    old = {k: v for k, v in ck.items() if k not in ("probe", "buffers")}
    torch.save(old, str(tmp_path / "old.pt"))
    capsys.readouterr()
    js = tmp_path / "e.json"
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data / "test.xyz"),
                 "--model", str(tmp_path / "other.pt"), "--json", str(js)]) == 0
    ev = json.loads(js.read_text())
    for k in ("energy_mae_meV", "forces_mae_meV_per_A"):
        assert math.isclose(ev[k], saved[k], rel_tol=1e-9), k
    assert main(["evaluate", "--checkpoint", str(tmp_path / "old.pt"), "--data", str(data / "test.xyz"),
                 "--model", str(tmp_path / "other.pt")]) == 2
    assert "fingerprint" in capsys.readouterr().err
    # an architecture setting that is no tensor (avg_num_neighbors): the reference prediction catches it
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data / "test.xyz"),
                 "--model", "preset:xtb-small"]) == 2
    assert re_search(r"does not reproduce its own reference prediction \(energy off by .* eV", capsys.readouterr().err)


def test_base_model_with_other_elements(data, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(data / "mmea" / "checkpoint.pt"), "--data", str(data / "test.xyz"),
                 "--model", "preset:tiny"]) == 2
    assert re_search(r"checkpoint .*checkpoint\.pt holds 4 reference energies \(E0s\), but the base model has 3 "
                     r"elements \[1, 6, 8\]", capsys.readouterr().err)


# -------------------------------------------------------------------------------------------- md
def test_md_refuses_bad_settings_and_structures(data, tmp_path, capsys):
    ck = str(data / "mmea" / "checkpoint.pt")
    coincident = _corrupt(data, tmp_path, lambda f: f[0].positions.__setitem__(2, f[0].positions[0]), "co.xyz")
    cases = [(["--structure", str(data / "test.xyz"), "--steps", "0"], "md needs at least 1 step, a whole number, got --steps 0"),
             (["--structure", str(data / "test.xyz"), "--steps", "-1"], "got --steps -1"),
             (["--structure", str(data / "test.xyz"), "--temperature", "-5"], "temperature >= 0 K, got --temperature -5"),
             (["--structure", str(data / "test.xyz") + "@7"], "test.xyz@7: frame 7 does not exist"),
             (["--structure", str(coincident), "--steps", "2"], "co.xyz: frame 0: atoms 0 and 2 are 0 Å apart")]
    for extra, expect in cases:
        capsys.readouterr()
        assert main(["md", "--checkpoint", ck, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, err


def test_md_runs_nvt_with_a_trajectory_and_refuses_to_overwrite_it(data, tmp_path, capsys):
    """The md command end to end (Bussi NVT): the JSON summary on standard output, the trajectory
    (frames 0, 2, 4 with momenta and energies), ASE's log; a second run refuses to replace either,
    and settings that contradict each other exit 2 with one line naming them."""
    ck, test = str(data / "mmea" / "checkpoint.pt"), str(data / "test.xyz")
    traj, log = tmp_path / "md.traj", tmp_path / "md.log"
    args = ["md", "--checkpoint", ck, "--structure", test, "--steps", "4", "--interval", "2", "--ensemble", "nvt",
            "--thermostat", "bussi", "--trajectory", str(traj), "--log", str(log), "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert "holds 2 frames; the first was used" in cap.err  # said, after the run
    assert res["integrator"] == "bussi" and res["steps"] == 4 and np.isfinite(res["drift_meV_per_atom_per_ps"])
    frames = ase.io.read(str(traj), ":")
    assert len(frames) == 3 and all(np.isfinite(f.get_potential_energy()) for f in frames)
    assert np.abs(frames[-1].get_momenta()).max() > 0
    assert len(log.read_text().splitlines()) == 1 + 3  # header + steps 0, 2, 4
    before = traj.read_bytes()
    for extra, expect in (([], "md.traj exists; pass --overwrite"),
                          (["--trajectory", str(tmp_path / "new.traj")], "md.log exists; pass --overwrite"),
                          (["--ensemble", "npt", "--thermostat", "nose-hoover", "--overwrite"],
                           "npt needs a structure periodic in all three directions"),
                          (["--ensemble", "nve", "--overwrite"], "--thermostat bussi needs --ensemble nvt or npt")):
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, err
    assert traj.read_bytes() == before


def test_md_stops_when_energy_turns_non_finite():
    from ase.calculators.calculator import Calculator, all_changes

    from mmea_kernels.app.calculator import nve_drift

    class Blows(Calculator):
        implemented_properties = ["energy", "forces"]
        calls = 0

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            Blows.calls += 1
            bad = Blows.calls > 6
            self.results = {"energy": float("nan") if bad else 0.0, "forces": np.zeros((len(self.atoms), 3))}

    atoms = ase.Atoms("OH2", positions=[(0, 0, 0), (0.96, 0, 0), (-0.24, 0.93, 0)])
    with pytest.raises(ValueError, match=r"md stopped: the total energy is nan at step \d+"):
        nve_drift(atoms, Blows(), steps=20)


# ---------------------------------------------------------------------------------- left behind
def test_load_adapter_state_dict_is_all_or_nothing():
    import mmea_kernels as mk
    from mmea_kernels.integrations.mace import build_mace

    torch.manual_seed(0)
    src = build_mace("tiny")
    mk.inject_adapters(src, method="mmea", rank=4)
    state = mk.adapter_state_dict(src)
    name = sorted(state["state"])[-1]
    state["state"][name] = torch.zeros(3, 3)
    torch.manual_seed(0)
    fresh = build_mace("tiny")
    before = {n: p.detach().clone() for n, p in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=f"adapter weight '{name}' has shape \\(3, 3\\) in the state"):
        mk.load_adapter_state_dict(fresh, state)
    assert not mk.adapted_modules(fresh)
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in fresh.parameters())


def test_rmd17_split_files_are_world_readable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "app"))  # also when run alone
    from test_rmd17_fetch import FAKE, SIZES, _make_archive, _molecule_arrays

    from mmea_kernels.app.rmd17 import fetch_rmd17

    arc = _make_archive(tmp_path / "rmd17.tar.bz2", {"ethanol": _molecule_arrays(FAKE["ethanol"], 0)})
    old = os.umask(0o022)
    try:
        fetch_rmd17(tmp_path / "out", ["ethanol"], archive=str(arc), **SIZES)
    finally:
        os.umask(old)
    for s in ("train", "valid", "test"):
        assert (tmp_path / "out" / "ethanol" / f"{s}.xyz").stat().st_mode & 0o777 == 0o644


def test_rmd17_dir_without_ethanol(tmp_path):
    from mmea_kernels.app.data import find_rmd17

    (tmp_path / "benzene").mkdir()
    (tmp_path / "benzene" / "train.xyz").write_text("x")
    assert find_rmd17(str(tmp_path), ["benzene"]) == tmp_path
    with pytest.raises(FileNotFoundError, match="no rMD17 splits for toluene at .* it has benzene"):
        find_rmd17(str(tmp_path), ["benzene", "toluene"])


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "x.xyz")]
    assert main(argv) == 2
    with pytest.raises(FileNotFoundError, match="none.pt does not exist"):
        main(argv + ["--debug"])


@pytest.mark.parametrize("signal_name, code", [(None, 130), ("SIGTERM", 143)])
def test_debug_keeps_the_exit_code_of_an_interrupt(tmp_path, capsys, monkeypatch, signal_name, code):
    """With --debug an interrupt shows its traceback and still exits 130 (SIGTERM 143), not Python's 1."""
    from mmea_kernels.app import cli

    def stopped(args):
        raise cli.Terminated() if signal_name else KeyboardInterrupt()

    monkeypatch.setattr(cli, "_run", stopped)
    argv = ["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "x.xyz")]
    for extra in ([], ["--debug"]):
        assert main(argv + extra) == code
        err = capsys.readouterr().err
        assert ("Traceback" in err) == bool(extra)
        assert ("terminated (SIGTERM)" if signal_name else "interrupted") in err


def test_calculator_refuses_non_finite_results(data):
    from mmea_kernels.app.calculator import MMEACalculator

    atoms = _frames(data, "test.xyz")[0]
    atoms.calc = MMEACalculator(checkpoint=str(data / "mmea" / "checkpoint.pt"))
    assert math.isfinite(atoms.get_potential_energy())
    atoms.positions[5] = atoms.positions[2]
    with pytest.raises(ValueError, match=r"non-finite energy \(nan\) .* the closest atoms, (2 and 5|5 and 2), are 0 Å"):
        atoms.get_potential_energy()


def test_non_finite_gradient_validation_and_weights_stop_training(data, tmp_path, monkeypatch):
    from mmea_kernels.train.guard import check_finite_tensors

    kw = dict(train=str(data / "train.xyz"), valid=str(data / "valid.xyz"), epochs=1, batch_size=2, progress=False)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
        with pytest.raises(ValueError, match=r"the gradient norm is inf in epoch 1, batch 1; no training state"):
            ft.finetune(ft.FinetuneConfig(out_dir=str(tmp_path / "g"), **kw), log=lambda *_: None)
    real = ft.errors
    with monkeypatch.context() as m:
        m.setattr(ft, "errors", lambda *a, **k: dict(real(*a, **k), loss=float("nan")))
        with pytest.raises(ValueError, match=r"the validation loss is nan in epoch 1; no training state"):
            ft.finetune(ft.FinetuneConfig(out_dir=str(tmp_path / "v"), **kw), log=lambda *_: None)
    assert not (tmp_path / "g").exists() and not (tmp_path / "v").exists()
    (tmp_path / "state.pt").write_text("x")
    with pytest.raises(ValueError, match=r"the weight w\.b became non-finite in epoch 3; .*state\.pt keeps epoch 2"):
        check_finite_tensors([("w.a", torch.ones(2)), ("w.b", torch.tensor([1.0, float("inf")]))], "the weight", 3,
                             tmp_path / "state.pt", 2)


def test_bench_adapt_data_dir_needs_only_the_molecules_asked_for(tmp_path):
    import subprocess
    import sys

    (tmp_path / "d" / "benzene").mkdir(parents=True)
    (tmp_path / "d" / "benzene" / "train.xyz").write_text("x")
    script = REPO / "bench" / "adapt.py"
    argv = [sys.executable, str(script), "--data-dir", str(tmp_path / "d"), "--molecules", "benzene",
            "--summarize-only", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]  # (the refusal's message: test_rmd17_dir_without_ethanol)


def test_labels_in_other_units_get_a_note(tmp_path):
    """Forces in kcal/mol/Å (23x eV/Å) trained to an 18 eV/Å MAE without a word (a user review): the
    run now says the labels are far off the base model's scale; eV labels get no such line."""
    frames = ase.io.read(str(DATA / "train.xyz"), ":6")
    for name, factor in (("ev", 1.0), ("kcal", 23.06)):
        scaled = [a.copy() for a in frames]
        for a in scaled:
            a.info["REF_energy"] = a.info["REF_energy"] * factor
            a.arrays["REF_forces"] = a.arrays["REF_forces"] * factor
        ase.io.write(str(tmp_path / f"{name}.xyz"), scaled)
        lines = []
        ft.finetune(ft.FinetuneConfig(train=f"{tmp_path / name}.xyz@:4", valid=f"{tmp_path / name}.xyz@4:", epochs=1,
                                   batch_size=2, out_dir=str(tmp_path / name), progress=False), log=lines.append)
        note = [line for line in lines if "x the base model's on the same frames" in line]
        if factor == 1.0:
            assert not note, note
        else:
            assert len(note) == 1 and re_search(r"^note: the training labels' forces \(RMS [\d.]+ eV/Å over 4 frames\) "
                                                r"are (1[5-9]|2\d|3\d)\.?\d*x the base model's", note[0]), note


class _NotMace(torch.nn.Module):  # an e3nn model of another package (a NequIP GraphModel in the review)
    def __init__(self):
        super().__init__()
        from e3nn import o3
        self.lin = o3.Linear("2x0e", "1x0e")


def test_a_model_the_cli_cannot_fine_tune_is_refused_with_the_way_that_works(data, tmp_path, capsys):
    """(NequIP review) a whole pickled model of another package was refused as 'not a mace-torch model'
    and its state dict with a hint to give a MACE architecture; both now say that the CLI takes MACE
    and SevenNet and that other e3nn models take adapters through the Python API."""
    whole, state = tmp_path / "other.pt", tmp_path / "other_state.pt"
    torch.save(_NotMace(), whole)
    torch.save(_NotMace().state_dict(), state)
    for spec, expect in (([str(whole), "--trust-pickle"], r"_NotMace is not a mace-torch model \(no atomic_numbers / "
                                                          r"r_max\): the CLI fine-tunes MACE and SevenNet models; other "
                                                          r"e3nn models .* Python API"),
                         ([str(state)], r"holds a bare state dict: give its MACE architecture with --model-config .*"
                                        r"another model \(NequIP, \.\.\.\) cannot be rebuilt here")):
        capsys.readouterr()
        assert _cli(data, tmp_path / "r", "--model", *spec) == 2
        err = capsys.readouterr().err
        assert re.search(expect, err), err
        assert not (tmp_path / "r").exists()
