"""torchrun runs whose processes do not run the same job, and processes that stop (a review,
2026-12-03). Before: a different training file on one node trained on (exit 0), and an ``--out``
only rank 0 saw resumed on rank 0 while rank 1 started from the initial weights (a wrong result,
reported as finished); a process that died ended the others with "internal error" after up to 30
minutes. Now every process compares its settings, data, starting epoch and weights with rank 0's
before the first step, and waits at most MMEA_DIST_TIMEOUT seconds."""
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import PRESETS, build_mace  # noqa: E402
from mmea_kernels.train import FinetuneConfig, finetune  # noqa: E402
from mmea_kernels.train.distributed import PeerFailed, dist_timeout, peer_failure  # noqa: E402
from mmea_kernels.train.foundation import save_model  # noqa: E402

# a worker that gives rank 1 its own --train (TRAIN1) or --out (OUT1): node-local files that differ
WRAPPER = """import os, sys
from mmea_kernels.app.cli import main
argv = sys.argv[1:]
if os.environ["LOCAL_RANK"] == "1":
    for opt, env in (("--train", "TRAIN1"), ("--out", "OUT1"), ("--model", "MODEL1"), ("--rank", "RANK1")):
        if env in os.environ:
            argv[argv.index(opt) + 1] = os.environ[env]
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    tiny = PRESETS["tiny"]
    torch.manual_seed(0)
    save_model(build_mace(tiny), tiny, d / "base.pt")
    ase.io.write(str(d / "train.xyz"), toy_molecules("ethanol", 4, "B", seed=1))
    ase.io.write(str(d / "other.xyz"), toy_molecules("ethanol", 4, "B", seed=7))  # same count, other frames
    ase.io.write(str(d / "valid.xyz"), toy_molecules("ethanol", 2, "B", seed=3))
    (d / "worker.py").write_text(WRAPPER)
    return d


def _args(files, out, epochs):
    return ["finetune", "--train", str(files / "train.xyz"), "--valid", str(files / "valid.xyz"), "--model",
            str(files / "base.pt"), "--method", "mmea", "--rank", "2", "--batch-size", "2", "--epochs", str(epochs),
            "--dtype", "float64", "--device", "cpu", "--no-progress", "--out", str(out)]


def _torchrun(files, argv, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(files / "worker.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MMEA_DIST_TIMEOUT="60", **env))
    return proc.returncode, proc.stdout + proc.stderr


def test_different_data_on_one_process_is_refused(files, tmp_path):
    rc, text = _torchrun(files, _args(files, tmp_path / "run", 1), TRAIN1=str(files / "other.xyz"))
    assert rc != 0
    assert "the processes of this torchrun run read different data (rank 0: 4 train, 2 valid" in text, text[-3000:]
    assert "every process must read the same files" in text
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.usefixtures("one_thread")
def test_an_out_directory_only_rank_0_sees_is_refused_on_resume(files, tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    # two epochs in node0 (as a first torchrun job would have left them), then a requeue to four
    cfg = FinetuneConfig(train=str(files / "train.xyz"), valid=str(files / "valid.xyz"), model=str(files / "base.pt"),
                         method="mmea", rank=2, batch_size=2, epochs=2, dtype="float64", device="cpu",
                         out_dir=str(node0), progress=False)
    finetune(cfg, log=lambda *_: None)
    before = (node0 / "metrics.json").read_bytes()
    rc, text = _torchrun(files, _args(files, node0, 4) + ["--resume", "auto"], OUT1=str(node1))
    assert rc != 0
    assert "rank 0 starts at epoch 3 but rank 1 at epoch 1" in text, text[-3000:]
    assert "--out must be one directory that every process sees" in text
    assert (node0 / "metrics.json").read_bytes() == before  # the finished two-epoch result, not a mixed one


def test_peer_failure_says_what_state_holds(tmp_path, monkeypatch):
    monkeypatch.delenv("MMEA_DIST_TIMEOUT", raising=False)
    state = tmp_path / "state.pt"
    state.write_bytes(b"x")
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: Connection reset by peer")
    err = peer_failure(gloo, 2, state, 3)
    assert isinstance(err, PeerFailed) and isinstance(err, ConnectionError)  # the CLI: exit 2, one line
    assert f"stopped answering within 600 s (MMEA_DIST_TIMEOUT) ([gloo/transport" in str(err)
    assert f"{state} holds epoch 3: run again (every process) with --resume" in str(err)
    assert "no training state was saved yet" in str(peer_failure(gloo, 2, tmp_path / "none.pt", 0))
    assert peer_failure(gloo, 1, state, 3) is None  # one process: not a peer's failure
    assert peer_failure(RuntimeError("shape mismatch"), 2, state, 3) is None  # a bug stays a bug
    monkeypatch.setenv("MMEA_DIST_TIMEOUT", "ten")
    with pytest.raises(ValueError, match="MMEA_DIST_TIMEOUT='ten': expected the seconds"):
        dist_timeout()


def test_world_size_without_the_other_processes_ends_with_a_message(files, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), MMEA_DIST_TIMEOUT="3")
    proc = subprocess.run([sys.executable, "-m", "mmea_kernels", *_args(files, tmp_path / "run", 1)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WORLD_SIZE=2: the processes did not all join within 3 s (MASTER_ADDR=127.0.0.1" in proc.stderr
    assert "unset WORLD_SIZE to run in one process" in proc.stderr


def test_other_commands_refuse_torchrun(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["predict", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(files / "valid.xyz"),
                 "--out", str(tmp_path / "p.xyz")]) == 2
    err = capsys.readouterr().err
    assert "predict runs in one process, but WORLD_SIZE=2 (torchrun?)" in err and "only finetune uses torchrun" in err
    assert not (tmp_path / "p.xyz").exists()


def test_a_copy_of_the_model_elsewhere_is_the_same_model_and_another_rank_is_refused(files, tmp_path):
    """Files are compared by content (nodes may hold copies at other paths); a setting that changes a
    parameter's shape is named before DDP's own check fails with torch's message ("internal error")."""
    copy = tmp_path / "node1" / "base.pt"
    copy.parent.mkdir()
    copy.write_bytes((files / "base.pt").read_bytes())
    rc, text = _torchrun(files, _args(files, tmp_path / "ok", 1), MODEL1=str(copy))
    assert rc == 0, text[-3000:]
    assert (tmp_path / "ok" / "metrics.json").exists()
    rc, text = _torchrun(files, _args(files, tmp_path / "bad", 1), RANK1="3")
    assert rc != 0
    assert "the processes of this torchrun run have different settings (rank: rank 0 2, rank 1 3)" in text, text[-3000:]
    assert "internal error" not in text


def test_start_check_names_other_weights_and_a_peer_lost_before_the_first_step(monkeypatch, tmp_path):
    """The messages of the paths a 2-process run reaches only by accident: equal epochs from two
    different state.pt files, and a process that stops while the others gather."""
    import types

    import torch.distributed as dist

    from mmea_kernels.train import distributed
    from mmea_kernels.train.foundation import state_digest

    model = build_mace(PRESETS["tiny"])
    mine = state_digest(model, exact=True)
    other = {"start": 3, "weights": "0" * 16}
    monkeypatch.setattr(distributed, "_gather", lambda world, m: [m, other])
    r = types.SimpleNamespace(start_epoch=3, model=model)
    with pytest.raises(ValueError, match=rf"rank 1 starts from other weights than rank 0 \(digest 0{{16}} vs {mine}, "
                                         r"epoch 3\).*--out must be one directory that every process sees"):
        distributed.check_start(r, 2, tmp_path / "state.pt")
    with torch.no_grad():  # the exact digest sees a last-bit change that the float32 fingerprint may not
        w = next(model.parameters()).view(-1)
        w[0] = torch.nextafter(w[0], w[0] + 1)
    assert state_digest(model, exact=True) != mine
    monkeypatch.undo()

    def lost(out, obj):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")

    monkeypatch.setattr(dist, "all_gather_object", lost)
    with pytest.raises(PeerFailed, match=r"another process of this torchrun run stopped \(or did not answer within "
                                         r"600 s, MMEA_DIST_TIMEOUT\) before the first step \(\[gloo.*its own error"):
        distributed.check_start(r, 2, tmp_path / "state.pt")
