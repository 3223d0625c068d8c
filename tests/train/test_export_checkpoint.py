"""``mmea-kernels export``: a fine-tuning checkpoint (tiny MACE, float64, trained adapters) as the
LAMMPS file ``pair_style mace`` loads and as the scripted model. Each file, loaded back with
``torch.jit.load``, gives the energies and forces of the checkpoint's eager model (rebuilt by
``load_finetuned``) on frames it was not checked on (≤ 1e-10 relative; the virials on a periodic
one, which LAMMPS takes the pressure from; a file whose virials are off is refused), for adapters (mmea, elora),
the low-rank parametrizations of mmea-paper (folded into their weights) and full fine-tuning. A file
that would not reproduce the model is never put in place, an existing file is not replaced without
--overwrite, and a model that cannot be exported (mmea-tp; a model that is neither a MACE nor a
SevenNet) is refused by name (SevenNet checkpoints: tests/integrations/test_sevenn_deploy.py)."""
import json
import pathlib
import re

import pytest
import torch

pytest.importorskip("mace")
from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch, energy_and_forces  # noqa: E402
from mmea_kernels.train import FinetuneConfig, finetune, load_finetuned  # noqa: E402
from mmea_kernels.train.foundation import model_info  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def checkpoints(train_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    out = {}
    for method in ("mmea", "elora", "mmea-paper", "full", "mmea-tp"):
        cfg = FinetuneConfig(train=str(train_files / "train.xyz"), valid=str(train_files / "valid.xyz"),
                             model=str(train_files / "base.pt"), out_dir=str(d / method), method=method,
                             epochs=1 if method == "mmea-tp" else 2, batch_size=4,
                             lr=0.005 if method == "mmea-tp" else 0.05, progress=False, dtype="float64")
        finetune(cfg, **QUIET)
        out[method] = d / method / "checkpoint.pt"
    return out


def _frames(net):
    """Two toluenes and an ethanol; the last toluene also periodic in a 7 Å box (images within the
    cutoff: the virials LAMMPS takes the pressure from)."""
    import numpy as np

    z, r = model_info(net)
    atoms = toy_molecules("toluene", 2, seed=11) + toy_molecules("ethanol", 1, seed=12)
    box = atoms[1].copy()
    box.cell, box.pbc = np.eye(3) * 7.0, True
    return [atoms_to_batch([a], z, r, energy_key="__none__", forces_key="__none__", dtype=torch.float64)
            for a in atoms + [box]]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("method", ["mmea", "elora", "mmea-paper", "full"])
def test_exported_files_give_the_checkpoints_energies_and_forces(checkpoints, method, tmp_path, capsys):
    net, _ = load_finetuned(checkpoints[method], dtype="float64")
    zero_init = {"mmea": "mmea_up", "elora": "elora_B", "mmea-paper": ".B."}.get(method)
    if zero_init:  # trained away from the identity, so the adapters' path is what is exported
        assert max(float(p.abs().max()) for n, p in net.named_parameters() if zero_init in n) > 1e-4
    frames = _frames(net)
    for fmt in ("lammps", "torchscript"):
        path = tmp_path / f"{method}-{fmt}.pt"
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(checkpoints[method]), "--out", str(path), "--format", fmt,
                     "--dtype", "float64"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["method"] == method and res["verified_max_rel_diff"] <= 1e-9
        loaded = torch.jit.load(str(path))
        for b in frames:
            e_ref, f_ref = energy_and_forces(net, dict(b))
            periodic = bool(b["pbc"].all()) if "pbc" in b else float(b["cell"].abs().sum()) > 0
            data = {k: v.detach().clone() for k, v in b.items() if torch.is_tensor(v)}
            if fmt == "lammps":
                out = loaded(data, torch.ones(len(data["positions"]), dtype=torch.float64), periodic)
                e, f = out["total_energy_local"].sum(), out["forces"]
            else:
                out = loaded(data, training=False, compute_force=True, compute_virials=periodic)
                e, f = out["energy"], out["forces"]
            assert _rel(e.detach().reshape(-1), e_ref.detach()) <= 1e-10
            assert _rel(f.detach(), f_ref.detach()) <= 1e-10
            if periodic:
                v_ref = net(dict(b), training=False, compute_force=True, compute_virials=True)["virials"]
                assert float(v_ref.abs().max()) > 1e-2
                assert _rel(out["virials"].detach().reshape(3, 3), v_ref.detach().reshape(3, 3)) <= 1e-10
        assert not list(tmp_path.glob("*.part"))
    assert (res["folded_parametrizations"] > 0) == (method == "mmea-paper")


def test_export_refuses_to_replace_or_to_write_a_wrong_file(checkpoints, tmp_path, capsys, monkeypatch):
    from mmea_kernels.app import deploy

    ck = str(checkpoints["mmea"])
    old = tmp_path / "old.pt"
    old.write_text("keep")
    for extra, expect in ((["--out", str(old)], "old.pt exists; pass --overwrite"),
                          (["--out", str(tmp_path / "nodir" / "m.pt")], "nodir does not exist"),
                          (["--out", str(tmp_path)], "is a directory")):
        capsys.readouterr()
        assert main(["export", "--checkpoint", ck, *extra]) == 2
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, err
    real = deploy._run_exported
    for wrong in (lambda *a: (real(*a)[0] + 1e-6, *real(*a)[1:]),  # the energy off
                  lambda *a: real(*a)[:2] + ((real(*a)[2] * (1 + 1e-6)) if a[3] else None,)):  # the virials off
        monkeypatch.setattr(deploy, "_run_exported", wrong)
        assert main(["export", "--checkpoint", ck, "--out", str(old), "--overwrite"]) == 2
        assert "does not reproduce the checkpoint's model" in capsys.readouterr().err
    assert old.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]


def test_unknown_format_and_dtype_are_named(checkpoints, tmp_path):
    from mmea_kernels.app.deploy import export_checkpoint

    with pytest.raises(ValueError, match="unknown --format 'onnx'; expected one of lammps, lammps-parallel, lammps-mliap, torchscript, mace-model"):
        export_checkpoint(checkpoints["mmea"], tmp_path / "m.pt", "onnx")
    with pytest.raises(ValueError, match="unknown --dtype 'float16'"):
        export_checkpoint(checkpoints["mmea"], tmp_path / "m.pt", "lammps", dtype="float16")
    assert not list(tmp_path.iterdir())


def test_the_parallel_format_is_refused_for_mace_by_name(checkpoints, tmp_path):
    """--format lammps-parallel is SevenNet's pair style: a MACE checkpoint is pointed to lammps."""
    from mmea_kernels.app.deploy import export_checkpoint

    with pytest.raises(ValueError, match="lammps-parallel is SevenNet's pair_style e3gnn/parallel; .*holds a "
                                         "ScaleShiftMACE .*use --format lammps"):
        export_checkpoint(checkpoints["mmea"], tmp_path / "m", "lammps-parallel")
    assert not list(tmp_path.iterdir())


def test_export_of_a_checkpoint_without_a_reference_frame_checks_a_cluster(checkpoints, tmp_path):
    """Checkpoints from before they held a reference frame: the export is checked on a small cluster
    of the model's elements instead (the check still fails a wrong file, as above)."""
    from mmea_kernels.app.deploy import export_checkpoint

    ck = torch.load(str(checkpoints["elora"]), weights_only=True)
    del ck["probe"]
    torch.save(ck, str(tmp_path / "old.pt"))
    res = export_checkpoint(tmp_path / "old.pt", tmp_path / "m.pt", "lammps")
    assert res["verified_max_rel_diff"] <= 1e-9 and res["dtype"] == "float64"


def test_a_method_without_a_torchscript_form_is_refused_by_name(checkpoints, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoints["mmea-tp"]), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not script for --format lammps" in err and "(the mmea-tp method) has no TorchScript form" in err
    assert not list(tmp_path.iterdir())


def test_export_refuses_a_model_that_is_not_mace(checkpoints, tmp_path, monkeypatch):
    from mmea_kernels.app import deploy

    monkeypatch.setattr(deploy, "_is_mace", lambda net: False)  # a model of another kind
    for fmt in ("lammps", "torchscript"):
        with pytest.raises(ValueError, match="export is for MACE and SevenNet models; .*holds a ScaleShiftMACE .*run "
                                             "its MD through the ASE calculator"):
            deploy.export_checkpoint(checkpoints["mmea"], tmp_path / "m.pt", fmt)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["mmea", "mmea-paper"])
def test_mliap_files_give_the_checkpoints_energies_forces_and_virials(checkpoints, method, tmp_path, capsys):
    """--format lammps-mliap (mace-torch's ML-IAP pickle for pair_style mliap unified), both forms,
    loaded back and run as LAMMPS runs it (ghost atoms in the periodic frames) on frames the export
    did not check: the e3nn form equals the eager checkpoint model to round-off, the cuEquivariance
    form to the reported conversion difference."""
    import numpy as np

    from mmea_kernels.integrations.mace_mliap import run_like_mliap

    net, _ = load_finetuned(checkpoints[method], dtype="float64")
    z, r = model_info(net)
    atoms = toy_molecules("toluene", 1, seed=11) + toy_molecules("ethanol", 1, seed=12)
    box = atoms[0].copy()
    box.cell, box.pbc = np.eye(3) * 7.0, True
    for backend, tol in (("e3nn", 1e-10), ("cueq", 1e-6)):
        path = tmp_path / f"{method}-{backend}-mliap.pt"
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(checkpoints[method]), "--out", str(path), "--format",
                     "lammps-mliap", "--mliap-backend", backend]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["backend"] == backend and res["dtype"] == "float64" and res["verified_max_rel_diff"] <= 1e-9
        assert res["conversion_max_rel_diff"] <= (1e-12 if backend == "e3nn" else 1e-6)
        assert res["lammps"].startswith(f"pair_style mliap unified {path} 0")
        loaded = torch.load(str(path), weights_only=False)
        for a in atoms + [box]:
            pbc = bool(a.pbc.all())
            b = atoms_to_batch([a], z, r, energy_key="__none__", forces_key="__none__", dtype=torch.float64)
            ref = net(dict(b), training=False, compute_force=True, compute_virials=pbc)
            e, f, w = run_like_mliap(loaded, a, virial=pbc)
            assert _rel(e.reshape(-1), ref["energy"].detach()) <= tol
            assert _rel(f, ref["forces"].detach()) <= tol
            if pbc:
                assert _rel(w, ref["virials"].detach().reshape(3, 3)) <= tol
    assert not list(tmp_path.glob(".*part"))


def test_mliap_export_refuses_a_wrong_file_and_misplaced_options(checkpoints, tmp_path, capsys, monkeypatch):
    from mmea_kernels.integrations import mace_mliap

    ck = str(checkpoints["elora"])
    out = tmp_path / "m.pt"
    for extra, expect in ((["--mliap-backend", "e3nn"], "--mliap-backend is for --format lammps-mliap, not "
                                                         "--format lammps"),):
        capsys.readouterr()
        assert main(["export", "--checkpoint", ck, "--out", str(out), *extra]) == 2
        assert expect in capsys.readouterr().err
    real = mace_mliap.run_like_mliap
    monkeypatch.setattr(mace_mliap, "run_like_mliap", lambda *a, **k: (real(*a, **k)[0] + 1e-6, *real(*a, **k)[1:]))
    assert main(["export", "--checkpoint", ck, "--out", str(out), "--format", "lammps-mliap",
                 "--mliap-backend", "e3nn"]) == 2
    assert "the exported lammps-mliap file does not reproduce" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_mliap_export_never_unpickles_a_file_by_name(checkpoints, tmp_path, monkeypatch):
    """(security review) the ML-IAP check read the temporary file back by name with full unpickling:
    another user who can write to --out's directory could swap it for a payload meanwhile (reproduced
    with a racing process). Now the pickle is made and checked in memory; every file is read weights-only."""
    import io

    from mmea_kernels.app import deploy

    real, loads = torch.load, []

    def spy(f, *a, **k):
        loads.append((isinstance(f, io.BytesIO), k.get("weights_only")))
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", spy)
    deploy.export_checkpoint(checkpoints["elora"], tmp_path / "m.pt", "lammps-mliap")
    assert (True, False) in loads and all(in_memory or weights_only for in_memory, weights_only in loads), loads
    assert not list(tmp_path.glob(".*part"))


def _segments_dir(path, text):
    path.mkdir()
    for i in range(2):
        (path / f"deployed_parallel_{i}.pt").write_text(text)


def test_an_exported_file_is_written_through_a_symlink_and_never_into_a_fifo(tmp_path):
    """`_write_verified` (every single-file export): ``--out`` a symlink gets the file it names
    replaced, mode kept, the link kept (the rename replaced the link by a file); a file that fails
    its check leaves the old one and no temporary file; a FIFO is refused by name (the file is read
    back to be checked: reading a FIFO it had just written would hang)."""
    import os

    from helpers import linked_file
    from mmea_kernels.app import deploy

    real, link = linked_file(tmp_path, "m.pt")
    store = real.parent
    assert deploy._write_verified(link, lambda tmp: pathlib.Path(tmp).write_text("new"), lambda tmp: 0.25) == 0.25
    assert link.is_symlink() and real.read_text() == "new" and (real.stat().st_mode & 0o777) == 0o640

    def wrong(tmp):
        raise ValueError("the exported file disagrees")

    with pytest.raises(ValueError, match="disagrees"):
        deploy._write_verified(link, lambda tmp: pathlib.Path(tmp).write_text("newer"), wrong)
    assert real.read_text() == "new" and sorted(os.listdir(store)) == ["m.pt"]
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="fifo.pt exists and is not a regular file"):
        deploy._write_verified(fifo, lambda tmp: None, lambda tmp: 0.0)


def test_a_segment_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """`_write_verified_dir` (--format lammps-parallel --overwrite): the new directory takes the
    name and the old one's mode; interrupted between moving the old one aside and naming the new
    one, the old one is put back; a file that appeared in it after the first check is not deleted
    (the replacement is refused); nothing temporary is left behind."""
    import os

    from mmea_kernels.app import deploy

    def save(tmp):
        for i in range(3):
            (tmp / f"deployed_parallel_{i}.pt").write_text("new")

    out = tmp_path / "par"
    _segments_dir(out, "old")
    os.chmod(out, 0o750)
    deploy._check_parallel_out(out, overwrite=True)
    assert deploy._write_verified_dir(out, save, lambda tmp: 0.5) == 0.5
    assert sorted(p.name for p in out.iterdir()) == [f"deployed_parallel_{i}.pt" for i in range(3)]
    assert (out / "deployed_parallel_0.pt").read_text() == "new" and (os.stat(out).st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["par"]

    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new directory would take the name now
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(deploy.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        deploy._write_verified_dir(out, lambda tmp: (tmp / "deployed_parallel_0.pt").write_text("newer"), lambda t: 0)
    monkeypatch.setattr(deploy.os, "replace", real)
    assert (out / "deployed_parallel_0.pt").read_text() == "new" and len(list(out.iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["par"]

    (out / "notes.txt").write_text("mine")  # after the command's first check
    with pytest.raises(FileExistsError, match=r"not segment files \(notes.txt\)"):
        deploy._write_verified_dir(out, save, lambda tmp: 0)
    assert (out / "notes.txt").read_text() == "mine" and (out / "deployed_parallel_0.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["par"]
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(FileExistsError, match="link exists and is a symbolic link"):
        deploy._check_parallel_out(tmp_path / "link", overwrite=True)


def _with_probe(checkpoint, atoms, path):
    """A copy of ``checkpoint`` whose reference frame is ``atoms``."""
    from mmea_kernels.train.selfcheck import make_probe

    net, _ = load_finetuned(checkpoint, dtype="float64")
    ck = torch.load(str(checkpoint), weights_only=True)
    ck["probe"] = make_probe(net, atoms)
    torch.save(ck, str(path))
    return path


def test_mliap_export_of_other_methods_and_awkward_reference_frames(checkpoints, tmp_path, capsys):
    """Found by a review: full fine-tuning (no adapters) converts to the cuEquivariance form with
    mace-torch's own conversion; mmea-tp, which has none, is pointed to the e3nn form (which works);
    a reference frame of one isolated atom (no pairs: mace-torch skips it) is replaced by a cluster of
    the model's elements; a perfect 64-atom crystal in float32 (virial rounding over many pair terms)
    is not refused."""
    import ase
    from ase.build import bulk

    from mmea_kernels.app.deploy import export_checkpoint

    res = export_checkpoint(checkpoints["full"], tmp_path / "full.pt", "lammps-mliap")
    assert res["backend"] == "cueq" and res["verified_max_rel_diff"] <= 1e-9
    with pytest.raises(ValueError, match="mmea-tp method's tensor-product gates have no cuEquivariance form: export "
                                         "it with --mliap-backend e3nn"):
        export_checkpoint(checkpoints["mmea-tp"], tmp_path / "tp.pt", "lammps-mliap")
    assert not (tmp_path / "tp.pt").exists()
    res = export_checkpoint(checkpoints["mmea-tp"], tmp_path / "tp.pt", "lammps-mliap", mliap_backend="e3nn")
    assert res["verified_max_rel_diff"] <= 1e-9
    lone = _with_probe(checkpoints["elora"], ase.Atoms("H", positions=[[0.0, 0.0, 0.0]]), tmp_path / "lone.ckpt")
    assert export_checkpoint(lone, tmp_path / "lone.pt", "lammps-mliap", mliap_backend="e3nn")[
        "verified_max_rel_diff"] <= 1e-9
    crystal = _with_probe(checkpoints["mmea"], bulk("C", "diamond", a=3.57, cubic=True).repeat(2),
                          tmp_path / "crystal.ckpt")
    res = export_checkpoint(crystal, tmp_path / "crystal.pt", "lammps-mliap", dtype="float32", mliap_backend="e3nn")
    assert res["dtype"] == "float32" and res["verified_max_rel_diff"] <= 2e-5


def test_mliap_and_parallel_error_paths_name_the_problem(checkpoints, tmp_path, monkeypatch):
    """What the new formats refuse, by name, writing nothing: --out for the parallel directory that
    is a file or lacks its parent; an unknown backend; no cuequivariance-torch for the cueq form; a
    cueq form that differs from the checkpoint's model; a frame the ML-IAP file computes nothing for."""
    import ase

    from mmea_kernels.app import deploy, deploy_mliap
    from mmea_kernels.integrations import mace_mliap

    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile exists and is not a directory; --format lammps-parallel"):
        deploy._check_parallel_out(tmp_path / "afile", overwrite=True)
    with pytest.raises(FileNotFoundError, match="nodir does not exist"):
        deploy._check_parallel_out(tmp_path / "nodir" / "par", overwrite=False)
    ck, out = checkpoints["elora"], tmp_path / "m.pt"
    net, ckpt = load_finetuned(ck, dtype="float64")
    with pytest.raises(ValueError, match="unknown --mliap-backend 'cuda'; expected one of cueq, e3nn"):
        deploy_mliap.export_mliap(net, ckpt, out, torch.float64, "cuda")

    def no_cueq(net):
        raise ImportError("No module named 'cuequivariance_torch'")

    monkeypatch.setattr(mace_mliap, "_to_cueq", no_cueq)
    with pytest.raises(ValueError, match=r"needs cuequivariance-torch \(pip install 'mmea_kernels\[cueq\]'\), or pass "
                                         "--mliap-backend e3nn"):
        deploy_mliap.export_mliap(net, ckpt, out, torch.float64, "cueq")
    monkeypatch.undo()
    real = mace_mliap.mliap_model

    def drifted(*a, **k):  # a conversion that changed the model
        obj = real(*a, **k)
        with torch.no_grad():
            next(p for p in obj.model.model.parameters() if p.dim() == 2).add_(1e-3)
        return obj

    monkeypatch.setattr(mace_mliap, "mliap_model", drifted)
    with pytest.raises(ValueError, match="the cueq form of the checkpoint's model differs from it by .* nothing was "
                                         "written"):
        deploy_mliap.export_mliap(net, ckpt, out, torch.float64, "cueq")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    obj = mace_mliap.mliap_model(net, backend="e3nn")
    with pytest.raises(ValueError, match="computed nothing for H .0 pairs within the cutoff"):
        mace_mliap.run_like_mliap(obj, ase.Atoms("H", positions=[[0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("method", ["mmea", "elora", "mmea-paper", "full"])
def test_mace_model_file_runs_in_mace_torchs_calculator(checkpoints, method, tmp_path, capsys):
    """--format mace-model: the pickle mace-torch's own tools load. Its MACECalculator gives the
    checkpoint's energies and forces (≤ 1e-10 relative; ELoRA merged into the weights, mmea-paper's
    parametrizations folded); the file names mmea_kernels only where MMEA adapters stay in it, and
    loads without mmea_kernels exactly when it does not (checked in a process that cannot import it)."""
    import subprocess
    import sys

    import numpy as np
    from mace.calculators import MACECalculator

    net, _ = load_finetuned(checkpoints[method], dtype="float64")
    path = tmp_path / f"{method}.model"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoints[method]), "--out", str(path), "--format", "mace-model",
                 "--dtype", "float64"]) == 0
    res = json.loads(capsys.readouterr().out)
    mmea = method in ("mmea", "mmea-paper")
    assert res["verified_max_rel_diff"] <= 1e-9 and res["dtype"] == "float64"
    assert (res["merged_adapters"] > 0, res["adapters_kept"] > 0) == (method == "elora", mmea)
    assert ("mmea_kernels" in res["imports"]) == mmea and "mace" in res["imports"]
    calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    z, r = model_info(net)
    atoms = toy_molecules("toluene", 1, seed=21) + toy_molecules("ethanol", 1, seed=22)
    box = atoms[0].copy()
    box.cell, box.pbc = np.eye(3) * 7.0, True
    for a in atoms + [box]:
        b = atoms_to_batch([a], z, r, energy_key="__none__", forces_key="__none__", dtype=torch.float64)
        e_ref, f_ref = energy_and_forces(net, b)
        a = a.copy()
        a.calc = calc
        e, f = torch.tensor(a.get_potential_energy(), dtype=torch.float64), torch.from_numpy(a.get_forces())
        assert _rel(e.reshape(-1), e_ref.detach().reshape(-1)) <= 1e-10
        assert _rel(f, f_ref.detach()) <= 1e-10
    code = ("import sys, torch\nsys.modules['mmea_kernels'] = None\n"
            f"torch.load({str(path)!r}, weights_only=False)\nprint('loaded')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if mmea:
        assert out.returncode != 0 and "mmea_kernels" in out.stderr
    else:
        assert out.returncode == 0 and out.stdout.strip().endswith("loaded"), out.stderr[-2000:]


def test_mace_model_export_writes_nothing_when_the_loaded_pickle_differs(checkpoints, tmp_path, capsys, monkeypatch):
    """The mace-model check itself: a pickle whose loaded model does not give the checkpoint's
    numbers (here one weight of the loaded copy moved by 1e-3, after ELoRA was merged) is refused by
    name and no file, not even a temporary one, is left behind."""
    from mmea_kernels.app import deploy_mace

    real = deploy_mace.write_checked_pickle

    def moved(out, obj, fmt, tol, difference):
        def off(loaded):
            with torch.no_grad():
                next(p for p in loaded.parameters() if p.ndim and p.numel() > 1).view(-1)[0] += 1e-3
            return difference(loaded)
        return real(out, obj, fmt, tol, off)

    monkeypatch.setattr(deploy_mace, "write_checked_pickle", moved)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoints["elora"]), "--out", str(tmp_path / "m.model"),
                 "--format", "mace-model", "--dtype", "float64"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the exported mace-model file does not reproduce the checkpoint's model on its reference "
                     r"frame \(relative difference .* > 1e-09\); nothing was written", err), err
    assert not list(tmp_path.iterdir())


def test_sevenn_checkpoint_format_of_a_mace_checkpoint_is_refused_by_name(checkpoints, tmp_path):
    from mmea_kernels.app.deploy import export_checkpoint

    with pytest.raises(ValueError, match=r"--format sevenn-checkpoint is SevenNet's checkpoint; .*holds a ScaleShiftMACE"
                                         r".*use --format lammps .*or mace-model"):
        export_checkpoint(checkpoints["mmea"], tmp_path / "m.pth", "sevenn-checkpoint")
    assert not list(tmp_path.iterdir())
