"""Data-parallel fine-tuning: `torchrun --nproc_per_node 2` (gloo, CPU) gives the result of one
process on the same global batch, and only rank 0 writes files."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402

from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.train import FinetuneConfig, finetune  # noqa: E402
from mmea_kernels.train.foundation import save_model  # noqa: E402
from mmea_kernels.integrations.mace import PRESETS, build_mace  # noqa: E402


@pytest.mark.usefixtures("one_thread")  # as the two processes (OMP_NUM_THREADS=1)
def test_torchrun_two_processes_match_one(tmp_path):
    # the processes build the model under torch's default dtype; a default leaked by an earlier test
    # (float64, from mace-torch's conversion) once made this one differ by 9e-10 after training
    assert torch.get_default_dtype() == torch.float32
    tiny = PRESETS["tiny"]
    torch.manual_seed(0)
    save_model(build_mace(tiny), tiny, tmp_path / "base.pt")
    # two compositions, so the processes hold different atom counts within a global batch; 9 frames
    # in batches of 4: the last holds one frame, which process 1 has no share of (it once dropped
    # that frame without a word: a different one each epoch)
    ase.io.write(str(tmp_path / "train.xyz"), toy_molecules("ethanol", 5, "B", seed=1) + toy_molecules("toluene", 4, "B", seed=2))
    ase.io.write(str(tmp_path / "valid.xyz"), toy_molecules("ethanol", 3, "B", seed=3))
    args = dict(train=str(tmp_path / "train.xyz"), valid=str(tmp_path / "valid.xyz"), model=str(tmp_path / "base.pt"),
                method="mmea", epochs=2, batch_size=4, dtype="float64", rank=4, device="cpu")
    single = finetune(FinetuneConfig(out_dir=str(tmp_path / "one"), progress=False, **args), log=lambda *_: None)

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmea_kernels",
           "finetune", "--no-progress", "--out", str(out)]
    for k, v in args.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0 wrote: the result files exist once; finetune raises if another rank writes
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "learning_curve.png", "metrics.json", "state.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    for h1, h2 in zip(single["history"], metrics["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-9)
        assert h2["valid"]["loss"] == pytest.approx(h1["valid"]["loss"], rel=1e-9)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["trainable"]
    b = torch.load(out / "checkpoint.pt", weights_only=False)["trainable"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-8, atol=1e-10)


def test_global_batch_must_split_evenly(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    import mmea_kernels.train.loop as loop

    monkeypatch.setattr(loop, "dist_setup", lambda device: (0, 3))
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        finetune(FinetuneConfig(train="x.xyz", out_dir=str(tmp_path), batch_size=4, progress=False))
