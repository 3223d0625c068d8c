"""Benchmark plumbing: every benchmark adds a row (op, provider, mode, size, median, p20, p80,
device, date); at the end the rows go to bench/results/<device>-<date>.json and an overhead
table (each provider against the base linear of the same size, same run; unpaired, so its header
says it is an indication only) is printed."""
import datetime
import json
import os
import pathlib
import platform
import statistics

import pytest
import torch

# the compiled provider is compiled once per (layer, N, dtype): keep every version instead of
# silently falling back to eager after dynamo's default limit of 8
torch._dynamo.config.cache_size_limit = 256
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = 256

ROWS = []
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def _quantile(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@pytest.fixture
def record(benchmark):
    """``record(op, provider, mode, size)`` after ``benchmark.pedantic(...)`` stores the row."""

    def _record(op, provider, mode, size, **extra):
        data = benchmark.stats.stats.data
        ROWS.append({
            "op": op, "provider": provider, "mode": mode, "size": size,
            "median_ms": 1e3 * statistics.median(data), "p20_ms": 1e3 * _quantile(data, 0.2),
            "p80_ms": 1e3 * _quantile(data, 0.8), "rounds": len(data), "device": device_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), **extra,
        })

    return _record


# the provider each op's overhead column is taken against ("base" unless named here)
BASELINE = {"mace_energy_forces": "frozen", "mace_adapter_step": "elora"}


def overhead_table(rows):
    base = {(r["op"], r["mode"], r["size"]): r["median_ms"] for r in rows
            if r["provider"] == BASELINE.get(r["op"], "base")}
    lines = ["# UNPAIRED: each provider is its own pytest-benchmark test, not alternated with its baseline,",
             "# so 'overhead' is a ratio of medians from different moments of a drifting machine: an indication,",
             "# not a claim. Quote the paired ratios of bench/linear_speed.py and bench/model_overhead.py.",
             f"{'op':<20}{'size':<44}{'mode':<8}{'provider':<11}{'median ms':>11}{'overhead':>10}"]
    for r in rows:
        b = base.get((r["op"], r["mode"], r["size"]))
        ov = "" if b is None or r["provider"] == BASELINE.get(r["op"], "base") else f"{100 * (r['median_ms'] / b - 1):+.0f} %"
        lines.append(f"{r['op']:<20}{r['size']:<44}{r['mode']:<8}{r['provider']:<11}{r['median_ms']:>11.2f}{ov:>10}")
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
    quick = "-quick" if os.environ.get("MMEA_BENCH_QUICK") == "1" else ""
    path = RESULTS / f"{device_name()}-{stamp}{quick}.json"  # never overwrite an earlier run
    path.write_text(json.dumps(ROWS, indent=1))
    table = overhead_table(ROWS)
    (path.with_suffix(".txt")).write_text(table + "\n")
    print("\n" + table + f"\n\nrows written to {path}")
