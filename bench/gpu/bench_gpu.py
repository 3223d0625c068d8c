"""GPU benchmark for a lent device machine: each implementation of the adapted linear against the
base ``o3.Linear`` (same run), the gate kernels alone against the card's measured copy bandwidth,
cuEquivariance's ``cuet.Linear`` where it is installed, and ``FusedGate`` against e3nn's ``Gate``
where the package has it.

Every configuration is checked against a float64 reference first (tolerance per dtype:
:func:`tolerance`), runs inside its own try/except (a failure is a row with ``error``, the run goes
on), and each row is appended to ``<out>/<card>-<date>-gpu.jsonl`` as soon as it is measured; the
summary JSON and the table are written at the end.

Timing. Comparisons (the adapted linear against the base ``o3.Linear``, FusedGate against e3nn's
``Gate``) are paired: every provider is timed once per round, the order rotated each round, over
``--rounds`` rounds; each row carries the median of its per-round times and the median (and IQR) of
its per-round ratios to the base. A round's time is wall time per call of back-to-back calls,
synchronised once at the end (:meth:`Timer.wall_ms`): host launch cost and device time, whichever
bounds, as an eager PyTorch user pays them. Forward rows also get ``graph_ms``
(``do_bench_cudagraph``: device time alone, inputs left in L2). Gate kernels against copy
bandwidth use ``triton.testing.do_bench`` (L2 flushed before each call: the bytes come from memory);
sizes whose bytes are under 4x the card's L2 are marked ``l2_resident`` and not compared.

    python bench/gpu/bench_gpu.py --out $OUT          # on a CUDA machine
    TRITON_INTERPRET=1 python bench/gpu/bench_gpu.py --small --out /tmp/b   # the same code on CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import signal
import pathlib
import statistics
import time
import traceback

import torch
from e3nn import o3

from mmea_kernels import IrrepsLayout, MMEALinear, gate_mul, seg_dot
from mmea_kernels.ops import backend_status
from mmea_kernels.ops.gated_linear import fp32_precision, gated_linear
from mmea_kernels.linear_spec import LinearSpec

LAYERS = {
    "128x0e+128x1o": ("128x0e+128x1o", "128x0e+128x1o"),
    "128x0e+128x1o+128x2e+128x3o": ("128x0e+128x1o+128x2e+128x3o",) * 2,
    "mace-interaction-1": ("128x0e+128x0e+128x1o+128x1o+128x1o+128x2e+128x2e+128x2e+128x3o+128x3o",
                           "128x0e+128x1o+128x2e+128x3o"),
}
SMALL_LAYERS = {"small": ("4x0e+4x0e+3x1o+2x2e", "4x0e+3x1o+2x2e+1x3o")}
# scalars, gates, gated, as in SevenNet-0's checkpoint (bench/gate_speed.py reads them from it): silu on
# the scalars and on both gate blocks (not sigmoid)
GATE_SHAPES = {"sevennet-0": ("128x0e", "64x0e+32x0e", "64x1e+32x2e")}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def tolerance(dtype: torch.dtype, fp32_dot: str = "tf32x3") -> float:
    """Largest accepted ``max|y - y_ref| / max(max|y_ref|, 1)`` against the float64 reference.

    bf16 stores 8 mantissa bits (relative rounding 2**-9 ≈ 2e-3 per value) and sums 100-1000
    products per output: a CPU emulation of the fused bf16 path gave 0.031, so 0.06 leaves room for
    a different summation order. fp32: IEEE or tf32x3 dot products stay near 1e-6 relative;
    plain tf32 (10 mantissa bits) near 1e-3."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 5e-3 if fp32_dot == "tf32" else 1e-4
    if dtype in (torch.bfloat16, torch.float16):
        return 6e-2
    raise TypeError(f"no tolerance for {dtype}")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1.0)) if ref.numel() else 0.0


def check(name: str, y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, fp32_dot=None) -> float:
    err = rel_err(y, ref)
    tol = tolerance(dtype, fp32_dot or fp32_precision())
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} against the float64 reference exceeds {tol:.1e}")
    return err


# ============================================================================ timing
class Timer:
    """``ms(fn)`` and ``graph_ms(fn)``: medians in milliseconds."""

    def __init__(self, device: torch.device, small: bool):
        self.device, self.small = device, small
        if device.type == "cuda":
            import triton.testing as tt
            self._tt = tt

    def ms(self, fn) -> float:
        if self.device.type == "cuda":
            return float(self._tt.do_bench(fn, warmup=5 if self.small else 10, rep=20 if self.small else 40,
                                           return_mode="median"))
        fn()
        ts = []
        for _ in range(2 if self.small else 10):
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
        return statistics.median(ts)

    def wall_ms(self, fn, calls: int = 10) -> float:
        """Milliseconds per call of ``calls`` back-to-back calls, synchronised once at the end."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        for _ in range(calls if self.device.type == "cuda" else 1):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return 1e3 * (time.perf_counter() - t) / (calls if self.device.type == "cuda" else 1)

    def paired(self, fns: dict, rounds: int, warmup: int = 3) -> dict:
        """``{name: per-round ms}``: each callable (after ``warmup`` untimed calls: autotuning,
        compilation, allocator) timed once per round by :meth:`wall_ms`, in an order rotated every
        round."""
        names = list(fns)
        for f in fns.values():
            for _ in range(warmup):
                f()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times = {n: [] for n in names}
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                times[n].append(self.wall_ms(fns[n]))
        return times

    def graph_ms(self, fn):
        if self.device.type != "cuda":
            return None
        try:
            return float(self._tt.do_bench_cudagraph(fn, rep=20, return_mode="median"))
        except Exception:  # noqa: BLE001 - some callables do not capture; the eager time stands
            return None


def paired_stats(times: dict, base: str) -> dict:
    """``{name: {median_ms, ratio_vs_base, ratio_iqr}}`` from :meth:`Timer.paired`'s times: the
    median of the per-round ratios to ``base`` (not a ratio of medians) and their quartiles."""
    out = {}
    for name, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, times[base]))
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {"median_ms": statistics.median(ts), "ratio_vs_base": statistics.median(ratios),
                     "ratio_iqr": [q[0], q[2]], "rounds": len(ts)}
    return out


def l2_bytes(device) -> int:
    """The card's L2 cache in bytes (0 where unknown, or off CUDA)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def copy_bandwidth(device, numel, timer) -> float:
    a = torch.empty(numel, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ms = timer.ms(lambda: b.copy_(a))
    return 2 * a.element_size() * numel / (ms * 1e-3) / 1e9


# ============================================================================ cases
def gate_bytes(op: str, layer: str, n: int, dtype: torch.dtype) -> int:
    """Bytes one call must move: gate_mul reads x and the gates and writes y; seg_dot reads the
    gated columns of a and b (never the 0e ones) and writes [N, G]."""
    L = IrrepsLayout.of((LAYERS | SMALL_LAYERS)[layer][1], "mul_ir")
    e = torch.empty((), dtype=dtype).element_size()
    if op == "gate_mul":
        return (2 * L.dim + L.num_gates) * n * e
    return (2 * (L.dim - L.num_scalars) + L.num_gates) * n * e


def gate_inputs(layer, n):
    """(output layout, seeded float64 x, b, gates of ``n`` rows, gate_mul(x, gates) and
    seg_dot(x, b) from the torch reference) for the gate benchmarks of ``layer``."""
    L = IrrepsLayout.of((LAYERS | SMALL_LAYERS)[layer][1], "mul_ir")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x64 = torch.randn(n, L.dim, generator=gen, dtype=torch.float64)
    b64 = torch.randn(n, L.dim, generator=gen, dtype=torch.float64)
    g64 = torch.rand(n, L.num_gates, generator=gen, dtype=torch.float64) + 0.5
    return L, x64, b64, g64, gate_mul(x64, g64, L, backend="torch"), seg_dot(x64, b64, L, backend="torch")


def gate_cases(layer, n, dtype, device, timer):
    """gate_mul and seg_dot of every available backend; distinct a/b so seg_dot's bytes (the gated
    columns of a and of b, and the [N, G] result) are each read once."""
    L, x64, b64, g64, ref_mul, ref_dot = gate_inputs(layer, n)
    x, b, g = (t.to(device=device, dtype=dtype) for t in (x64, b64, g64))
    nbytes = {op: gate_bytes(op, layer, n, dtype) for op in ("gate_mul", "seg_dot")}
    for be in ("torch", "triton", "cpp"):
        if not backend_status(be, device)[0]:
            continue
        for op, fn, ref in (("gate_mul", lambda: gate_mul(x, g, L, backend=be), ref_mul),
                            ("seg_dot", lambda: seg_dot(x, b, L, backend=be), ref_dot)):
            err = check(f"{op} {be}", fn(), ref.to(device), dtype)
            ms = timer.ms(fn)  # do_bench: L2 flushed before each call, the bytes come from memory
            yield {"op": op, "provider": be, "mode": "fwd", "layer": layer, "N": n, "dtype": DTYPE_NAMES[dtype],
                   "median_ms": ms, "graph_ms": timer.graph_ms(fn), "bytes": nbytes[op],
                   "GB/s": nbytes[op] / (ms * 1e-3) / 1e9, "rel_err": err,
                   "l2_resident": nbytes[op] < 4 * l2_bytes(device)}


def _linear_variants(lin, x, g, add, irreps_in, irreps_out, device, dtype, cuet_too=True):
    Lout = IrrepsLayout.of(irreps_out, "mul_ir")
    spec = LinearSpec.from_e3nn(lin)
    scal = torch.tensor(Lout.scalar_columns, device=device)
    variants = {"base": lambda: lin(x)}
    for be in ("torch", "triton", "cpp"):
        if backend_status(be, device)[0]:
            variants[f"linear+{be}-gate"] = (
                lambda be=be: torch.index_add(gate_mul(lin(x), g, Lout, backend=be), 1, scal, add))
    if backend_status("triton", device)[0]:
        variants["fused"] = lambda: gated_linear(x, lin.weight, None, g, add, spec, backend="triton")
    ad = MMEALinear(lin, rank=16).to(device=device, dtype=dtype)  # the whole adapter (gate network too)
    variants["MMEALinear"] = lambda: ad(x)
    try:  # cuEquivariance's linear (ir_mul native) and the adapter on it
        if not cuet_too:
            return variants
        import cuequivariance as cue
        import cuequivariance_torch as cuet
        clin = cuet.Linear(cue.Irreps("O3", irreps_in), cue.Irreps("O3", irreps_out), layout=cue.ir_mul,
                           device=device, dtype=dtype)
        clin.requires_grad_(False)  # frozen, as the base o3.Linear: no weight gradient in fwd+bwd
        variants["cuet"] = lambda: clin(x)
        cad = MMEALinear(clin, rank=16).to(device=device, dtype=dtype)
        variants["cuet+MMEALinear"] = lambda: cad(x)
    except Exception as exc:  # noqa: BLE001 - not installed, or no CUDA ops
        print(f"cuEquivariance skipped: {type(exc).__name__}: {exc}")
    return variants


def layer_inputs(layer, n):
    """A seeded float64 ``o3.Linear`` of ``layer``, its spec, output layout, inputs (x, gates,
    additive) of ``n`` rows and the float64 reference of the gated layer."""
    irreps_in, irreps_out = (LAYERS | SMALL_LAYERS)[layer]
    torch.manual_seed(0)
    lin64 = o3.Linear(irreps_in, irreps_out)
    spec = LinearSpec.from_e3nn(lin64)
    Lout = IrrepsLayout.of(irreps_out, "mul_ir")
    gen = torch.Generator(device="cpu").manual_seed(1)
    x64 = torch.randn(n, lin64.irreps_in.dim, generator=gen, dtype=torch.float64)
    g64 = torch.rand(n, Lout.num_gates, generator=gen, dtype=torch.float64) + 0.5
    a64 = torch.randn(n, Lout.num_scalars, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = gated_linear(x64, lin64.weight.double(), None, g64, a64, spec, backend="torch")
    return lin64, spec, Lout, x64, g64, a64, ref


def linear_cases(layer, n, dtype, device, timer, cuet_too=True, rounds=15):
    """Every implementation of the adapted linear against the base ``o3.Linear``, each checked
    first (the gated ones against the float64 gated layer; ``MMEALinear``, at its identity
    initialisation, against the float64 base layer; ``cuet+MMEALinear`` against ``cuet``), then
    timed in paired rounds, forward and forward + input gradient."""
    irreps_in, irreps_out = (LAYERS | SMALL_LAYERS)[layer]
    lin64, spec, Lout, x64, g64, a64, ref = layer_inputs(layer, n)
    with torch.no_grad():  # the float64 base layer (no gate): MMEALinear's output at initialisation
        ref_base = gated_linear(x64, lin64.weight.double(), None, None, None, spec, backend="torch")
    lin = lin64.to(device=device, dtype=dtype)
    lin.requires_grad_(False)
    x = x64.to(device=device, dtype=dtype).requires_grad_()
    g, add = g64.to(device=device, dtype=dtype), a64.to(device=device, dtype=dtype)
    gy = torch.randn(n, Lout.dim, device=device, dtype=dtype)
    variants = _linear_variants(lin, x, g, add, irreps_in, irreps_out, device, dtype, cuet_too)
    errs = {}
    with torch.no_grad():
        for name, fn in variants.items():
            want = {"MMEALinear": ref_base.to(device), "base": ref_base.to(device)}.get(name, ref.to(device))
            if name == "cuet":
                continue  # its own random weights: no float64 reference
            if name == "cuet+MMEALinear":
                want = variants["cuet"]().double()
            errs[name] = check(name, fn(), want, dtype)
    for mode in ("fwd", "fwd+bwd"):
        def step(fn, mode=mode):
            if mode == "fwd":
                with torch.no_grad():
                    fn()
            else:
                x.grad = None
                fn().backward(gy)
        fns = {name: (lambda fn=fn: step(fn)) for name, fn in variants.items()}
        stats = paired_stats(timer.paired(fns, rounds), "base")
        for name, fn in fns.items():
            yield {"op": "adapted_linear", "provider": name, "mode": mode, "layer": layer, "N": n,
                   "dtype": DTYPE_NAMES[dtype], **stats[name],
                   "graph_ms": timer.graph_ms(fn) if mode == "fwd" else None, "rel_err": errs.get(name)}


def fused_gate_cases(n, dtype, device, timer, rounds=15):
    """FusedGate against e3nn's Gate on SevenNet-0's gate shape (when FusedGate exists)."""
    try:
        from mmea_kernels.nn import FusedGate
    except ImportError:
        return
    from e3nn import nn as enn
    scalars, gates, gated = GATE_SHAPES["sevennet-0"]
    torch.manual_seed(0)
    silu = torch.nn.functional.silu
    acts_g = [silu] * len(o3.Irreps(gates))  # SevenNet-0 gates with silu (its checkpoint's act_gates)
    eg = enn.Gate(scalars, [silu], gates, acts_g, gated)
    fg = FusedGate(scalars, [silu], gates, acts_g, gated)
    x64 = torch.randn(n, eg.irreps_in.dim, dtype=torch.float64)
    ref = eg(x64)
    x = x64.to(device=device, dtype=dtype).requires_grad_()
    gy = torch.randn(n, eg.irreps_out.dim, device=device, dtype=dtype)
    mods = {"e3nn-Gate": eg.to(device), "FusedGate": fg.to(device)}
    errs = {name: check(name, mod(x).detach(), ref.to(device), dtype) for name, mod in mods.items()}
    for mode in ("fwd", "fwd+bwd"):
        def step(mod, mode=mode):
            if mode == "fwd":
                with torch.no_grad():
                    mod(x)
            else:
                x.grad = None
                mod(x).backward(gy)
        fns = {name: (lambda mod=mod: step(mod)) for name, mod in mods.items()}
        stats = paired_stats(timer.paired(fns, rounds), "e3nn-Gate")
        for name, fn in fns.items():
            yield {"op": "gate_nonlinearity", "provider": name, "mode": mode, "layer": "sevennet-0", "N": n,
                   "dtype": DTYPE_NAMES[dtype], **stats[name],
                   "graph_ms": timer.graph_ms(fn) if mode == "fwd" else None, "rel_err": errs[name],
                   "bytes": (eg.irreps_in.dim + eg.irreps_out.dim) * n * x.element_size()}


def gate_net_cases(n, dtype, device, timer):
    """The MMEA gate net of a MACE layer (128 0e inputs, rank 16, 128 additive + 384 gates): the torch
    composition against the Triton kernels, forward and forward + input gradient, each checked
    against float64 first."""
    from mmea_kernels.ops.gate_net import gate_net, gate_net_reference, gate_net_status
    gen = torch.Generator(device="cpu").manual_seed(0)
    x64 = torch.randn(n, 128, generator=gen, dtype=torch.float64)
    p64 = [torch.randn(16, 128, generator=gen, dtype=torch.float64) / 128 ** 0.5,
           torch.randn(16, generator=gen, dtype=torch.float64),
           torch.randn(512, 16, generator=gen, dtype=torch.float64) / 4, torch.randn(512, generator=gen, dtype=torch.float64)]
    ref = torch.cat(gate_net_reference(x64, *p64, 128), 1)
    x = x64.to(device=device, dtype=dtype).requires_grad_()
    ps = [p.to(device=device, dtype=dtype) for p in p64]
    dy = torch.randn(n, 512, device=device, dtype=dtype)
    providers = {"torch": lambda: gate_net_reference(x, *ps, 128)}
    if gate_net_status("triton", x, 16)[0]:
        providers["triton"] = lambda: gate_net(x, *ps, 128, backend="triton")
    for name, fn in providers.items():
        with torch.no_grad():
            err = check(f"gate_net {name}", torch.cat(fn(), 1), ref.to(device), dtype)

        def fwd(fn=fn):
            with torch.no_grad():
                fn()

        def fwd_grad(fn=fn):
            a, g = fn()
            torch.autograd.grad((a, g), x, (dy[:, :128], dy[:, 128:]))

        for mode, step in (("fwd", fwd), ("fwd+grad_x", fwd_grad)):
            yield {"op": "gate_net", "provider": name, "mode": mode, "layer": "128x0e r16 -> 128+384", "N": n,
                   "dtype": DTYPE_NAMES[dtype], "median_ms": timer.ms(step), "graph_ms": timer.graph_ms(step),
                   "rel_err": err}


def host_cost_us(fn, device, calls: int) -> float:
    """Microseconds per call of ``calls`` back-to-back calls, synchronised once at the end: at
    launch-bound sizes this is the host's cost per call (Python, dispatch, launches)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e6 * (time.perf_counter() - t) / calls


def host_overhead_cases(layer, device, small):
    """Host cost per call at launch-bound sizes (16 rows): one torch op, one Triton gate_mul launch
    (and the CUDA extension's), the fused linear, MMEALinear and the bare o3.Linear, forward and
    forward with the input gradient. Says whether a whole model on this card is bound by Python and
    launches, and how much of that is Triton's launcher."""
    irreps_in, irreps_out = (LAYERS | SMALL_LAYERS)[layer]
    n, calls = 16, (3 if small else 300)
    torch.manual_seed(0)
    lin = o3.Linear(irreps_in, irreps_out).to(device)
    lin.requires_grad_(False)
    ad = MMEALinear(lin, rank=16).to(device)
    spec = LinearSpec.from_e3nn(lin)
    L = IrrepsLayout.of(irreps_out, "mul_ir")
    x = torch.randn(n, lin.irreps_in.dim, device=device, requires_grad=True)
    y0 = torch.randn(n, L.dim, device=device)
    g = torch.rand(n, L.num_gates, device=device) + 0.5
    add = torch.randn(n, L.num_scalars, device=device)
    a, b = torch.randn(n, 64, device=device), torch.randn(n, 64, device=device)
    cases = {"torch.mul": lambda: torch.mul(a, b)}
    for be in ("triton", "cpp"):
        if backend_status(be, device)[0]:
            cases[f"gate_mul {be}"] = lambda be=be: gate_mul(y0, g, L, backend=be)
    if backend_status("triton", device)[0]:
        cases["fused linear (no grad)"] = lambda: gated_linear(x.detach(), lin.weight, None, g, add, spec,
                                                               backend="triton")
    for name, mod in (("o3.Linear", lin), ("MMEALinear", ad)):
        def fwd(mod=mod):
            with torch.no_grad():
                mod(x)

        def fwd_grad(mod=mod):
            torch.autograd.grad(mod(x), x, y0)
        cases[f"{name} fwd"] = fwd
        cases[f"{name} fwd+grad_x"] = fwd_grad
    for name, fn in cases.items():
        yield {"op": "host_overhead", "provider": name, "mode": "fwd", "layer": layer, "N": n, "dtype": "float32",
               "us_per_call": host_cost_us(fn, device, calls), "calls": calls}


SWEEP = [  # (block_m, block_w, block_k, num_warps, num_stages) of the fused forward kernel
    (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 2),
]


def sweep_cases(layer, n, device, timer):
    """The fused forward under each tile configuration of SWEEP and each fp32 dot precision (and
    bf16): graph (device) time, checked against the float64 reference each time."""
    import os

    from mmea_kernels.ops.gated_linear import triton_kernels as tk
    lin64, spec, _, x64, g64, a64, ref = layer_inputs(layer, n)
    ref = ref.to(device)
    saved_tiles, saved_prec = dict(tk.GPU_TILES), os.environ.get("MMEA_FP32_DOT")
    try:
        for dtype, prec in ((torch.float32, "tf32x3"), (torch.float32, "tf32"), (torch.float32, "ieee"),
                            (torch.bfloat16, "-")):
            if dtype == torch.float32:
                os.environ["MMEA_FP32_DOT"] = prec
            x, w, g, a = (t.to(device=device, dtype=dtype) for t in (x64, lin64.weight.double(), g64, a64))
            for cfg in SWEEP:
                tk.GPU_TILES[dtype] = dict(zip(("block_m", "block_w", "block_k", "num_warps", "num_stages"), cfg))
                row = {"op": "fused_sweep", "provider": f"{prec} m{cfg[0]} w{cfg[1]} k{cfg[2]} warps{cfg[3]} st{cfg[4]}",
                       "mode": "fwd", "layer": layer, "N": n, "dtype": DTYPE_NAMES[dtype]}
                try:
                    def fn():
                        with torch.no_grad():
                            return gated_linear(x, w, None, g, a, spec, backend="triton")
                    row["rel_err"] = check("sweep", fn(), ref, dtype, prec if dtype == torch.float32 else None)
                    row["median_ms"], row["graph_ms"] = timer.ms(fn), timer.graph_ms(fn)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                yield row
    finally:
        tk.GPU_TILES.clear()
        tk.GPU_TILES.update(saved_tiles)
        if saved_prec is None:
            os.environ.pop("MMEA_FP32_DOT", None)
        else:
            os.environ["MMEA_FP32_DOT"] = saved_prec


GATE_SWEEP = {  # (BLOCK_N, BLOCK_D or BLOCK_G, num_warps) of the Triton gate kernels
    # around the defaults picked from the 2026-12-04 H200 sweep (4 x 512 / 4 warps; 8 x 64 / 4 warps),
    # with the earlier defaults (16 x 256 / 4; 16 x 64 / 8) first
    "gate_mul": [(16, 256, 4), (4, 512, 8), (2, 1024, 4), (2, 512, 4), (8, 512, 4), (1, 2048, 8), (4, 256, 2)],
    "seg_dot": [(16, 64, 8), (4, 64, 4), (8, 32, 4), (4, 128, 4), (8, 64, 2), (16, 64, 4), (2, 64, 2)],
}


def gate_sweep_cases(layer, n, device, timer, dtypes):
    """The Triton gate_mul and seg_dot under each tile of GATE_SWEEP: time with L2 flushed (and the
    CUDA-graph time) and its share of the copy bandwidth (rows under 4x L2 marked), each result
    checked against float64 first."""
    from mmea_kernels.ops.gate import triton as tb
    L, x64, b64, g64, ref_mul, ref_dot = gate_inputs(layer, n)
    refs = {"gate_mul": ref_mul, "seg_dot": ref_dot}
    picks = {"gate_mul": "_gate_mul_blocks", "seg_dot": "_seg_dot_blocks"}
    for dtype in dtypes:
        x, b, g = (t.to(device=device, dtype=dtype) for t in (x64, b64, g64))
        calls = {"gate_mul": lambda: gate_mul(x, g, L, backend="triton"), "seg_dot": lambda: seg_dot(x, b, L, backend="triton")}
        for op, cfgs in GATE_SWEEP.items():
            nbytes = gate_bytes(op, layer, n, dtype)
            default = getattr(tb, picks[op])
            for cfg in [None] + cfgs:
                row = {"op": "gate_sweep", "provider": f"{op} " + ("default" if cfg is None else
                                                                   f"n{cfg[0]} {'d' if op == 'gate_mul' else 'g'}{cfg[1]} "
                                                                   f"warps{cfg[2]}"),
                       "mode": "fwd", "layer": layer, "N": n, "dtype": DTYPE_NAMES[dtype]}
                if cfg is not None:
                    setattr(tb, picks[op], lambda *a, cfg=cfg: cfg)
                try:
                    row["rel_err"] = check(row["provider"], calls[op](), refs[op].to(device), dtype)
                    row["median_ms"], row["graph_ms"] = timer.ms(calls[op]), timer.graph_ms(calls[op])
                    row["bytes"] = nbytes
                    # from the L2-flushed time (do_bench), as the kernel table; graph replay keeps inputs in L2
                    row["GB/s"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                    row["l2_resident"] = nbytes < 4 * l2_bytes(device)
                except Exception as exc:  # noqa: BLE001 - record, go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    setattr(tb, picks[op], default)
                yield row


# ============================================================================ kernel resources
def kernel_resources():
    """Registers and spills of every compiled Triton kernel of the package (CUDA only)."""
    from mmea_kernels.ops.gate import triton as triton_backend
    from mmea_kernels.ops.gated_linear import triton_kernels
    fns = {"gate_mul": triton_backend._gate_mul_kernel, "seg_dot": triton_backend._seg_dot_kernel,
           "gl_fwd": triton_kernels._gl_fwd_kernel, "gl_wgrad": triton_kernels._gl_wgrad_kernel}
    try:
        from mmea_kernels.ops.fused_gate import triton as fg_triton  # FusedGate's kernels
        fns.update({f"fused_gate{k}": v for k, v in vars(fg_triton).items() if hasattr(v, "device_caches")})
    except ImportError:
        pass
    rows = []
    for name, fn in fns.items():
        for caches in getattr(fn, "device_caches", {}).values():
            cache = caches[0] if isinstance(caches, tuple) else caches
            for key, k in getattr(cache, "items", lambda: [])():
                rows.append({"kernel": name, "n_regs": getattr(k, "n_regs", None),
                             "n_spills": getattr(k, "n_spills", None),
                             "shared": getattr(getattr(k, "metadata", None), "shared", None),
                             "num_warps": getattr(getattr(k, "metadata", None), "num_warps", None),
                             "config": str(key)[:300]})
    return rows


# ============================================================================ main
def table(rows, bw):
    base = {(r["op"], r["layer"], r["N"], r["dtype"], r["mode"]): r["median_ms"] for r in rows
            if r.get("provider") == "base" and "median_ms" in r}
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('op', '?'):<18}{r.get('layer', ''):<30}N={r.get('N', '')} {r.get('dtype', '')}  "
                         f"ERROR {r['error']}")
            continue
        size = f"{r['layer']} N={r['N']} {r['dtype']}"
        if "us_per_call" in r:
            lines.append(f"{r['op']:<18}{size:<50}{'host':<8}{r['provider']:<26}{r['us_per_call']:9.1f} us per call")
            continue
        b = base.get((r["op"], r["layer"], r["N"], r["dtype"], r["mode"]))
        if "GB/s" in r:
            extra = (f"{r['GB/s']:7.0f} GB/s" + (" (L2-resident: not compared)" if r.get("l2_resident") else
                                                   f" ({100 * r['GB/s'] / bw:3.0f} % of copy)"))
        elif "ratio_vs_base" in r and r["provider"] not in ("base", "e3nn-Gate"):
            q = r["ratio_iqr"]
            extra = f"{100 * (r['ratio_vs_base'] - 1):+7.1f} % vs base (paired, IQR {100 * (q[0] - 1):+.0f}..{100 * (q[1] - 1):+.0f} %)"
        elif b and r["provider"] != "base":
            extra = f"{100 * (r['median_ms'] / b - 1):+7.1f} % vs base"
        else:
            extra = ""
        graph = f" graph {r['graph_ms']:.4f}" if r.get("graph_ms") else ""
        lines.append(f"{r['op']:<18}{size:<50}{r['mode']:<8}{r['provider']:<18}{r['median_ms']:9.4f} ms{graph}  {extra}")
    return "\n".join(lines)


def copy_share(nbytes: int, ms: float, row: dict, meta: dict) -> str:
    """A gate kernel's cell of the summary: its share of the copy bandwidth, or "L2-resident" where the
    row says its bytes fit within 4x L2."""
    if row.get("l2_resident"):
        return "L2-resident"
    return f"{100 * nbytes / (ms * 1e-3) / 1e9 / meta['copy_GBps']:.0f} %"


def markdown_summary(path) -> str:
    """Markdown tables from a .jsonl (or .json) results file: the adapted layer against the base
    linear (eager and CUDA-graph times, same run) and the gate kernels against copy bandwidth."""
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        meta = next(r["meta"] for r in recs if "meta" in r)
        rows = [r for r in recs if "meta" not in r]
    else:
        data = json.loads(path.read_text())
        meta, rows = data["meta"], data["rows"]
    ok = [r for r in rows if "error" not in r]
    key = lambda r: (r["layer"], r["N"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r for r in ok if r["op"] == "adapted_linear" and r["provider"] == "base"}
    out = [f"{meta['card']}, torch {meta['torch']}, triton {meta.get('triton', '?')}, fp32 dot {meta['fp32_dot']}, "
           f"{meta['date']}; copy bandwidth {meta['copy_GBps']:.0f} GB/s. Times: {meta.get('timing', 'do_bench')}; "
           "for forward, also CUDA-graph replay (device time).", "",
           "| layer | N | dtype | mode | base ms (graph) | fused | MMEALinear | linear + triton gate |",
           "|---|---|---|---|---|---|---|---|"]
    for k, b in base.items():
        cells = []
        for prov in ("fused", "MMEALinear", "linear+triton-gate"):
            r = next((r for r in ok if r["op"] == "adapted_linear" and r["provider"] == prov and key(r) == k), None)
            if r is None:
                cells.append("–")
                continue
            ratio = r.get("ratio_vs_base", r["median_ms"] / b["median_ms"])  # paired (files from 2026-11-30 on)
            c = f"{100 * (ratio - 1):+.0f} %"
            if r.get("graph_ms") and b.get("graph_ms"):
                c += f" ({100 * (r['graph_ms'] / b['graph_ms'] - 1):+.0f} %)"
            cells.append(c)
        g = f" ({b['graph_ms']:.3f})" if b.get("graph_ms") else ""
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {b['median_ms']:.3f}{g} | " + " | ".join(cells) + " |")
    out += ["", "| kernel | layer | N | dtype | provider | graph ms | % of copy bandwidth |", "|---|---|---|---|---|---|---|"]
    for r in ok:
        if r["op"] in ("gate_mul", "seg_dot") and r.get("graph_ms") and r["provider"] != "torch":
            # bytes from the layer (files of the first run counted seg_dot's 0e columns too); the time
            # with L2 flushed where the file has the flag (graph replay keeps small inputs in L2)
            ms = r["median_ms"] if "l2_resident" in r else r["graph_ms"]
            cell = copy_share(gate_bytes(r["op"], r["layer"], r["N"], getattr(torch, r["dtype"])), ms, r, meta)
            out.append(f"| {r['op']} | {r['layer']} | {r['N']} | {r['dtype']} | {r['provider']} | "
                       f"{r['graph_ms']:.4f} | {cell} |")
    net = [r for r in ok if r["op"] == "gate_net"]
    if net:
        out += ["", "| gate net (128 0e in, rank 16, 128 + 384 out) | N | dtype | mode | eager ms | graph ms |",
                "|---|---|---|---|---|---|"]
        for r in net:
            g = f"{r['graph_ms']:.4f}" if r.get("graph_ms") else "–"
            out.append(f"| {r['provider']} | {r['N']} | {r['dtype']} | {r['mode']} | {r['median_ms']:.4f} | {g} |")
    host = [r for r in ok if r["op"] == "host_overhead"]
    if host:
        out += ["", f"| host cost per call, {host[0]['N']} rows ({host[0]['layer']}) | µs |", "|---|---|"]
        out += [f"| {r['provider']} | {r['us_per_call']:.1f} |" for r in host]
    sweep = [r for r in ok if r["op"] == "gate_sweep" and r.get("median_ms")]
    if sweep:  # the share from the L2-flushed time (files before 2026-12-04 evening stored GB/s from graph time)
        out += ["", "| Triton gate kernel tile | layer | N | dtype | ms (L2 flushed) | graph ms | % of copy |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['provider']} | {r['layer']} | {r['N']} | {r['dtype']} | {r['median_ms']:.4f} | "
                + (f"{r['graph_ms']:.4f}" if r.get("graph_ms") else "–")
                + f" | {copy_share(r['bytes'], r['median_ms'], r, meta)} |" for r in sweep]
    return "\n".join(out)


def _host_cpu() -> str:
    """The host CPU's model name (the timings of launch-bound rows depend on it)."""
    import platform

    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Stopped(BaseException):
    """A TERM during the measurements (not an Exception: run() records those and goes on)."""


def _measure(run, args, device, timer, layers, sizes, dtypes, rounds):
    """Every comparison, most needed first: the gate kernels' tiles against copy bandwidth, the host
    overhead, the kernels that never ran on a GPU (FusedGate, the gate net), then the size sweep."""
    if device.type == "cuda" or args.small:  # tiles of the Triton gate kernels (device time, % of copy)
        # rows enough for every dtype's bytes to exceed 4x the H200's L2 (the 4-block layer: 32000)
        for layer, n in [("small", 33)] if args.small else [("128x0e+128x1o+128x2e+128x3o", 32000),
                                                            ("128x0e+128x1o", 160000)]:
            run(("gate_sweep", layer, n, dtypes[0]), gate_sweep_cases(layer, n, device, timer, dtypes))
    run(("host_overhead", "small" if args.small else "128x0e+128x1o+128x2e+128x3o", 16, torch.float32),
        host_overhead_cases("small" if args.small else "128x0e+128x1o+128x2e+128x3o", device, args.small))
    # then the kernels that never ran on a GPU (FusedGate, the gate net), before the long size sweep
    for n in ([9] if args.small else [4000, 32000]):
        for dtype in dtypes:
            run(("gate_nonlinearity", "sevennet-0", n, dtype), fused_gate_cases(n, dtype, device, timer, rounds))
    for n in ([9] if args.small else [960, 32000]):
        for dtype in (torch.float32, torch.float64):
            run(("gate_net", "mace", n, dtype), gate_net_cases(n, dtype, device, timer))
    for layer in layers:
        for n in sizes:
            for dtype in dtypes:
                run(("gate", layer, n, dtype), gate_cases(layer, n, dtype, device, timer))
                run(("adapted_linear", layer, n, dtype), linear_cases(layer, n, dtype, device, timer, not args.no_cuet,
                                                                      rounds))
    if args.sweep:
        layer = "small" if args.small else "mace-interaction-1"
        for n in ([33] if args.small else [8000, 32000]):
            run(("fused_sweep", layer, n, torch.float32), sweep_cases(layer, n, device, timer))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU interpreter check)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 2000,8000,32000)")
    ap.add_argument("--sweep", action="store_true", help="also time the fused forward under SWEEP's tiles")
    ap.add_argument("--no-cuet", action="store_true", help="leave cuEquivariance out")
    ap.add_argument("--rounds", type=int, default=None, help="paired rounds per comparison (default 15; --small 2)")
    ap.add_argument("--summarize", default=None, metavar="FILE", help="print markdown tables of a results file")
    args = ap.parse_args(argv)
    if args.summarize:
        print(markdown_summary(args.summarize))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu-interpreter"
    timer = Timer(device, args.small)
    layers = SMALL_LAYERS if args.small else LAYERS
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([7, 33] if args.small else [2000, 8000, 32000])
    dtypes = [torch.float32, torch.float64] if args.small else [torch.float32, torch.bfloat16, torch.float64]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{card.replace(' ', '-')}-{datetime.date.today().isoformat()}-gpu"
    stream = (out / f"{stem}.jsonl").open("a")
    meta = {"card": card, "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "fp32_dot": fp32_precision(),
            "timing": "comparisons: paired rounds (order rotated), wall ms per call of 10 back-to-back calls synced at "
                      "the end, median of per-round ratios to the base; gate kernels: do_bench (L2 flushed); graph_ms: "
                      "do_bench_cudagraph", "host_cpu": _host_cpu()}
    rounds = args.rounds or (2 if args.small else 15)
    meta["rounds"] = rounds
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    bw = copy_bandwidth(device, 1 << (10 if args.small else 28), timer)
    meta["copy_GBps"] = bw
    print(f"device: {card}; measured copy bandwidth {bw:.0f} GB/s; fp32 dot: {meta['fp32_dot']}", flush=True)
    stream.write(json.dumps({"meta": meta}) + "\n")
    stream.flush()
    rows = []

    def run(label, gen):
        try:
            for row in gen:
                row["device"] = card
                rows.append(row)
                stream.write(json.dumps(row) + "\n")
                stream.flush()
        except Exception as exc:  # noqa: BLE001 - record and go on with the next configuration
            row = {"op": label[0], "layer": label[1], "N": label[2], "dtype": DTYPE_NAMES[label[3]],
                   "error": f"{type(exc).__name__}: {exc}"[:500], "device": card}
            traceback.print_exc()
            rows.append(row)
            stream.write(json.dumps(row) + "\n")
            stream.flush()

    # a TERM (the device check's time limit) ends the measurements; the .json/.txt of what ran are still
    # written (the first run's benchmark hit its limit with only its .jsonl written)
    def stop(signum, frame):
        raise _Stopped(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        _measure(run, args, device, timer, layers, sizes, dtypes, rounds)
    except _Stopped as exc:
        meta["stopped"] = f"{exc} after {len(rows)} rows: the rows after them were not measured"
        print(f"stopped by {exc} after {len(rows)} rows; writing what ran", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    resources = kernel_resources() if device.type == "cuda" and "stopped" not in meta else []
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "kernels": resources}, indent=1))
    text = table(rows, bw)
    res = "\n".join(f"{r['kernel']:<10} regs {r['n_regs']} spills {r['n_spills']} warps {r['num_warps']} "
                    f"shared {r['shared']}  {r['config'][:160]}" for r in resources)
    (out / f"{stem}.txt").write_text(json.dumps(meta) + "\n\n" + text + "\n\nTriton kernels:\n" + res + "\n")
    print(text + ("\n\nTriton kernels:\n" + res if res else ""))
    print(f"written {out / stem}.json/.jsonl/.txt")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
