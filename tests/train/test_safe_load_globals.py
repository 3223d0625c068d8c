"""safe_load checks the classes and functions a file's pickles name against the package's own list
(PLAIN_GLOBALS), not only torch's weights-only registry: that registry is process-wide and grows when
parts of torch are imported (torch._dynamo, which the CLI imports, registers DeviceMesh, whose
unpickling calls init_process_group from the environment: a review's checkpoint opened a port, or
hung a process under WORLD_SIZE=2)."""
import io
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

import mmea_kernels as mk
from mmea_kernels.train.safe_load import UnsafeFileError, safe_load


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_device_mesh_in_a_checkpoint_is_refused_and_starts_nothing(tmp_path, monkeypatch):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import torch._dynamo  # noqa: F401 - registers DeviceMesh/DTensor as weights-only globals, as the CLI does
    from torch.distributed.device_mesh import DeviceMesh

    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "x", "trainable": {"w": torch.zeros(2)}, "metrics": {"n": _Reduce(DeviceMesh, ("cpu", [0]))}},
               path)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    try:
        with pytest.raises(UnsafeFileError, match="DeviceMesh"):
            safe_load(path, "checkpoint")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_plain_data_loads_in_the_zip_and_the_legacy_format(tmp_path):
    data = {"t": torch.arange(3.0), "p": torch.nn.Parameter(torch.ones(2)), "d": torch.float64, "s": torch.Size([2, 3]),
            "dev": torch.device("cpu"), "b": b"\x00\x01", "i": torch.tensor([1, 2]), "nested": [{"x": 1.5, "y": None}],
            "od": __import__("collections").OrderedDict(a=torch.zeros(1, dtype=torch.bfloat16)),
            "set": {1, 2}, "z": 1 + 2j}
    for kwargs in ({}, {"_use_new_zipfile_serialization": False}):  # (torch's weights-only reader refuses protocol 4)
        path = tmp_path / f"plain{len(kwargs)}.pt"
        torch.save(data, path, **kwargs)
        got = safe_load(path, "checkpoint")
        assert torch.equal(got["t"], data["t"]) and got["d"] is torch.float64 and got["b"] == b"\x00\x01"
        assert got["s"] == data["s"] and got["od"]["a"].dtype == torch.bfloat16
        assert got["set"] == {1, 2} and got["z"] == 1 + 2j


def _protocol4_payload(marker):
    """A pickle whose STACK_GLOBAL takes 'posix'/'system' from memo entries (not literal pushes
    right before it), calling os.system on load."""
    body = io.BytesIO()
    pickle.Pickler(body, protocol=4).dump(_Reduce(os.system, (f"touch {marker}",)))
    return body.getvalue()


def test_payloads_named_through_stack_global_or_memo_are_refused(tmp_path):
    marker = tmp_path / "ran"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(_protocol4_payload(marker))
    with pytest.raises(UnsafeFileError, match="system"):
        safe_load(raw, "checkpoint")
    # the strings of STACK_GLOBAL fetched back from the memo
    memo = (b"\x80\x04\x8c\x05posix\x94\x8c\x04echo\x94h\x00h\x01\x93\x94.")
    (tmp_path / "memo.pt").write_bytes(memo)
    with pytest.raises(UnsafeFileError, match="posix.echo"):
        safe_load(tmp_path / "memo.pt", "checkpoint")
    # a global whose name is computed (nothing resolvable right before STACK_GLOBAL)
    computed = b"\x80\x04\x8c\x05posix\x8c\x04echo\x86\x94(\x93."
    (tmp_path / "computed.pt").write_bytes(computed)
    with pytest.raises(UnsafeFileError):
        safe_load(tmp_path / "computed.pt", "checkpoint")
    assert not marker.exists()


def test_load_adapter_file_reads_a_file_without_running_it(tmp_path):
    from mmea_kernels.train.foundation import load_model

    model = load_model("builtin:mace-xtb-small")
    mk.inject_adapters(model, method="mmea", rank=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    torch.save(mk.adapter_state_dict(model), tmp_path / "adapter.pt")
    fresh = load_model("builtin:mace-xtb-small")
    mk.load_adapter_file(fresh, str(tmp_path / "adapter.pt"))
    want = {k: v for k, v in model.state_dict().items()}
    got = fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    marker = tmp_path / "ran"
    (tmp_path / "evil.pt").write_bytes(_protocol4_payload(marker))
    with pytest.raises(UnsafeFileError, match="adapter file"):
        mk.load_adapter_file(load_model("builtin:mace-xtb-small"), tmp_path / "evil.pt")
    assert not marker.exists()


def test_the_cli_refuses_a_device_mesh_checkpoint_in_a_fresh_process(tmp_path):
    """In a fresh process the CLI itself imports torch._dynamo; evaluate must refuse the file by name
    and leave torch.distributed alone (exit 2, no hang)."""
    pytest.importorskip("torch.distributed")
    script = (
        "import torch, torch._dynamo\n"
        "from torch.distributed.device_mesh import DeviceMesh\n"
        "class R:\n"
        "    def __reduce__(self): return (DeviceMesh, ('cpu', [0]))\n"
        f"torch.save({{'trainable': {{}}, 'metrics': R()}}, {str(tmp_path / 'ck.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    # WORLD_SIZE=1: evaluate refuses a larger one before reading anything (only finetune runs under torchrun)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    out = subprocess.run([sys.executable, "-m", "mmea_kernels", "evaluate", "--checkpoint", str(tmp_path / "ck.pt"),
                          "--data", "x.xyz"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "DeviceMesh" in out.stderr, out.stderr[-2000:]
