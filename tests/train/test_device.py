"""Where the fine-tuning workflow runs (``--device``): names resolved or refused with the reason, a
missing GPU refused before anything is written, a run resumed under another device setting; and,
where a GPU exists (the device check's ``-k cuda`` run), training, evaluation, checkpoints, resume
and the ASE calculator on CUDA against the same run on the CPU."""
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.train import FinetuneConfig, evaluate_checkpoint, finetune, load_finetuned  # noqa: E402
from mmea_kernels.train.config import config_key  # noqa: E402
from mmea_kernels.train.device import resolve_device  # noqa: E402

from helpers import CUDA_AVAILABLE  # noqa: E402

NEEDS_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device on this machine")
NO_CUDA = pytest.mark.skipif(CUDA_AVAILABLE, reason="checks the refusal on a machine without a GPU")
QUIET = dict(log=lambda *_: None)


def _cfg(files, out, **kw):
    base = dict(train=str(files / "train.xyz"), valid=str(files / "valid.xyz"), test=str(files / "test.xyz"),
                model=str(files / "base.pt"), out_dir=str(out), method="mmea", epochs=2, batch_size=4, progress=False)
    return FinetuneConfig(**dict(base, **kw))


# ------------------------------------------------------------------------- names, on any machine
@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x", "cpu:0", "auto:1", "cuda:-1", ""])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(ValueError, match="unknown device .*expected auto .*cpu, cuda or cuda:N"):
        resolve_device(name)
    with pytest.raises(ValueError, match="unknown device"):
        FinetuneConfig(train="x.xyz", device=name).check()


def test_auto_and_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(" CPU ")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match=f"device '{name}' asked for, but .*use --device cpu"):
            resolve_device(name)


def test_gpu_index_and_torchrun_local_rank(monkeypatch):
    """Which GPU: cuda -> cuda:0, cuda:N -> N (refused past the last one); under torchrun every
    process takes its LOCAL_RANK's GPU, and an explicit index (all processes on one GPU) is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 0) == resolve_device("auto")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2': torch sees 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # gloo on the CPU
    with pytest.raises(ValueError, match="every process of a node on one GPU; pass --device cuda"):
        resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node (several nodes) may name its GPU
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2: torch sees 2 GPU\(s\) \(cuda:0..cuda:1\): start at most 2 "
                                         r"process\(es\) per node \(torchrun --nproc_per_node\), or pass --device cpu"):
        resolve_device("cuda")


@NO_CUDA
def test_missing_gpu_is_refused_before_anything_is_written(train_files, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="device 'cuda' asked for"):
        finetune(_cfg(train_files, out, device="cuda"), **QUIET)
    assert not (tmp_path / "new").exists()
    args = ["--train", str(train_files / "train.xyz"), "--model", str(train_files / "base.pt"), "--no-progress"]
    assert main(["finetune", *args, "--out", str(out), "--device", "cuda:1"]) == 2
    assert "device 'cuda:1' asked for" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["finetune", *args, "--out", str(out), "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_evaluate_and_md_run_on_the_asked_device_cpu_or_cuda(train_files, tmp_path, capsys):
    """`evaluate` and `md` run where --device says (auto here: the GPU if there is one), and refuse
    an unknown device by name; a checkpoint evaluated on the CPU explicitly gives the run's errors."""
    run = tmp_path / "r"
    m = finetune(_cfg(train_files, run, epochs=1), **QUIET)
    ck = str(run / "checkpoint.pt")
    for dev in ("cpu", "auto"):
        js = tmp_path / f"eval-{dev}.json"
        assert main(["evaluate", "--checkpoint", ck, "--data", str(train_files / "test.xyz"), "--device", dev,
                     "--json", str(js)]) == 0
        got = json.loads(js.read_text())
        assert math.isclose(got["loss"], m["test"]["loss"], rel_tol=1e-9 if dev == "cpu" or not CUDA_AVAILABLE else 1e-6)
    assert main(["evaluate", "--checkpoint", ck, "--data", str(train_files / "test.xyz"), "--device", "npu"]) == 2
    assert "unknown device 'npu'" in capsys.readouterr().err
    assert main(["md", "--checkpoint", ck, "--structure", str(train_files / "test.xyz"), "--steps", "2",
                 "--device", "cuda:7"]) == 2
    assert "cuda:7" in capsys.readouterr().err


def test_a_cpu_run_resumes_on_cuda_where_there_is_one(train_files, tmp_path):
    """The device is not part of a run's settings key: a run stopped with --device cpu resumes with
    --device auto (on a GPU machine: a CPU run continues on the GPU) and ends where an uninterrupted
    run ends (exactly, on the CPU)."""
    assert config_key(_cfg(train_files, "a", device="cpu")) == config_key(_cfg(train_files, "a", device="cuda:1"))
    full = finetune(_cfg(train_files, tmp_path / "a", epochs=3, device="cpu"), **QUIET)
    part = finetune(_cfg(train_files, tmp_path / "b", epochs=3, device="cpu", stop_after=1), **QUIET)
    assert part["stopped"] == "stop_after"
    res = finetune(_cfg(train_files, tmp_path / "b", epochs=3, device="auto", resume=True), **QUIET)
    tol = 1e-6 if CUDA_AVAILABLE else 0.0
    for h_full, h_res in zip(full["history"], res["history"]):
        assert math.isclose(h_res["valid"]["loss"], h_full["valid"]["loss"], rel_tol=tol)


# --------------------------------------------------------------------------- on a GPU, against the CPU
@NEEDS_CUDA
@pytest.mark.parametrize("method", ["mmea", "elora", "mmea-paper"])
def test_finetune_on_cuda_matches_the_cpu_run(train_files, tmp_path, method):
    """float64: the same run on CUDA and on the CPU gives the same errors (both devices' kernels are
    checked against float64 references elsewhere; this is the workflow: batches, E0s, EMA, the
    optimizer state, checkpoint and reference prediction on the device). The CUDA run's checkpoint
    holds CPU tensors and loads on the CPU, where its own reference prediction (made on the GPU) is
    reproduced."""
    cpu = finetune(_cfg(train_files, tmp_path / "cpu", method=method, device="cpu", rank=4), **QUIET)
    gpu = finetune(_cfg(train_files, tmp_path / "gpu", method=method, device="cuda", rank=4), **QUIET)
    for split in ("train", "valid", "test"):
        for k in ("energy_mae_meV", "forces_mae_meV_per_A", "loss"):
            assert math.isclose(gpu[split][k], cpu[split][k], rel_tol=1e-6), (split, k)
    ck = torch.load(tmp_path / "gpu" / "checkpoint.pt", weights_only=True)  # no map_location: as stored
    assert all(t.device.type == "cpu" for t in ck["trainable"].values())
    net, _ = load_finetuned(tmp_path / "gpu" / "checkpoint.pt", device="cpu")  # verifies the GPU's probe on the CPU
    assert next(net.parameters()).device.type == "cpu"
    on_gpu = evaluate_checkpoint(tmp_path / "gpu" / "checkpoint.pt", str(train_files / "test.xyz"), device="cuda")
    assert math.isclose(on_gpu["loss"], gpu["test"]["loss"], rel_tol=1e-9)


@NEEDS_CUDA
def test_float32_run_on_cuda_loads_and_predicts_on_the_cpu(train_files, tmp_path):
    """float32 on CUDA (the fused Triton kernels with tf32x3 products): training stays finite, the
    checkpoint's reference prediction made on the GPU is reproduced by the model rebuilt on the CPU
    (verify_probe's float32 tolerance), and the ASE calculator on either device agrees."""
    from mmea_kernels.app.calculator import MMEACalculator

    out = tmp_path / "r"
    m = finetune(_cfg(train_files, out, dtype="float32", device="cuda"), **QUIET)
    assert all(math.isfinite(h["valid"]["loss"]) for h in m["history"])
    load_finetuned(out / "checkpoint.pt", device="cpu")
    atoms = toy_molecules("ethanol", 1, seed=9)[0]
    res = {}
    for dev in ("cpu", "cuda"):
        a = atoms.copy()
        a.calc = MMEACalculator(checkpoint=str(out / "checkpoint.pt"), device=dev)
        res[dev] = (a.get_potential_energy(), a.get_forces())
    assert abs(res["cuda"][0] - res["cpu"][0]) < 1e-3
    np.testing.assert_allclose(res["cuda"][1], res["cpu"][1], atol=1e-3)


@NEEDS_CUDA
def test_resume_on_cuda_gives_the_same_result(train_files, tmp_path):
    full = finetune(_cfg(train_files, tmp_path / "a", epochs=3, device="cuda"), **QUIET)
    finetune(_cfg(train_files, tmp_path / "b", epochs=3, device="cuda", stop_after=1), **QUIET)
    res = finetune(_cfg(train_files, tmp_path / "b", epochs=3, device="cuda", resume=True), **QUIET)
    for h_full, h_res in zip(full["history"], res["history"]):  # index_add on CUDA: sums in any order
        assert math.isclose(h_res["valid"]["loss"], h_full["valid"]["loss"], rel_tol=1e-9)
