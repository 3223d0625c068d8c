"""MMEA_FUSED_LINEAR=auto: each MMEALinear times its fused and unfused paths once per row-count
bucket and gradient need, runs the faster, and computes the same function either way (float64,
against the unfused path and its derivatives)."""
import copy
import pickle

import pytest
import torch
from e3nn import o3

from mmea_kernels import MMEALinear
from mmea_kernels.nn import path_choice
from mmea_kernels.nn.path_choice import auto_choices, row_bucket

from helpers import IN, _NO_CUDA, make_linear, randomise

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_NO_CUDA)]


def fused_layer(device, monkeypatch):
    """A randomised float64 MMEALinear on ``device`` and its fused kernel backend (skips where no
    fused kernel runs there)."""
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "1")
    ad = MMEALinear(make_linear(), rank=3).to(device)
    randomise(ad)
    kernels = ad.fused_kernel(torch.zeros(2, o3.Irreps(IN).dim, dtype=torch.float64, device=device))
    if kernels is None:
        pytest.skip(f"no fused linear kernel for float64 on {device} (extension not built?)")
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "auto")
    return ad, kernels


def test_row_buckets():
    assert [row_bucket(n) for n in (0, 1, 2, 3, 4, 31, 32, 63, 64)] == [0, 1, 2, 2, 3, 5, 6, 6, 7]


def test_time_paths_alternates_and_returns_per_call_medians(monkeypatch):
    """The call order (one warm-up each, then rounds of ``reps`` calls, the order swapped every
    round) and the arithmetic (per-call time, median over rounds, warm-up excluded), on a fake clock
    that each call advances by its own cost: no wall time is asserted (timings belong in bench/)."""
    clock, calls = [0.0], []
    cost = {"f": iter([9.0, 3e-3, 5e-3, 6e-3, 6e-3, 1e-3, 1e-3]),  # warm-up, then rounds: 4, 6, 1 ms per call
            "u": iter([9.0, 1e-3, 1e-3, 2e-3, 2e-3, 0.0, 0.0])}  # warm-up, then rounds: 1, 2, 0 ms per call

    def call(name):
        calls.append(name)
        clock[0] += next(cost[name])

    monkeypatch.setattr(path_choice.time, "perf_counter", lambda: clock[0])
    t_f, t_u = path_choice.time_paths(lambda: call("f"), lambda: call("u"), torch.device("cpu"), rounds=3, reps=2)
    assert calls == ["f", "u"] + ["f", "f", "u", "u"] + ["u", "u", "f", "f"] + ["f", "f", "u", "u"]
    assert t_f == pytest.approx(4e-3) and t_u == pytest.approx(1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_times_each_bucket_once_and_runs_the_faster_path(device, monkeypatch):
    ad, kernels = fused_layer(device, monkeypatch)
    timed, verdict = [], {"fused": True}

    def fake_time_paths(run_fused, run_unfused, dev):
        run_fused(), run_unfused()  # both runnable as handed over
        timed.append(dev)
        return (1e-3, 2e-3) if verdict["fused"] else (2e-3, 1e-3)

    monkeypatch.setattr(path_choice, "time_paths", fake_time_paths)
    base_calls, forward = [], ad.base.forward  # only the unfused path calls it (a hook would make it run that path)
    ad.base.forward = lambda *a, **k: (base_calls.append(1), forward(*a, **k))[1]
    x = torch.randn(40, o3.Irreps(IN).dim, dtype=torch.float64, device=device)
    with torch.no_grad():
        assert ad.fused_kernel(x) == kernels and len(timed) == 1
        n = len(base_calls)
        ad(x)
        assert len(base_calls) == n  # fused: the base layer did not run
        verdict["fused"] = False
        assert ad.fused_kernel(x[:33]) == kernels and len(timed) == 1  # same bucket [32, 64): kept
        assert ad.fused_kernel(x[:31]) is None and len(timed) == 2  # bucket [16, 32): timed
        n = len(base_calls)
        ad(x[:20])
        assert len(base_calls) == n + 1  # unfused: the base layer ran
    xg = x.clone().requires_grad_(True)
    assert ad.fused_kernel(xg) is None and len(timed) == 3  # with a gradient: its own choice
    assert [d.type for d in timed] == [torch.device(device).type] * 3  # x.device: "cuda:0" != torch.device("cuda")
    rows = auto_choices(torch.nn.Sequential(ad))
    assert [(r["layer"], r["rows"], r["grad"], r["path"]) for r in rows] == \
        [("0", 31, False, "unfused"), ("0", 40, False, "fused"), ("0", 40, True, "unfused")]
    assert rows[1]["fused_us"] == 1000.0 and rows[1]["unfused_us"] == 2000.0


@pytest.mark.parametrize("device", DEVICES)
def test_auto_computes_the_same_function_and_leaves_the_call_untouched(device, monkeypatch):
    """Real timing: the output, the input gradient with create_graph and the second derivatives to
    the adapter weights equal the unfused path's; the timing runs consumed no global random numbers,
    left no .grad and did not join the call's graph."""
    ad, _ = fused_layer(device, monkeypatch)
    params = [p for p in ad.parameters() if p.requires_grad]
    x = torch.randn(50, o3.Irreps(IN).dim, dtype=torch.float64, device=device, requires_grad=True)

    def run():
        y = ad(x)
        (gx,) = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
        return [y, gx, *torch.autograd.grad((gx ** 2).sum(), params)]

    rng = torch.get_rng_state()
    got = run()
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in ad.parameters())
    (choice,) = auto_choices(ad)
    assert choice["rows"] == 50 and choice["grad"] and choice["fused_us"] > 0 and choice["unfused_us"] > 0
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    ref = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11 * b.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(ad(x), ref[0], rtol=1e-11, atol=1e-11)


def test_auto_on_a_layer_without_0e_input(monkeypatch):
    """A layer whose input has no 0e channel (static learned gates) chooses too, by the gradient
    need of its static gates, and equals the unfused path."""
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    ad = MMEALinear(make_linear("2x1o+1x2e", "3x0e+2x1o"), rank=3)
    randomise(ad)
    x = torch.randn(9, o3.Irreps("2x1o+1x2e").dim, dtype=torch.float64)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    ref = ad(x)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "auto")
    if ad.fused_kernel(x) is None and not auto_choices(ad):
        pytest.skip("no fused linear kernel for float64 on cpu (extension not built?)")
    torch.testing.assert_close(ad(x), ref, rtol=1e-12, atol=1e-12)
    ad.mmea_static.requires_grad_(False)  # frozen static gates and an input without grad: forward only
    ad(x)
    assert [r["grad"] for r in auto_choices(ad)] == [False, True]


@pytest.mark.parametrize("irreps_in,irreps_out", [("2x1o", "3x1e"), ("0x0e", "3x1o")],
                         ids=["no-paths", "no-input-columns"])
def test_auto_on_layers_whose_output_does_not_depend_on_the_input(irreps_in, irreps_out, monkeypatch):
    """Found by bench/fuzz_triton.py: no path from the input to the output (the gates static), or an
    input of no columns: the output has no graph to the input, and timing its input gradient, or
    counting the rows by numel / 0, must not fail the call; it equals the unfused path, with the
    static gates trainable, frozen, and an input that needs a gradient or not."""
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    ad = MMEALinear(o3.Linear(irreps_in, irreps_out).double(), rank=2)
    randomise(ad)
    dim = o3.Irreps(irreps_in).dim
    for frozen in (False, True):
        ad.mmea_static.requires_grad_(not frozen)
        for needs_grad in (False, True):
            x = torch.randn(5, dim, dtype=torch.float64, requires_grad=needs_grad)
            monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
            ref = ad(x)
            monkeypatch.setenv("MMEA_FUSED_LINEAR", "auto")
            got = ad(x)
            assert got.shape == (5, o3.Irreps(irreps_out).dim)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
            if not frozen:
                (g_ref,) = torch.autograd.grad(ref.square().sum(), [ad.mmea_static])
                (g_got,) = torch.autograd.grad(got.square().sum(), [ad.mmea_static])
                torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-12)


def test_auto_falls_back_to_the_unfused_path_when_the_fused_kernel_fails(monkeypatch):
    """A fused kernel that raises while auto times it (a compile or launch error on an untested
    card) is named in a warning; the layer then runs the unfused path, with the right output, and
    the report carries the error."""
    import mmea_kernels.ops.gated_linear.adapter as adapter
    import mmea_kernels.ops.gated_linear.function as gl
    ad, kernels = fused_layer("cpu", monkeypatch)
    x = torch.randn(12, o3.Irreps(IN).dim, dtype=torch.float64, requires_grad=True)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    ref = ad(x)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "auto")

    def broken(*a, **k):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(gl, "gated_linear_prepared", broken)
    monkeypatch.setattr(adapter, "mmea_adapter_fused", broken)  # the one-node form (a graph is built)
    with pytest.warns(UserWarning, match=f"fused {kernels} kernel failed.*simulated launch failure"):
        y = ad(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    (row,) = auto_choices(ad)
    assert row["path"] == "unfused" and row["fused_us"] is None and row["unfused_us"] > 0
    assert "simulated launch failure" in row["error"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_auto_inside_activation_checkpointing(reentrant, monkeypatch):
    """The first call of a layer inside torch.utils.checkpoint (its timing runs then happen inside
    the checkpointed forward, or inside the recompute of the reentrant variant) gives the unfused
    path's input gradient; the checkpoint's saved-tensor hooks never see the timing runs."""
    from torch.utils.checkpoint import checkpoint
    ad, _ = fused_layer("cpu", monkeypatch)
    x = torch.randn(20, o3.Irreps(IN).dim, dtype=torch.float64, requires_grad=True)
    checkpoint(lambda t: (ad(t) ** 2).sum(), x, use_reentrant=reentrant).backward()
    g = x.grad
    assert any(r["grad"] for r in auto_choices(ad))
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    (ref,) = torch.autograd.grad((ad(x) ** 2).sum(), x)
    torch.testing.assert_close(g, ref, rtol=1e-11, atol=1e-11)


def test_auto_does_not_time_under_a_dispatch_mode(monkeypatch):
    """Under a TorchDispatchMode (FlopCounterMode here; make_fx's tracer is one too) the timing
    runs would be counted or traced as part of the call: the fused path runs, undecided."""
    from torch.utils.flop_counter import FlopCounterMode
    ad, kernels = fused_layer("cpu", monkeypatch)
    x = torch.randn(16, o3.Irreps(IN).dim, dtype=torch.float64)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    ref = ad(x)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "auto")
    monkeypatch.setattr(path_choice, "time_paths", lambda *a: pytest.fail("timed under a dispatch mode"))
    with FlopCounterMode(display=False):
        assert ad.fused_kernel(x) == kernels
        y = ad(x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert auto_choices(ad) == []


def test_auto_choices_follow_the_setup_and_are_not_saved(monkeypatch):
    ad, _ = fused_layer("cpu", monkeypatch)
    monkeypatch.setattr(path_choice, "time_paths", lambda f, u, d: (1.0, 2.0))
    x = torch.randn(8, o3.Irreps(IN).dim, dtype=torch.float64)
    ad(x)
    assert len(auto_choices(ad)) == 1
    for other in (copy.deepcopy(ad), pickle.loads(pickle.dumps(ad))):
        assert auto_choices(other) == []  # decided again where it runs
        torch.testing.assert_close(other(x), ad(x), rtol=0, atol=0)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "1")
    ad(x)
    assert auto_choices(ad) == []  # another setup: the old timings are dropped
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "sometimes")
    with pytest.raises(ValueError, match="MMEA_FUSED_LINEAR='sometimes'.*auto"):
        ad(x)


def test_auto_under_torch_compile_is_the_fused_op(monkeypatch):
    """torch.compile compiles the fused custom op under auto (no timing inside a trace)."""
    from mmea_kernels.nn.mmea import _compiled_plan
    ad, kernels = fused_layer("cpu", monkeypatch)
    assert _compiled_plan(None, "cpu", torch.float64, ad._kernel_key) == (ad._kernel_key, kernels)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    assert _compiled_plan(None, "cpu", torch.float64, ad._kernel_key) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_auto_does_not_time_inside_a_cuda_graph_capture(monkeypatch):
    ad, kernels = fused_layer("cuda", monkeypatch)
    monkeypatch.setattr(path_choice, "time_paths", lambda *a: pytest.fail("timed during a capture"))
    x = torch.randn(64, o3.Irreps(IN).dim, dtype=torch.float64, device="cuda")
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "1")
    with torch.no_grad():
        ref = ad(x)  # warm: kernels compiled, tables on the device
        torch.cuda.synchronize()
        monkeypatch.setenv("MMEA_FUSED_LINEAR", "auto")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ad(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert auto_choices(ad) == []
