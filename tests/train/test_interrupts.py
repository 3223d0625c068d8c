"""A fine-tuning run that is interrupted (Ctrl-C, SIGTERM), hits a full disk, is extended or runs twice
in one directory at once leaves files that agree with each other, no temporary files, and a message
that says what ``state.pt`` holds; ``--resume auto`` then continues or finishes it."""
import builtins
import errno
import io
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("mace")
import ase.io  # noqa: E402

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.train import checkpoint as ck  # noqa: E402
from mmea_kernels.train import loop as ft  # noqa: E402
from mmea_kernels.train.foundation import ASSETS  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train (4 frames) and valid (2) of the shipped PBE ethanol set."""
    d = tmp_path_factory.mktemp("interrupts")
    frames = ase.io.read(str(ASSETS / "ethanol_pbe" / "train.xyz"), ":6")
    for a in frames:
        for k in [k for k in a.arrays if k not in ("numbers", "positions", "REF_forces")]:
            del a.arrays[k]
        a.info = {"REF_energy": a.info["REF_energy"]}
    ase.io.write(str(d / "train.xyz"), frames[:4])
    ase.io.write(str(d / "valid.xyz"), frames[4:6])
    return d


def _cli(d, out, *extra, epochs=1):
    return main(["finetune", "--train", str(d / "train.xyz"), "--valid", str(d / "valid.xyz"), "--out", str(out),
                 "--epochs", str(epochs), "--batch-size", "2", "--device", "cpu", "--no-progress", *extra])


def _hidden(directory):
    """Temporary (hidden) files left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _epoch(path):
    return torch.load(str(path), weights_only=True)["epoch"]


class _Cut:
    """A file whose writes stop after ``limit`` bytes with ``exc`` (a full disk, a kill)."""

    def __init__(self, fh, limit, exc):
        self.fh, self.left, self.exc = fh, limit, exc

    def write(self, data):
        if len(data) > self.left:
            self.fh.write(data[:self.left])
            self.fh.flush()
            self.left = 0
            raise self.exc
        self.left -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _cut_writes(monkeypatch, name, exc, limit=100):
    """Files opened for writing whose name contains ``name`` stop after ``limit`` bytes with ``exc``."""
    real = builtins.open

    def opened(file, mode="r", *a, **k):
        fh = real(file, mode, *a, **k)
        return _Cut(fh, limit, exc) if name in os.path.basename(str(file)) and set(mode) & set("wax+") else fh

    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(io, "open", opened)  # pathlib's


class _Escaped(Exception):
    """What SIGTERM raises in these tests when the CLI did not install its own handler."""


@pytest.fixture
def sigterm_guard():
    """A SIGTERM handler of the test's own around it, so that a CLI without one does not kill pytest."""
    def escaped(signum, frame):
        raise _Escaped("SIGTERM reached the test's handler")

    old = signal.signal(signal.SIGTERM, escaped)
    yield escaped
    signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------------------- defect 1
def test_metrics_json_is_whole_or_absent_and_an_unreadable_one_is_finished_again(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    with monkeypatch.context() as m:  # killed half-way through writing metrics.json
        _cut_writes(m, "metrics.json", KeyboardInterrupt())
        assert _cli(data, out) == 130
    assert not (out / "metrics.json").exists() and not _hidden(out)
    assert f"interrupted in the final evaluation, after the last epoch; {out / 'state.pt'} holds epoch 1" \
        in capsys.readouterr().out
    assert _cli(data, out, "--resume", "auto") == 0
    whole = (out / "metrics.json").read_text()
    assert json.loads(whole)["epochs_run"] == 1
    for bad in (whole[:len(whole) // 2], ""):  # cut short by an older version, or by a full disk
        (out / "metrics.json").write_text(bad)
        capsys.readouterr()
        assert _cli(data, out, "--resume", "auto") == 0
        assert "is not the finished run's result (it is unreadable" in capsys.readouterr().out
        again = json.loads((out / "metrics.json").read_text())
        assert (again["epochs_run"], again["valid"]) == (1, json.loads(whole)["valid"])
    # evaluate --json: an interrupted write leaves the old file as it was
    (tmp_path / "e.json").write_text("old")
    with monkeypatch.context() as m:
        _cut_writes(m, "e.json", KeyboardInterrupt())
        assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data / "valid.xyz"),
                     "--json", str(tmp_path / "e.json"), "--overwrite"]) == 130
    assert (tmp_path / "e.json").read_text() == "old" and _hidden(tmp_path) == []


# --------------------------------------------------------------------------------------- defect 2
class _Full:
    """A file on a disk with ``room`` bytes left."""

    def __init__(self, fh, room):
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()


def test_a_full_disk_is_named_leaves_no_temporary_file_and_resumes(data, tmp_path, capsys, monkeypatch):
    real, seen = torch.save, []

    def full_disk(obj, f, *a, **k):  # torch.save of the second state.pt on a disk that fills up
        if "state.pt" in str(f):
            seen.append(str(f))
        if len(seen) != 2 or "state.pt" not in str(f):
            return real(obj, f, *a, **k)
        fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        try:
            return real(obj, _Full(fh, 50_000), *a, **k)  # torch: RuntimeError 'unexpected pos ...'
        finally:
            if fh is not f:
                fh.close()

    out = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        assert _cli(data, out, epochs=2) == 2
    err = capsys.readouterr().err
    assert f"could not write {out / 'state.pt'}: No space left on device" in err and "internal error" not in err
    assert f"{out / 'state.pt'} holds epoch 1: free space, then run again with --resume" in err
    assert _epoch(out / "state.pt") == 1 and not _hidden(out)
    assert all(os.path.basename(s).startswith(".state.pt.") for s in seen)  # a name of its own per write
    with monkeypatch.context() as m:  # another file (the plot) on a full disk, after the last epoch
        m.setattr(ft, "plot_history", lambda h, path, t: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))))
        assert _cli(data, out, "--resume", "auto", epochs=2) == 2
    err = capsys.readouterr().err
    assert "learning_curve.png" in err and "No space left on device" in err and "internal error" not in err
    assert "holds epoch 2: free space, then run again with --resume to finish the run" in err
    assert not (out / "metrics.json").exists() and not _hidden(out)
    assert _cli(data, out, "--resume", "auto", epochs=2) == 0 and json.loads((out / "metrics.json").read_text())


def test_a_full_disk_before_any_state_leaves_a_directory_a_new_run_can_use(data, tmp_path, capsys, monkeypatch):
    """The first state.pt on a full disk (a review): the message said both "start the run again" and
    "--resume", and neither worked (checkpoint.pt without state.pt blocked a new run)."""
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if "state.pt" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *a, **k)

    out = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        assert _cli(data, out) == 2
    err = capsys.readouterr().err
    assert "no training state was saved (nothing of this run is left in --out): free space, then start the run " \
           "again" in err and "--resume" not in err
    assert not out.exists()  # the directory it made, empty again, removed as for any failed start
    assert _cli(data, out) == 0  # the same command, once there is room


def test_atomic_writes_go_through_symlinks_keep_modes_and_write_into_devices(tmp_path):
    """evaluate --json and relax --out write atomically (a review): a symlink was replaced by a file
    (its target kept the old content), a shared file lost its mode, and --json /dev/stdout replaced
    the system's /dev/stdout link (as root)."""
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    os.chmod(real, 0o664)
    link.symlink_to(real)
    ck.atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new" and stat.S_IMODE(real.stat().st_mode) == 0o664
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    ck.atomic_write_text(fifo, "streamed")
    reader.join(10)
    assert got == ["streamed"] and stat.S_ISFIFO(fifo.stat().st_mode) and not _hidden(tmp_path)


def test_atomic_save_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "x.pt").write_bytes(b"old")
    with monkeypatch.context() as m:
        _cut_writes(m, "x.pt", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), limit=1000)
        with pytest.raises(OSError, match=r"could not write .*x\.pt: No space left on device \(the disk") as exc:
            ck.atomic_save({"a": torch.zeros(10_000)}, tmp_path / "x.pt")
    assert exc.value.errno == errno.ENOSPC
    assert (tmp_path / "x.pt").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


# --------------------------------------------------------------------------------------- defect 3
def test_a_second_run_in_the_same_directory_is_refused(data, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(  # another process holding the directory's lock, as a running finetune does
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'4242 elsewhere')\nprint('locked', flush=True)\ntime.sleep(60)",
         str(out / ".mmea-kernels.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _cli(data, out) == 2
        err = capsys.readouterr().err
        assert f"output directory {out} (--out) is in use by another process (process 4242 on elsewhere)" in err
        assert sorted(p.name for p in out.iterdir()) == [".mmea-kernels.lock"]  # nothing written
        with pytest.raises(ft.DirectoryInUse):
            ft.finetune(ft.FinetuneConfig(train=str(data / "train.xyz"), out_dir=str(out), progress=False))
    finally:
        holder.kill()  # the lock goes with the process
        holder.wait()
    assert _cli(data, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "learning_curve.png", "metrics.json", "state.pt"]


# --------------------------------------------------------------------------------------- defect 4
def test_training_on_past_a_finished_run_drops_its_metrics(data, tmp_path, capsys):
    out = tmp_path / "r"
    assert _cli(data, out) == 0
    finished = (out / "metrics.json").read_text()
    # trained on to more epochs, stopped (killed) after epoch 2: no metrics.json of epoch 1 beside state 2
    assert _cli(data, out, "--resume", "auto", "--stop-after", "1", epochs=3) == 3
    assert _epoch(out / "state.pt") == 2 and not (out / "metrics.json").exists()
    assert _cli(data, out, "--resume", "auto") == 0  # the original command finishes the run of state.pt
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    (out / "metrics.json").write_text(finished)  # a directory left so by an earlier version
    capsys.readouterr()
    assert _cli(data, out, "--resume", "auto") == 0
    assert "is not the finished run's result (it is of epoch 1, state.pt of epoch 2)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2


# --------------------------------------------------------------------------------------- defect 5
def test_sigterm_is_an_interrupt_that_cleans_up(data, tmp_path, capsys, monkeypatch, sigterm_guard):
    real, calls = torch.save, []

    def terminated(obj, f, *a, **k):  # SIGTERM while the second state.pt is half written
        calls.append(str(f))
        real(obj, f, *a, **k)
        if "state.pt" in str(f) and sum("state.pt" in c for c in calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(torch, "save", terminated)
        assert _cli(data, out, epochs=2) == 143
    cap = capsys.readouterr()
    assert "terminated (SIGTERM)" in cap.err and f"interrupted in epoch 2; {out / 'state.pt'} holds epoch 1" in cap.out
    assert _epoch(out / "state.pt") == 1 and not _hidden(out)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the handler before, back
    # Ctrl-C in the final evaluation says which epoch state.pt holds
    with monkeypatch.context() as m:
        m.setattr(ft, "split_errors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert _cli(data, out, "--resume", "auto", epochs=2) == 130
    assert f"interrupted in the final evaluation, after the last epoch; {out / 'state.pt'} holds epoch 2: run again " \
        "with --resume" in capsys.readouterr().out
    assert _cli(data, out, "--resume", "auto", epochs=2) == 0
    # predict: terminated while writing its output, no partial file
    real_write = ase.io.write

    def write_then_term(*a, **k):
        real_write(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(ase.io, "write", write_then_term)
        assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data / "valid.xyz"),
                     "--out", str(tmp_path / "p.xyz")]) == 143
    assert not (tmp_path / "p.xyz").exists() and _hidden(tmp_path) == []


def test_atomic_path_keeps_the_old_file_on_a_full_disk_and_streams_into_a_fifo(tmp_path):
    """``atomic_path`` (predict, export, md's state, the rMD17 files): a full disk inside the block is
    a WriteFailed naming the file, the old file stays and no temporary file is left; an interrupt
    likewise; a FIFO is handed out as it is (written directly, never renamed over)."""
    from mmea_kernels.train.atomic import WriteFailed, atomic_path

    old = tmp_path / "p.xyz"
    old.write_text("old")
    for exc in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()):
        with pytest.raises((WriteFailed, KeyboardInterrupt)) as got:
            with atomic_path(old, suffix=".part") as tmp:
                pathlib.Path(tmp).write_text("half")
                raise exc
        if isinstance(exc, OSError):
            assert isinstance(got.value, WriteFailed) and "could not write" in str(got.value) and "p.xyz" in str(got.value)
        assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["p.xyz"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with atomic_path(fifo) as name:
        assert name == str(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_dev_stdout_is_appended_to_not_replaced_and_a_pipe_works(tmp_path):
    """``--json /dev/stdout`` (a review): /dev/stdout resolves to whatever the shell connected, so the
    atomic rename replaced the user's log file (``>> results.log``: its earlier lines gone) and failed
    on a pipe (no directory to put a temporary file in). It is written into, appended to."""
    code = "from mmea_kernels.train.atomic import atomic_write_text; atomic_write_text('/dev/stdout', 'json\\n')"
    log = tmp_path / "results.log"
    log.write_text("earlier\n")
    with open(log, "a") as fh:
        assert subprocess.run([sys.executable, "-c", code], stdout=fh).returncode == 0
    assert log.read_text() == "earlier\njson\n"
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stdout == "json\n", piped.stderr


def test_a_symlink_into_a_missing_directory_is_named(tmp_path):
    from mmea_kernels.train.atomic import atomic_path

    (tmp_path / "dl.xyz").symlink_to(tmp_path / "gone" / "out.xyz")
    with pytest.raises(FileNotFoundError, match=r"cannot write .*dl.xyz: the directory .*gone does not exist "
                                                r"\(where the symlink .*dl.xyz points\)"):
        with atomic_path(tmp_path / "dl.xyz"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl.xyz"]


def test_held_signals_are_replayed_in_order_and_an_error_in_the_block_wins():
    from mmea_kernels.app.trajfile import deferred_interrupts

    seen = []
    old_term = signal.signal(signal.SIGTERM, lambda s, f: seen.append("term"))  # a handler that does not raise
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append("block done")
        assert seen == ["block done", "term"]  # SIGTERM once, then Ctrl-C's KeyboardInterrupt: none lost
        with pytest.raises(OSError, match="No space left"):  # the write's own error, not the held Ctrl-C
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def test_a_regular_file_under_dev_shm_is_replaced_whole_not_appended_to():
    """/dev/shm is a tmpfs used as scratch: its files are files (the first stream rule took any name under
    /dev for a stream, and state.pt, checkpoint.pt and metrics.json there grew by appending)."""
    import tempfile

    from mmea_kernels.train.atomic import atomic_write_text, is_stream

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    d = tempfile.mkdtemp(dir="/dev/shm")
    try:
        path = os.path.join(d, "m.json")
        atomic_write_text(path, '{"epoch": 1}')
        atomic_write_text(path, '{"epoch": 2}')
        assert open(path).read() == '{"epoch": 2}' and not is_stream(path)
        assert is_stream("/dev/stdout") and is_stream("/proc/self/fd/1") and is_stream("/dev/null")
        assert is_stream("/dev/stdin") and is_stream("/dev/fd/2") and not is_stream(os.path.join(d, "x.xyz"))
    finally:
        import shutil

        shutil.rmtree(d)
