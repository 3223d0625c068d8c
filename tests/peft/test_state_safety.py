"""Saved adapter and model states that would load into silently different numbers are refused or
loaded right (review of 2026-12-03): a merged ELoRA model's state_dict(), adapters with per-layer
options, a model on the meta device, hand-edited adapter files; plus the layout and fused-gate specs
whose wrong use used to compute wrong columns."""
import copy

import pytest
import torch
from e3nn import o3
from torch import nn

import mmea_kernels as mk
from mmea_kernels import IrrepsLayout, gate_mul
from mmea_kernels.ops.fused_gate import FusedGateSpec, fused_gate

IRREPS = "4x0e+2x1o"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = o3.Linear(IRREPS, IRREPS)
        self.b = o3.Linear(IRREPS, "3x0e+1x1o")

    def forward(self, x):
        return self.b(self.a(x))


def _net(seed=1):
    torch.manual_seed(seed)
    return Net().double()


def _train(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _reference(model):
    """The adapted model as plain e3nn layers with W + (alpha/r)·A·B computed here, block by block."""
    ref = _net()
    for name in ("a", "b"):
        ad = getattr(model, name)
        w = getattr(ref, name).weight.detach().clone()
        for ins, A, B in zip(ad.paths, ad.elora_A, ad.elora_B):
            w[ins.weight_offset:ins.weight_offset + ins.numel] += (ad.alpha / ad.rank * (A @ B)).reshape(-1).detach()
        getattr(ref, name).weight.data.copy_(w)
    return ref


def test_merged_elora_state_dict_loads_as_merged_not_twice():
    m = _net()
    mk.inject_adapters(m, "elora", rank=2, alpha=3.0)
    _train(m)
    x = torch.randn(5, 10, dtype=torch.float64)
    want = _reference(m)(x)
    for mod in mk.adapted_modules(m).values():
        mod.merge()
    sd = m.state_dict()
    assert all(bool(sd[f"{n}.elora_merged"]) for n in ("a", "b"))
    fresh = _net()
    mk.inject_adapters(fresh, "elora", rank=2, alpha=3.0)
    fresh.load_state_dict(sd)  # strict: the flag is no unexpected key
    assert all(mod.merged for mod in mk.adapted_modules(fresh).values())
    torch.testing.assert_close(fresh(x), want, atol=1e-12, rtol=0)
    for mod in mk.adapted_modules(fresh).values():  # unmerge takes exactly that ΔW out again
        mod.unmerge()
    torch.testing.assert_close(fresh(x), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(fresh.a.base.weight, _net().a.weight, atol=1e-12, rtol=0)


def test_unmerged_state_into_merged_model_and_partial_loads():
    m = _net()
    mk.inject_adapters(m, "elora", rank=2)
    _train(m)
    x = torch.randn(3, 10, dtype=torch.float64)
    want = _reference(m)(x)
    sd = m.state_dict()
    assert not any(k.endswith("elora_merged") for k in sd)  # unmerged files are as before
    other = _net()
    mk.inject_adapters(other, "elora", rank=2)
    _train(other, seed=5)
    for mod in mk.adapted_modules(other).values():
        mod.merge()
    other.load_state_dict(sd)  # the loaded base weight has no ΔW: the layers become unmerged
    assert not any(mod.merged for mod in mk.adapted_modules(other).values())
    torch.testing.assert_close(other(x), want, atol=1e-12, rtol=0)
    for mod in mk.adapted_modules(other).values():
        mod.merge()
    factors = {k: v for k, v in sd.items() if ".elora_" in k}
    with pytest.raises(RuntimeError, match="unmerge"):  # new factors while the old ΔW sits in the weight
        other.load_state_dict(factors, strict=False)
    unmerged = _net()
    mk.inject_adapters(unmerged, "elora", rank=2)
    with pytest.raises(RuntimeError, match="holds no base weight"):  # a merged flag without the weight
        unmerged.load_state_dict({"a.elora_merged": torch.tensor(True)}, strict=False)
    other.load_state_dict({}, strict=False)  # a load that does not touch the layers leaves them be
    assert all(mod.merged for mod in mk.adapted_modules(other).values())


@pytest.mark.parametrize("cls,kw_a,kw_b", [(mk.MMEALinear, {"phi": "exp"}, {"phi": "residual"}),
                                            (mk.ELoRALinear, {"alpha": 2.0}, {"alpha": 8.0}),
                                            (mk.MMEALinear, {}, {"rank": 3})])
def test_adapter_state_with_per_layer_options_is_refused(cls, kw_a, kw_b):
    m = _net()
    m.a = cls(m.a, **{"rank": 2, **kw_a})
    m.b = cls(m.b, **{"rank": 2, **kw_b})
    key = next(iter(kw_b))
    with pytest.raises(ValueError, match=rf"'a' and 'b' differ \({key}="):
        mk.adapter_state_dict(m)
    m.b = mk.ELoRALinear(m.b.base, rank=2) if cls is mk.MMEALinear else mk.MMEALinear(m.b.base, rank=2)
    with pytest.raises(ValueError, match="holds one method"):
        mk.adapter_state_dict(m)


def test_load_into_meta_model_is_refused_and_leaves_it_unchanged():
    m = _net()
    mk.inject_adapters(m, "mmea", rank=2)
    _train(m)
    st = mk.adapter_state_dict(m)
    with torch.device("meta"):
        f = Net()
    with pytest.raises(ValueError, match="meta device"):
        mk.load_adapter_state_dict(f, st)
    assert not mk.adapted_modules(f)
    s = copy.deepcopy(st)
    s["state"] = {k: v.to("meta") for k, v in s["state"].items()}
    with pytest.raises(ValueError, match="meta tensor"):
        mk.load_adapter_state_dict(_net(), s)


@pytest.mark.parametrize("edit,err,match", [
    (lambda s: s["targets"]["a"].pop("irreps_in"), KeyError, r"target 'a' lacks \['irreps_in'\]"),
    (lambda s: s.__setitem__("targets", ["a", "b"]), ValueError, "'targets' must be a dict, got list"),
    (lambda s: s["options"].pop("rank"), KeyError, "rank"),
])
def test_hand_edited_adapter_state_names_what_is_wrong(edit, err, match):
    m = _net()
    mk.inject_adapters(m, "mmea", rank=2)
    s = copy.deepcopy(mk.adapter_state_dict(m))
    edit(s)
    with pytest.raises(err, match=match):
        mk.load_adapter_state_dict(_net(), s)


def test_constructor_and_input_checks():
    lin = o3.Linear("3x0e+1x1o", "2x0e+1x1o")
    with pytest.raises(ValueError, match="rank must be a positive integer, got True"):
        mk.ELoRALinear(lin, rank=True)
    for bad in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="init_std"):
            mk.MMEALinear(lin, rank=2, init="paper", init_std=bad)
    ad = mk.MMEALinear(lin, rank=2, backend="torch")
    with pytest.raises(TypeError, match=r"input is torch.float64 but the layer's weights are torch.float32"):
        ad(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ad(torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="needs a torch.nn.Module, got str"):
        mk.inject_adapters("model")


def test_under_autocast_an_input_of_the_autocast_dtype_is_not_refused():
    """The dtype check leaves autocast alone: a bfloat16 feature (what an autocast nn.Linear before
    the layer gives) goes to the base o3.Linear, which takes it where autocast covers its einsum (CUDA;
    at init the adapter then equals the base) and raises torch's own error where not (the CPU), never
    the adapter's dtype refusal."""
    lin = o3.Linear("3x0e+1x1o", "2x0e+1x1o")
    ad = mk.MMEALinear(lin, rank=2, backend="torch")
    x = torch.randn(4, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            want, err = lin(x), None
        except RuntimeError as exc:
            want, err = None, exc
        if err is None:
            torch.testing.assert_close(ad(x), want)
        else:
            with pytest.raises(type(err), match=str(err)[:30]):
                ad(x)
    with pytest.raises(TypeError, match="input is torch.bfloat16 but the layer's weights are torch.float32"):
        ad(x)  # autocast off: refused by name


def test_fused_gate_refuses_an_integer_input_by_name():
    from e3nn.nn import Gate

    gate = Gate("2x0e", [torch.nn.functional.silu], "2x0e", [torch.sigmoid], "2x1o")
    for backend in ("torch", None):
        fg = mk.FusedGate.from_module(gate, backend=backend)
        with pytest.raises(TypeError, match="FusedGate: the input has dtype torch.int64"):
            fg(torch.ones(2, 10, dtype=torch.long))


def test_layout_of_keeps_the_layout_it_is_given():
    lay = IrrepsLayout.of("2x1o", "ir_mul")
    assert IrrepsLayout.of(lay) is lay
    assert IrrepsLayout.of(lay, "mul_ir").layout == "mul_ir"
    with pytest.raises(ValueError, match="unknown layout"):
        IrrepsLayout.of(lay, "mul-ir")
    x = torch.arange(6.0, dtype=torch.float64)[None]
    g = torch.tensor([[10.0, 100.0]], dtype=torch.float64)
    want = x.reshape(3, 2) * g  # ir_mul: column m*mul + u belongs to copy u
    torch.testing.assert_close(gate_mul(x, g, IrrepsLayout.of(lay)), want.reshape(1, 6))


GOOD = (6, 5, 1, ((0, 0, 2, 1, 1.0),), ((2, 0, 1, 2, 1.0),), ((3, 2, 1, 3, 0, False),))


def test_fused_gate_spec_checks_its_tables():
    x = torch.randn(3, 6, dtype=torch.float64)
    y = fused_gate(x, FusedGateSpec(*GOOD), backend="torch")
    want = torch.cat([torch.nn.functional.silu(x[:, :2]), torch.sigmoid(x[:, 2:3]) * x[:, 3:6]], 1)
    torch.testing.assert_close(y, want)
    bad = {
        "the output columns .* column 5 is covered 0 times": (6, 7) + GOOD[2:],
        "the output columns .* column 1 is covered 2 times": GOOD[:5] + (((3, 1, 1, 3, 0, False),),),
        "unknown activation code 9": GOOD[:3] + (((0, 0, 2, 9, 1.0),),) + GOOD[4:],
        "segments' gates must cover .* column 0 is covered 0 times": (6, 5, 2, GOOD[3], ((2, 1, 1, 2, 1.0),),
                                                                   ((3, 2, 1, 3, 1, False),)),
        r"gated block \(3, 2, 1, 3, 5, False\)": GOOD[:5] + (((3, 2, 1, 3, 5, False),),),
        r"span \[-1, 1\) is outside": GOOD[:3] + (((-1, 0, 2, 1, 1.0),),) + GOOD[4:],
        "scalar outputs come first": GOOD[:3] + (((0, 3, 2, 1, 1.0),), GOOD[4], ((3, 0, 1, 3, 0, False),)),
    }
    for match, args in bad.items():
        with pytest.raises(ValueError, match=match):
            FusedGateSpec(*args)
