"""Fuzz (issue #9): hypothesis-made corruptions of a valid extended-XYZ file (truncation, NaN/inf,
missing keys, wrong atom counts, garbage lines, duplicated atoms) through the reader and through a
1-epoch ``finetune``. Every run ends in success with finite results, or in exit 2 with a one-line
message naming the file; never a traceback, an unexpected exception, a hang or NaN in the outputs."""
import contextlib
import json
import math
import pathlib
import re
import signal
import tempfile

import pytest

pytest.importorskip("mace")
import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.train import read_frames  # noqa: E402
from mmea_kernels.train.foundation import ASSETS  # noqa: E402

_TMP = pathlib.Path(tempfile.mkdtemp(prefix="mmea-fuzz-"))


def _clean_text(n: int, start: int = 0) -> str:
    frames = ase.io.read(str(ASSETS / "ethanol_pbe" / "train.xyz"), f"{start}:{start + n}")
    for a in frames:
        for k in [k for k in a.arrays if k not in ("numbers", "positions", "REF_forces")]:
            del a.arrays[k]
        a.info = {"REF_energy": a.info["REF_energy"]}
    path = _TMP / f"clean{start}.xyz"
    ase.io.write(str(path), frames)
    return path.read_text()


CLEAN = _clean_text(3)
VALID = _TMP / "valid.xyz"
VALID.write_text(_clean_text(1, start=10))
NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")
OPS = ("truncate", "nonfinite", "drop_key", "atom_count", "garbage", "duplicate_atom")


def _corrupt(text: str, op: str, a: int, b: int) -> str:
    lines = text.splitlines(keepends=True)
    heads = [i for i, line in enumerate(lines) if line.strip().isdigit()]  # atom-count lines
    if op == "truncate":
        return text[: a % (len(text) + 1)]
    if op == "nonfinite":
        nums = list(NUMBER.finditer(text))
        m = nums[a % len(nums)]
        return text[: m.start()] + ("nan", "inf", "-inf", "NaN")[b % 4] + text[m.end():]
    if op == "drop_key":
        h = heads[a % len(heads)] + 1
        lines[h] = (re.sub(r"REF_energy=\S+ ?", "", lines[h]) if b % 2 else
                    lines[h].replace(":REF_forces:R:3", "").replace("REF_forces", "F"))
        return "".join(lines)
    if op == "atom_count":
        lines[heads[a % len(heads)]] = f"{b % 14}\n"
        return "".join(lines)
    if op == "garbage":
        junk = ("@@ garbage line", "C 1 2", "", "9", "Properties=species:S:1", "\x00\x01binary", "nan nan nan")[b % 7]
        lines.insert(a % (len(lines) + 1), junk + "\n")
        return "".join(lines)
    # duplicate_atom: copy an atom line within its frame, optionally fixing the count (coincident atoms)
    h = heads[a % len(heads)]
    atom = h + 2 + b % 9
    lines.insert(atom, lines[atom])
    if b % 2:
        lines[h] = f"{int(lines[h]) + 1}\n"
    return "".join(lines)


corruptions = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10_000), st.integers(0, 10_000)),
                       min_size=1, max_size=3)


def _apply(ops) -> pathlib.Path:
    text = CLEAN
    for op, a, b in ops:
        try:
            text = _corrupt(text, op, a, b)
        except (IndexError, ValueError, ZeroDivisionError):
            pass  # an earlier corruption left nothing this one applies to: a no-op
    path = _TMP / "fuzz.xyz"
    path.write_text(text)
    return path


@contextlib.contextmanager
def _deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"no result after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruptions)
def test_reader_accepts_finite_frames_or_names_the_problem(ops):
    path = _apply(ops)
    try:
        with _deadline(20):
            frames = read_frames(str(path), "REF_energy", "REF_forces")
    except (ValueError, KeyError, FileNotFoundError) as exc:
        msg = str(exc.args[0] if isinstance(exc, KeyError) else exc)
        assert "fuzz.xyz" in msg and "\n" not in msg.strip(), msg
        return
    assert frames
    for a in frames:
        assert np.isfinite(a.positions).all() and math.isfinite(a.info["REF_energy"])
        assert a.arrays["REF_forces"].shape == (len(a), 3) and np.isfinite(a.arrays["REF_forces"]).all()


def _finite_numbers(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


_RUNS = iter(range(10 ** 6))


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@example(ops=[])  # the clean file: trains, finite metrics
@example(ops=[("truncate", 2500, 0)])
@example(ops=[("nonfinite", 40, 0)])
@example(ops=[("drop_key", 1, 1)])
@example(ops=[("atom_count", 0, 5)])
@example(ops=[("garbage", 14, 0)])
@example(ops=[("duplicate_atom", 0, 3)])
@given(ops=corruptions)
def test_finetune_exits_0_or_2_with_a_message(ops, capsys):
    path = _apply(ops)
    out = _TMP / f"run{next(_RUNS)}"
    capsys.readouterr()
    with _deadline(120):
        rc = main(["finetune", "--train", str(path), "--valid", str(VALID), "--out", str(out), "--epochs", "1",
                   "--batch-size", "2", "--no-progress"])
    cap = capsys.readouterr()
    assert rc in (0, 2), (ops, cap.err[-2000:])
    assert "Traceback" not in cap.err + cap.out
    if rc == 2:
        err = "\n".join(ln for ln in cap.err.strip().splitlines()  # a warning (a file cut short) may come first
                         if not ln.startswith("mmea-kernels finetune: warning: "))
        assert err.startswith("mmea-kernels finetune: error: ") and "\n" not in err and "fuzz.xyz" in err, err
        assert not out.exists()
        return
    metrics = json.loads((out / "metrics.json").read_text())
    assert _finite_numbers(metrics) and metrics["train"]["frames"] >= 1
