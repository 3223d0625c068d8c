"""A review of the docs against the code (2026-12): export's --out that is not a regular file is
named as such before "exists; pass --overwrite"; a failed `data rmd17` removes the directories it
created; the relax stress example, `script_kernels` as a context manager, where FinetuneConfig's
type check happens and argparse's usage block before its one error line, as the docs now say.
Small: no model is built."""
import os
import re
import stat

import pytest

from helpers import REPO
from mmea_kernels.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
WORKFLOW = (REPO / "docs" / "workflow.md").read_text()
EXPORT = (REPO / "docs" / "export.md").read_text()


def _run(capsys, argv):
    """``(exit code, stderr)`` of ``mmea-kernels argv`` (argparse's refusals exit through SystemExit)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------- export --out
@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_out_that_is_not_a_regular_file_is_named_first(tmp_path, capsys, kind, overwrite):
    """/dev/stdout (a pipe, a terminal) or a FIFO: without --overwrite the refusal used to be
    "exists; pass --overwrite", which --overwrite then did not settle. Refused before any loading."""
    if kind == "fifo":
        out = tmp_path / "model.pt"
        os.mkfifo(out)
    else:
        out = "/dev/null"
    argv = ["export", "--checkpoint", tmp_path / "no-checkpoint.pt", "--out", out] + (["--overwrite"] * overwrite)
    code, err = _run(capsys, argv)
    assert code == 2, err
    assert f"--out {out} exists and is not a regular file" in err and "give a file path" in err, err
    assert "pass --overwrite" not in err
    assert err.count("\n") == 1, err
    assert not stat.S_ISREG(os.stat(out).st_mode)


# -------------------------------------------------------------------------------------- data rmd17
def test_failed_rmd17_fetch_removes_the_directories_it_created(tmp_path, capsys):
    from mmea_kernels.app.rmd17 import fetch_rmd17

    url = (tmp_path / "nowhere" / "rmd17.tar.bz2").as_uri()  # as offline: the download fails
    out = tmp_path / "new" / "deeper" / "rmd17"
    with pytest.raises(ConnectionError, match="could not download"):
        fetch_rmd17(out, molecules=["ethanol"], url=url)
    assert not (tmp_path / "new").exists()
    code, err = _run(capsys, ["data", "rmd17", "--out", out, "--molecules", "ethanol", "--url", url])
    assert code == 2 and "could not download" in err, err
    assert not (tmp_path / "new").exists()


def test_failed_rmd17_fetch_keeps_directories_that_existed(tmp_path):
    from mmea_kernels.app.rmd17 import fetch_rmd17

    url = (tmp_path / "nowhere" / "rmd17.tar.bz2").as_uri()
    kept = tmp_path / "kept"
    (kept / "ethanol").mkdir(parents=True)  # existed before, empty: stays
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(ConnectionError):
        fetch_rmd17(kept / "sub", molecules=["ethanol", "benzene"], url=url)
    assert not (kept / "sub").exists()
    with pytest.raises(ConnectionError):
        fetch_rmd17(kept, molecules=["ethanol", "benzene"], url=url)
    assert sorted(os.listdir(kept)) == ["ethanol", "notes.txt"]
    assert (kept / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------- docs/workflow.md
def test_relax_stress_tolerance_example_is_what_the_code_reports():
    """9 atoms in 100 Å³ at the default --fmax: fmax·N/V in bar, as relax reports stress_tol_bar."""
    import numpy as np
    from ase import Atoms

    from mmea_kernels.app.relax import RelaxSettings, _stress_tol_bar

    m = re.search(r"~([\d,]+) bar for 9 atoms in 100 Å³", " ".join(WORKFLOW.split()))
    assert m, "docs/workflow.md: the stress_tol_bar example is gone"
    atoms = Atoms("H9", positions=np.zeros((9, 3)), cell=np.eye(3) * 100 ** (1 / 3), pbc=True)
    want = _stress_tol_bar(atoms, RelaxSettings())
    assert want == pytest.approx(1442, abs=1)
    assert float(m.group(1).replace(",", "")) == pytest.approx(want, rel=0.01)


def test_finetune_config_type_check_is_where_the_docs_say(tmp_path):
    """The wrong type is refused by finetune(cfg), not by FinetuneConfig(...)."""
    from mmea_kernels.train import FinetuneConfig, finetune

    text = " ".join(WORKFLOW.split())
    i = text.index('(`epochs="10"`)')
    around = text[i - 200:i + 200]
    assert "finetune(cfg)" in around and "does not check" in around, around
    cfg = FinetuneConfig(train=str(tmp_path / "none.xyz"), epochs="10", out_dir=str(tmp_path / "run"))
    assert cfg.epochs == "10"  # constructed
    with pytest.raises(TypeError, match="epochs must be an integer, got '10'"):
        finetune(cfg, log=lambda *_: None)


def test_argparse_refusals_print_the_usage_then_one_line_as_documented(tmp_path, capsys):
    text = " ".join(WORKFLOW.split())
    exits = text[text.index("**Exit codes**"):][:500]
    assert "argparse's usage" in exits and "then that one error line" in exits, exits
    for extra in (["--train", "b.xyz"], ["--seed", "-1"]):
        code, err = _run(capsys, ["finetune", "--train", "a.xyz", *extra, "--out", tmp_path / "run"])
        lines = err.strip().splitlines()
        assert code == 2 and lines[0].startswith("usage: mmea-kernels finetune"), err
        assert lines[-1].startswith("mmea-kernels finetune: error: "), err
        assert not any(line.startswith("mmea-kernels") for line in lines[:-1]), err


# ----------------------------------------------------------------------------------- docs/export.md
def test_script_kernels_is_shown_as_the_context_manager_it_is():
    from mmea_kernels.nn.scriptable import script_kernels

    cm = script_kernels("aten")
    assert hasattr(cm, "__enter__") and hasattr(cm, "__exit__")
    text = " ".join(EXPORT.split())
    uses = [m.start() for m in re.finditer(r"script_kernels\(", text)]
    assert uses, "docs/export.md no longer shows script_kernels"
    for i in uses:
        assert text[max(0, i - 5):i] == "with ", text[i - 80:i + 80]
    assert 'with script_kernels("cpp", model): scripted = torch.jit.script(model)' in text
