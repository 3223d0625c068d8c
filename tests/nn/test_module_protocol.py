"""The adapters as ordinary ``nn.Module`` citizens (a power user's review): the fused kernels read the
base layer's and the gate net's tensors without calling those modules, so hooks on them (feature
captures, ``torch.nn.utils.prune``, hook-based ``weight_norm``) were skipped, giving other numbers
than the unfused path without a word; autocast changed nothing on the fused path; a layer built on
the meta device and given storage with ``to_empty`` kept garbage 0e indices; ``replace_gates``
dropped the hooks of the gates it replaced. Each against the unfused torch path (``backend="torch"``,
which calls every module) or the method's equations in float64."""
import copy

import pytest
import torch
from torch.nn.utils import prune

import mmea_kernels as mk
from mmea_kernels import MMEALinear

from helpers import IN, OUT, make_linear, naive_mmea, randomise

SPLIT_IN = "2x0e+1x1o+3x0e+1x2e"  # 0e inputs in two places: the gate net gathers them by index


def _pair(irreps_in=IN, irreps_out=OUT):
    """(default-path adapter, unfused torch-path adapter) with the same random weights, float64."""
    fused = MMEALinear(make_linear(irreps_in, irreps_out), rank=4)
    randomise(fused, 0.3, seed=2)
    ref = MMEALinear(copy.deepcopy(fused.base), rank=4, backend="torch")
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _x(ad, n=6, seed=0):
    return torch.randn(n, ad.in_layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_hooks_on_the_base_layer_and_the_gate_net_run_and_count():
    fused, ref = _pair()
    assert fused.fused_kernel(_x(fused)) is not None  # the default path is the fused one here
    x = _x(fused)
    for ad in (fused, ref):
        calls = []
        hs = [getattr(ad, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
              for name in ("base", "mmea_down", "mmea_up")]
        ad(x)
        ad(x.clone().requires_grad_())
        with torch.no_grad():
            ad(x)
        assert sorted(calls) == sorted(["base", "mmea_down", "mmea_up"] * 3)
        for h in hs:
            h.remove()
    assert fused.fused_kernel(x) is not None  # hooks gone: the fused path again


def test_a_hook_that_changes_the_base_output_changes_the_adapter_output():
    fused, ref = _pair()
    x = _x(fused)
    want = naive_mmea(fused, 2.0 * fused.base(x), x, IN, OUT)
    for ad in (fused, ref):
        ad.base.register_forward_hook(lambda m, i, o: 2.0 * o)
    torch.testing.assert_close(fused(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref(x), want, rtol=1e-12, atol=1e-12)


def test_pruning_the_base_layer_follows_its_current_weight_in_training():
    """Pruning recomputes ``weight`` in a pre-hook from ``weight_orig``: the fused path read the weight
    of when pruning was applied (stale after an optimiser step), then failed in backward."""
    fused, ref = _pair()
    x = _x(fused)
    outs = {}
    for name, ad in (("fused", fused), ("ref", ref)):
        prune.l1_unstructured(ad.base, "weight", amount=0.5)
        ad.base.weight_orig.requires_grad_(True)
        opt = torch.optim.SGD([ad.base.weight_orig, *ad.adapter_parameters()], lr=1e-3)
        outs[name] = []
        for _ in range(3):
            opt.zero_grad()
            y = ad(x)
            (y.square().mean()).backward()
            opt.step()
            outs[name].append(y.detach())
    for a, b in zip(outs["fused"], outs["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(outs["fused"][0], outs["fused"][2])  # the weights did move


def test_autocast_runs_the_gate_net_in_its_dtype_as_the_unfused_path_does():
    """Under autocast the gate net's ``nn.Linear`` layers compute in bfloat16 (the base ``o3.Linear``
    stays in float32 on the CPU): the fused path ignored autocast (float32 gates), and the unfused
    path with the C++ gate kernels refused the mixed dtypes; now both give the torch path's result."""
    fused, ref = _pair()
    fused, ref = fused.float(), ref.float()
    x = _x(fused).float()
    exact = fused(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_dtype = fused.base(x).dtype
        assert fused.gate_parameters(x)[1].dtype == torch.bfloat16
        y, y_ref = fused(x), ref(x)
    assert y.dtype == y_ref.dtype == base_dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert (y - exact).abs().max() > 1e-5  # bfloat16 gates, not the float32 ones
    torch.testing.assert_close(y.float(), exact, rtol=5e-2, atol=5e-2)
    assert fused.fused_kernel(x) is not None  # autocast off: the fused path again


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_a_layer_built_on_the_meta_device_gets_its_indices_with_storage(backend, how):
    """``to_empty()`` then ``load_state_dict``, or ``load_state_dict(..., assign=True)`` (PyTorch's two
    ways to fill a model built on the meta device)."""
    fused, _ = _pair(SPLIT_IN, OUT)
    with torch.device("meta"):
        ad = MMEALinear(make_linear(SPLIT_IN, OUT).to("meta"), rank=4, backend=backend)
    if how == "to_empty":
        ad = ad.to_empty(device="cpu")
    ad.load_state_dict(fused.state_dict(), strict=True, assign=how == "assign")
    assert ad.in_scalar_columns.tolist() == fused.in_scalar_columns.tolist() == [0, 1, 5, 6, 7]
    assert ad.out_scalar_columns.tolist() == fused.out_scalar_columns.tolist()
    x = _x(ad)
    torch.testing.assert_close(ad(x), naive_mmea(fused, fused.base(x), x, SPLIT_IN, OUT), rtol=1e-12, atol=1e-12)


def test_hooks_on_the_gate_net_of_a_tensor_product_adapter_run():
    """MMEATensorProduct (the mmea-tp method) read its gate net's weights into the fused gate-net
    kernel as MMEALinear did: a hook on ``mmea_up`` zeroing γ must give the base output."""
    from e3nn import o3

    from mmea_kernels.nn.mmea import MMEATensorProduct

    torch.manual_seed(0)
    tp = o3.FullyConnectedTensorProduct("4x0e+2x1o", "1x0e+1x1o", "3x0e+2x1o").double()
    ad = MMEATensorProduct(tp, rank=4)
    randomise(ad, 0.3, seed=2)
    x1, x2 = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert (ad(x1, x2) - tp(x1, x2)).abs().max() > 1e-3
    calls = []
    ad.mmea_up.register_forward_hook(lambda m, i, o: calls.append(1) or torch.zeros_like(o))
    torch.testing.assert_close(ad(x1, x2), tp(x1, x2), rtol=0, atol=0)
    assert calls == [1]


def test_replace_gates_keeps_the_hooks_of_the_gates_it_replaces():
    from e3nn import nn as enn
    from e3nn import o3

    torch.manual_seed(0)
    model = torch.nn.Sequential(o3.Linear("8x0e", "4x0e+2x0e+2x1o"),
                                enn.Gate("4x0e", [torch.tanh], "2x0e", [torch.sigmoid], "2x1o")).double()
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.randn(5, 8, dtype=torch.float64)
    want = model(x)
    rep = mk.replace_gates(model)
    assert len(rep.swapped) == 1 and type(model[1]).__name__ == "FusedGate"
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(seen) == 2 and torch.equal(seen[1], got)
    later = model[1].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    handle.remove()  # a handle of the original gate removes the hook from the FusedGate too
    model(x)
    assert seen[2:] == ["pre"]
    mk.restore_gates(model)
    model(x)
    assert seen[3:] == ["pre"]  # registered on the FusedGate, kept by the restored gate
    later.remove()
    model(x)
    assert len(seen) == 4
    # full backward hooks: registered on the FusedGate (or on the original) alone, they fire on both modules
    back = []
    for where in ("fused", "gate"):
        mk.replace_gates(model)
        on = model[1] if where == "fused" else model[1].__dict__["_original"]
        h = on.register_full_backward_hook(lambda m, gi, go, where=where: back.append(where))
        model(x.clone().requires_grad_()).sum().backward()
        mk.restore_gates(model)
        model(x.clone().requires_grad_()).sum().backward()
        h.remove()
    assert back == ["fused", "fused", "gate", "gate"]
    mk.replace_gates(model)
    model[1].register_full_backward_hook(lambda m, gi, go: back.append("copied"))
    copy.deepcopy(model)(x.clone().requires_grad_()).sum().backward()  # a copy keeps the flag (nn.Module's
    assert back[4:] == ["copied"]                                       # __setstate__ would reset it)
