"""``mmea-kernels predict``: a checkpoint's energies, forces and stresses on every frame of a file
(molecules of two sizes and triclinic periodic frames mixed, batched) equal the ASE calculator's
frame by frame (float64: energies and stresses ≤ 1e-10 relative, forces to the 8 decimals extended
XYZ stores; an independent path: one frame at a time through ``BatchCache``), for any batch size and for a file larger than one chunk; the frames keep what they
carried; a bad file, an unknown element or an existing output leave nothing under the name asked
for."""
import json

import ase.io
import numpy as np
import pytest

pytest.importorskip("mace")
from helpers import CUDA_AVAILABLE  # noqa: E402
from mmea_kernels.app.calculator import MMEACalculator  # noqa: E402
from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.app.predict import predict  # noqa: E402
from mmea_kernels.train import FinetuneConfig, finetune  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(train_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    finetune(FinetuneConfig(train=str(train_files / "train.xyz"), valid=str(train_files / "valid.xyz"),
                            model=str(train_files / "base.pt"), out_dir=str(d / "run"), method="mmea", epochs=1,
                            batch_size=4, lr=0.05, progress=False, dtype="float64"), log=lambda *_: None)
    return d / "run" / "checkpoint.pt"


def _mixed(n_periodic=3):
    frames = toy_molecules("ethanol", 3, seed=21) + toy_molecules("toluene", 2, seed=22)
    rng = np.random.default_rng(0)
    for a in toy_molecules("ethanol", n_periodic, seed=23):
        a.positions += 1.5
        a.cell = np.diag(rng.uniform(6.2, 7.0, 3)) + rng.uniform(-0.3, 0.3, (3, 3)) * (1 - np.eye(3))
        a.pbc = True
        frames.append(a)
    for i, a in enumerate(frames):
        a.info["tag"] = i
    return frames


def test_predictions_equal_the_calculator_frame_by_frame(checkpoint, tmp_path, capsys):
    frames = _mixed()
    ase.io.write(str(tmp_path / "in.xyz"), frames)
    calc = MMEACalculator(checkpoint=str(checkpoint))
    outs = {}
    for bs, extra in ((1, []), (3, []), (16, []), ("atoms", ["--max-batch-atoms", "20"])):  # ~2 frames a batch
        path = tmp_path / f"p{bs}.xyz"
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "in.xyz"), "--out", str(path),
                     "--batch-size", str(16 if bs == "atoms" else bs), "--device", "cpu", *extra]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["frames"] == 8 and res["with_stress"] == 3
        outs[bs] = ase.io.read(str(path), ":")
    for i, (a, got) in enumerate(zip(frames, outs[3])):
        assert got.info["tag"] == i and np.allclose(got.positions, a.positions)
        a = a.copy()
        a.calc = calc
        assert got.info["MMEA_energy"] == pytest.approx(a.get_potential_energy(), rel=1e-10)
        np.testing.assert_allclose(got.arrays["MMEA_forces"], a.get_forces(), rtol=0, atol=1e-8)  # 8 decimals
        if a.pbc.all():
            np.testing.assert_allclose(got.info["MMEA_stress"], a.get_stress(), rtol=0, atol=1e-10)
        else:
            assert "MMEA_stress" not in got.info
        for bs in (1, 16, "atoms"):
            assert outs[bs][i].info["MMEA_energy"] == pytest.approx(got.info["MMEA_energy"], rel=1e-12)


def test_a_file_larger_than_a_chunk_and_a_prefix(checkpoint, tmp_path):
    frames = toy_molecules("ethanol", 300, seed=5)
    ase.io.write(str(tmp_path / "many.xyz"), frames)
    res = predict(checkpoint, str(tmp_path / "many.xyz@10:"), tmp_path / "o.xyz", batch_size=64, prefix="FT_")
    got = ase.io.read(str(tmp_path / "o.xyz"), ":")
    assert res["frames"] == 290 == len(got) and res["keys"] == ["FT_energy", "FT_forces"]
    calc = MMEACalculator(checkpoint=str(checkpoint))
    for i in (0, 255, 256, 289):  # both sides of the 256-frame chunk boundary
        a = frames[10 + i].copy()
        a.calc = calc
        assert got[i].info["FT_energy"] == pytest.approx(a.get_potential_energy(), rel=1e-10)


def test_predict_refusals_leave_nothing_behind(checkpoint, tmp_path, capsys):
    good = tmp_path / "in.xyz"
    ase.io.write(str(good), _mixed(0))
    bad = _mixed(0)
    bad[4].numbers[0] = 14  # silicon: not in the model
    ase.io.write(str(tmp_path / "si.xyz"), bad)
    (tmp_path / "old.xyz").write_text("keep")
    cases = [(["--data", str(good), "--out", str(tmp_path / "old.xyz")], "old.xyz exists; pass --overwrite"),
             (["--data", str(good), "--out", str(tmp_path / "o.traj")], "name it *.xyz or *.extxyz"),
             (["--data", str(good), "--out", str(tmp_path / "o.xyz"), "--batch-size", "0"], "--batch-size must be"),
             (["--data", str(good), "--out", str(tmp_path / "o.xyz"), "--prefix", "a b"], "letters, digits"),
             (["--data", str(tmp_path / "si.xyz"), "--out", str(tmp_path / "o.xyz")], "Si (Z=14)"),
             (["--data", str(good), "--out", str(tmp_path / "d.xyz")], "d.xyz is a directory")]
    (tmp_path / "d.xyz").mkdir()
    for extra, expect in cases:
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(checkpoint), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.xyz", "in.xyz", "old.xyz", "si.xyz"]
    assert (tmp_path / "old.xyz").read_text() == "keep"


def test_dtype_runs_a_float64_checkpoint_in_float32(checkpoint, train_files, tmp_path, capsys):
    """--dtype on predict, evaluate and md: the checkpoint's model in float32 (the reference frame check
    at float32 tolerance) gives what float64 gives to float32 precision."""
    data = str(train_files / "test.xyz")
    for dt in ("float64", "float32"):
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(checkpoint), "--data", data, "--out", str(tmp_path / f"{dt}.xyz"),
                     "--dtype", dt]) == 0
        assert json.loads(capsys.readouterr().out)["dtype"] == dt
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", data, "--dtype", dt,
                     "--json", str(tmp_path / f"{dt}.json")]) == 0
    e64, e32 = (ase.io.read(str(tmp_path / f"{dt}.xyz"), ":") for dt in ("float64", "float32"))
    assert any(abs(a.info["MMEA_energy"] - b.info["MMEA_energy"]) > 0 for a, b in zip(e64, e32))  # it did change
    for a, b in zip(e64, e32):
        assert b.info["MMEA_energy"] == pytest.approx(a.info["MMEA_energy"], rel=1e-6)
        np.testing.assert_allclose(b.arrays["MMEA_forces"], a.arrays["MMEA_forces"], rtol=0, atol=1e-4)
    m64, m32 = (json.loads((tmp_path / f"{dt}.json").read_text()) for dt in ("float64", "float32"))
    assert m32["forces_mae_meV_per_A"] == pytest.approx(m64["forces_mae_meV_per_A"], rel=1e-3)
    capsys.readouterr()
    assert main(["md", "--checkpoint", str(checkpoint), "--structure", data, "--steps", "3", "--dtype", "float32",
                 "--trajectory", str(tmp_path / "md.traj")]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["max_deviation_meV_per_atom"])


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device on this machine")
def test_predict_on_cuda_matches_the_cpu(checkpoint, tmp_path):
    frames = _mixed()
    ase.io.write(str(tmp_path / "in.xyz"), frames)
    got = {}
    for dev in ("cpu", "cuda"):
        predict(checkpoint, str(tmp_path / "in.xyz"), tmp_path / f"{dev}.xyz", batch_size=4, device=dev)
        got[dev] = ase.io.read(str(tmp_path / f"{dev}.xyz"), ":")
    for a, b in zip(got["cuda"], got["cpu"]):
        assert a.info["MMEA_energy"] == pytest.approx(b.info["MMEA_energy"], rel=1e-10)
        np.testing.assert_allclose(a.arrays["MMEA_forces"], b.arrays["MMEA_forces"], rtol=0, atol=2e-8)
        if "MMEA_stress" in b.info:
            np.testing.assert_allclose(a.info["MMEA_stress"], b.info["MMEA_stress"], rtol=0, atol=1e-9)


def test_a_symlinked_out_is_written_through(checkpoint, tmp_path):
    """``--out`` a symlink (results kept elsewhere, linked): the file it names gets the predictions and
    keeps its mode; the link stays (the rename replaced the link by a file, leaving the target old)."""
    import os

    from helpers import linked_file

    good = tmp_path / "in.xyz"
    ase.io.write(str(good), _mixed(0))
    real, link = linked_file(tmp_path, "p.xyz")
    predict(checkpoint, str(good), link, overwrite=True)
    assert link.is_symlink() and oct(real.stat().st_mode & 0o777) == oct(0o640)
    assert len(ase.io.read(str(real), ":")) == len(_mixed(0)) and sorted(os.listdir(real.parent)) == ["p.xyz"]


def test_batches_and_chunks_keep_to_their_frame_and_atom_limits(monkeypatch):
    """Evaluation batches (evaluate, predict) and predict's chunks: consecutive frames, at most the
    frames and atoms asked for, a frame larger than the atom limit alone, every frame once."""
    from types import SimpleNamespace

    from mmea_kernels.train import data

    import mmea_kernels.integrations.mace as mace_mod

    sizes = [5, 9, 3, 40, 2, 2, 2, 2, 7]
    seen = []
    monkeypatch.setattr(mace_mod, "collate", lambda group, device: [g.num_nodes for g in group])
    graphs = [SimpleNamespace(num_nodes=n) for n in sizes]
    for size, cap in ((3, 10), (100, None), (2, 1)):
        got = list(data.iter_batches(graphs, size, "cpu", cap))
        seen.append(got)
        assert [n for b in got for n in b] == sizes
        assert all(len(b) <= size and (cap is None or sum(b) <= cap or len(b) == 1) for b in got)
    assert seen[0] == [[5], [9], [3], [40], [2, 2, 2], [2, 7]] and seen[1] == [sizes]
    frames = [list(range(n)) for n in sizes]  # len() is all frame_chunks reads
    parts = list(data.frame_chunks(frames, max_frames=3, max_atoms=12))
    assert [(s, [len(f) for f in p]) for s, p in parts] == [(0, [5]), (1, [9, 3]), (3, [40]), (4, [2, 2, 2]),
                                                            (7, [2, 7])]
    data.check_batch_size(16.0, None)  # a whole number as a float: as before
    for option, value in (("--batch-size", 0), ("--max-batch-atoms", -1), ("--batch-size", 2.5)):
        with pytest.raises(ValueError, match=f"{option} must be a whole number >= 1"):
            data.check_batch_size(*((value, None) if option == "--batch-size" else (4, value)))


def test_predictions_stream_whole_into_a_fifo(checkpoint, tmp_path):
    """``--out`` a FIFO (a reader downstream): one open file for all chunks. Each 256-frame chunk was
    written with its own open and close, so the reader saw the end of the file after the first chunk
    and the second open blocked forever."""
    import os
    import threading

    frames = toy_molecules("ethanol", 270, seed=7)
    ase.io.write(str(tmp_path / "in.xyz"), frames)
    fifo = tmp_path / "pipe.xyz"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    done = []
    worker = threading.Thread(target=lambda: done.append(predict(checkpoint, str(tmp_path / "in.xyz"), fifo,
                                                                 batch_size=64, overwrite=True)), daemon=True)
    worker.start()
    worker.join(120)
    reader.join(10)
    assert done and done[0]["frames"] == 270, "predict did not finish"
    (tmp_path / "got.xyz").write_text(got[0])
    out = ase.io.read(str(tmp_path / "got.xyz"), ":")
    assert len(out) == 270 and out[269].info["MMEA_energy"] == pytest.approx(predict_one(checkpoint, frames[269]))


def predict_one(checkpoint, atoms):
    a = atoms.copy()
    a.calc = MMEACalculator(checkpoint=str(checkpoint))
    return a.get_potential_energy()
