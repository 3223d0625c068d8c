"""The injection API on a small pure-e3nn model: targeting, freezing, report, save/load, unload, merge."""
import math

import pytest
import torch
from e3nn import nn as enn
from e3nn import o3
from torch import nn

import mmea_kernels as mk

from helpers import TOL

HID = o3.Irreps("8x0e+4x1o+2x2e")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = o3.Linear(HID, "8x0e+6x0e+4x1o+2x2e")
        self.gate = enn.Gate("8x0e", [torch.tanh], "6x0e", [torch.sigmoid], "4x1o+2x2e")
        self.skip = o3.Linear(HID, HID)

    def forward(self, x):
        return self.gate(self.linear(x)) + self.skip(x)


class TinyE3NN(nn.Module):
    def __init__(self, hid="8x0e+4x1o+2x2e"):
        super().__init__()
        self.embed = o3.Linear("3x0e+1x1o", hid)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.readout = o3.Linear(hid, "1x0e+1x1o")
        self.norm_scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.readout(h) * self.norm_scale


def model_and_input(seed=0):
    torch.manual_seed(seed)
    m = TinyE3NN().double()
    x = torch.randn(11, o3.Irreps("3x0e+1x1o").dim, dtype=torch.float64)
    return m, x


def randomise_adapters(model, std=0.4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_inject_all_freeze_and_report(method):
    m, x = model_and_input()
    y0 = m(x)
    rep = mk.inject_adapters(m, method=method, rank=4)
    names = [r.name for r in rep.modules]
    assert names == ["embed", "blocks.0.linear", "blocks.0.skip", "blocks.1.linear", "blocks.1.skip", "readout"]
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all((".mmea_" in n) or (".elora_" in n) for n in trainable)
    assert rep.trainable_parameters == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert rep.total_parameters == sum(p.numel() for p in m.parameters())
    text = str(rep)
    assert "blocks.1.skip" in text and f"{rep.trainable_parameters:,}" in text and "8x0e+4x1o+2x2e" in text
    # identity at init: bit for bit for ELoRA (B = 0); to round-off for MMEA, whose default CPU path is
    # the fused C++ linear (bit for bit on backend="torch": tests/nn/test_modules.py)
    torch.testing.assert_close(m(x), y0, **(TOL[torch.float64] if method == "mmea" else dict(rtol=0, atol=0)))


def test_target_and_exclude_patterns():
    m, _ = model_and_input()
    rep = mk.inject_adapters(m, target_modules=["linear", "readout"])  # suffixes
    assert [r.name for r in rep.modules] == ["blocks.0.linear", "blocks.1.linear", "readout"]
    mk.unload(m)
    rep = mk.inject_adapters(m, target_modules=["blocks.*"], exclude_modules=["blocks.1.skip"])  # globs
    assert [r.name for r in rep.modules] == ["blocks.0.linear", "blocks.0.skip", "blocks.1.linear"]
    mk.unload(m)
    rep = mk.inject_adapters(m, target_modules=r"blocks\.\d\.skip")  # one regex, as in peft
    assert [r.name for r in rep.modules] == ["blocks.0.skip", "blocks.1.skip"]


def test_bad_injection_requests():
    m, _ = model_and_input()
    with pytest.raises(ValueError, match="unknown adapter method 'lora'; expected one of \\['elora', 'mmea'\\]"):
        mk.inject_adapters(m, method="lora")
    with pytest.raises(ValueError, match="target_modules pattern 'interactions.0.linear' matches none"):
        mk.inject_adapters(m, target_modules=["interactions.0.linear"])
    with pytest.raises(ValueError, match="unknown phi 'relu'"):
        mk.inject_adapters(m, phi="relu")
    assert not mk.adapted_modules(m)  # a failed request leaves the model untouched
    assert all(p.requires_grad for p in m.parameters())
    mk.inject_adapters(m)
    with pytest.raises(RuntimeError, match="already has adapters"):
        mk.inject_adapters(m)
    with pytest.raises(ValueError, match="contains no o3.Linear"):
        mk.inject_adapters(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_save_load_round_trip(tmp_path, method):
    m, x = model_and_input()
    mk.inject_adapters(m, method=method, rank=3, target_modules=["linear", "embed"])
    randomise_adapters(m)
    y = m(x)
    state = mk.adapter_state_dict(m)
    assert state["method"] == method and state["options"]["rank"] == 3
    assert not any("base." in k for k in state["state"])
    assert set(state["targets"]) == {"embed", "blocks.0.linear", "blocks.1.linear"}
    torch.save(state, tmp_path / "adapter.pt")

    fresh, _ = model_and_input()  # same seed: same base weights
    rep = mk.load_adapter_state_dict(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    assert rep.method == method and len(rep.modules) == 3
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def test_load_into_mismatched_model_names_module_and_irreps():
    m, _ = model_and_input()
    mk.inject_adapters(m)
    state = mk.adapter_state_dict(m)
    other = TinyE3NN(hid="8x0e+4x1o").double()
    with pytest.raises(ValueError, match=r"module 'embed': saved adapter has irreps 3x0e\+1x1o -> 8x0e\+4x1o\+2x2e "
                                         r"but the model has 3x0e\+1x1o -> 8x0e\+4x1o"):
        mk.load_adapter_state_dict(other, state)
    with pytest.raises(ValueError, match="targets module 'blocks.0.linear', which the model does not have"):
        mk.load_adapter_state_dict(nn.ModuleDict({"embed": o3.Linear("3x0e+1x1o", "8x0e+4x1o+2x2e")}), state)
    with pytest.raises(ValueError, match="not an mmea_kernels adapter state"):
        mk.load_adapter_state_dict(TinyE3NN(), {"embed.weight": torch.zeros(3)})
    broken = dict(state, state={k: v for k, v in list(state["state"].items())[1:]})
    with pytest.raises(KeyError, match="missing keys"):
        mk.load_adapter_state_dict(TinyE3NN().double(), broken)


def test_unload_restores_modules_and_grad_flags():
    m, x = model_and_input()
    m.embed.weight.requires_grad_(False)  # a user choice that unload must keep
    originals = {n: mod for n, mod in m.named_modules() if isinstance(mod, o3.Linear)}
    y0 = m(x)
    mk.inject_adapters(m)
    randomise_adapters(m)
    assert (m(x) - y0).abs().max() > 1e-3
    with mk.disable_adapters(m):
        torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
    mk.unload(m)
    assert {n: mod for n, mod in m.named_modules() if isinstance(mod, o3.Linear)} == originals
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
    assert not m.embed.weight.requires_grad and m.readout.weight.requires_grad and m.norm_scale.requires_grad


def test_merge_and_unload():
    m, x = model_and_input()
    mk.inject_adapters(m, method="elora", rank=2)
    randomise_adapters(m)
    y = m(x)
    mk.merge_and_unload(m)
    assert not mk.adapted_modules(m) and isinstance(m.blocks[0].linear, o3.Linear)
    torch.testing.assert_close(m(x), y, **TOL[torch.float64])

    m2, _ = model_and_input()
    mk.inject_adapters(m2, method="mmea")
    with pytest.raises(RuntimeError, match="MMEA adapters cannot be merged"):
        mk.merge_and_unload(m2)
    assert mk.adapted_modules(m2)  # nothing was removed


def test_load_only_lets_backend_be_chosen():
    m, x = model_and_input()
    mk.inject_adapters(m, phi="residual")
    state = mk.adapter_state_dict(m)
    with pytest.raises(ValueError, match=r"only 'backend' can be chosen when loading mmea adapters; \['phi'\]"):
        mk.load_adapter_state_dict(model_and_input()[0], state, phi="exp")
    fresh, _ = model_and_input()
    mk.load_adapter_state_dict(fresh, state, backend="torch")
    assert all(a.backend == "torch" and a.phi == "residual" for a in mk.adapted_modules(fresh).values())
    mk.load_adapter_state_dict(fresh, state, backend="cpp")  # adapters there already: applied, not ignored
    assert all(a.backend == "cpp" for a in mk.adapted_modules(fresh).values())
    with pytest.raises(ValueError, match=r"only 'backend' can be chosen.*\['phi'\]"):
        mk.load_adapter_state_dict(fresh, state, phi="exp")


# ----------------------------------------------------------------------------- found in review
class _Suffixed(nn.Module):
    """Layers named ``linear`` and ``block.linear``: a saved target's name is a suffix of another's."""

    def __init__(self):
        super().__init__()
        self.linear = o3.Linear(HID, HID)
        self.block = nn.Module()
        self.block.linear = o3.Linear(HID, HID)

    def forward(self, x):
        return self.block.linear(self.linear(x))


def test_a_saved_state_loads_into_exactly_its_layers():
    torch.manual_seed(0)
    m = _Suffixed().double()
    mk.inject_adapters(m, "mmea", target_modules="linear", rank=2)  # a regex: only the top-level layer
    randomise_adapters(m)
    x = torch.randn(5, HID.dim, dtype=torch.float64)
    state = mk.adapter_state_dict(m)
    fresh = _Suffixed().double()
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "mmea" not in k}, strict=False)
    fresh.linear.weight.data.copy_(m.linear.base.weight)
    fresh.block.linear.weight.data.copy_(m.block.linear.weight)
    mk.load_adapter_state_dict(fresh, state)
    assert sorted(mk.adapted_modules(fresh)) == ["linear"]
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_a_layer_used_in_two_places_is_refused_by_name():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = o3.Linear(HID, HID)
            self.c = self.a

        def forward(self, x):
            return self.c(self.a(x))

    with pytest.raises(ValueError, match=r"layer 'a' is one module used in 2 places \(a, c\)"):
        mk.inject_adapters(Shared(), "elora", rank=2)


def test_elora_merge_called_directly_adds_the_update_once():
    m, x = model_and_input()
    mk.inject_adapters(m, method="elora", rank=2)
    randomise_adapters(m)
    y = m(x)
    with mk.disable_adapters(m):
        y_base = m(x)
    ad = m.blocks[0].linear
    w0 = ad.base.weight.detach().clone()
    for _ in range(2):
        ad.merge()
        torch.testing.assert_close(m(x), y, **TOL[torch.float64])  # the adapter adds nothing more
    with mk.disable_adapters(m):
        torch.testing.assert_close(m(x), y_base, **TOL[torch.float64])
    from e3nn.util import jit

    torch.testing.assert_close(jit.compile(ad)(h := torch.randn(4, ad.in_layout.dim, dtype=torch.float64)), ad(h),
                               rtol=0, atol=0)  # TorchScript: the merged weights, no second ΔW
    ad.adapter_enabled = False
    torch.testing.assert_close(jit.compile(ad)(h), ad(h), rtol=0, atol=0)
    ad.adapter_enabled = True
    with pytest.raises(ValueError, match="merged into their base weights: unmerge"):
        mk.adapter_state_dict(m)
    other, _ = model_and_input()
    mk.inject_adapters(other, method="elora", rank=2)
    randomise_adapters(other, seed=9)
    y_other = other(x)
    mk.load_adapter_state_dict(m, mk.adapter_state_dict(other))  # into a merged model: the new ΔW, once
    torch.testing.assert_close(m(x), y_other, **TOL[torch.float64])
    mk.unload(m)  # unmerges first: the original layer
    torch.testing.assert_close(m.blocks[0].linear.weight, w0, rtol=0, atol=1e-14)
    torch.testing.assert_close(m(x), y_base, **TOL[torch.float64])


def test_mmea_tensor_product_gates_are_seen_by_the_peft_api():
    pytest.importorskip("mace")
    from mmea_kernels.train.foundation import load_model
    from mmea_kernels.train.methods import apply_method

    net = load_model().double()
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    apply_method(net, "mmea-tp", rank=2)
    tp = mk.peft.inject.tensor_product_gates(net)
    assert tp
    with pytest.raises(ValueError, match="mmea-tp gates on .* tensor products"):
        mk.adapter_state_dict(net)
    for g in tp.values():
        g.adapter_enabled = True
    with mk.disable_adapters(net):
        assert not any(g.adapter_enabled for g in tp.values())
    assert all(g.adapter_enabled for g in tp.values())
    mk.unload(net)
    assert not mk.peft.inject.tensor_product_gates(net) and not mk.adapted_modules(net)
    assert net.state_dict().keys() == base_state.keys()


def test_mmea_refuses_a_linear_whose_feature_channels_change():
    with pytest.raises(ValueError, match="f_in=2 feature channels to f_out=3"):
        mk.MMEALinear(o3.Linear("4x0e+2x1o", "3x0e+2x1o", f_in=2, f_out=3), rank=2)


def test_adapter_states_with_other_dtypes_or_non_finite_values_are_refused():
    m, x = model_and_input()
    mk.inject_adapters(m, rank=2)
    state = mk.adapter_state_dict(m)
    key = next(iter(state["state"]))
    for bad, msg in ((state["state"][key].long(), "has dtype torch.int64"),
                     (torch.full_like(state["state"][key], float("nan")), "holds non-finite values")):
        fresh, _ = model_and_input()
        with pytest.raises(ValueError, match=msg):
            mk.load_adapter_state_dict(fresh, {**state, "state": {**state["state"], key: bad}})
        assert not mk.adapted_modules(fresh)  # all or nothing


# ----------------------------------------------------------------------------- AdapterConfig
def test_adapter_config_is_the_same_injection_as_arguments():
    m1, x = model_and_input()
    m2, _ = model_and_input()
    cfg = mk.AdapterConfig("mmea", rank=4, target_modules=["linear", "readout"], options={"phi": "residual"})
    r1 = mk.inject_adapters(m1, cfg)
    r2 = mk.inject_adapters(m2, method="mmea", rank=4, target_modules=["linear", "readout"], phi="residual")
    assert [m.name for m in r1.modules] == [m.name for m in r2.modules] and r1.options == r2.options
    assert mk.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(1)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
            assert n1 == n2
            if p1.requires_grad:
                p1.copy_(torch.randn_like(p1))
                p2.copy_(p1)
    assert torch.equal(m1(x), m2(x))


def test_adapter_config_checks_its_fields_against_the_adapter_class():
    with pytest.raises(ValueError, match="unknown adapter method 'lora'"):
        mk.AdapterConfig("lora")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        mk.AdapterConfig("mmea", rank=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['alpha'\] for mmea adapters"):
        mk.AdapterConfig("mmea", options={"alpha": 2.0})
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['phi'\] for elora adapters"):
        mk.inject_adapters(model_and_input()[0], method="elora", phi="exp")
    with pytest.raises(TypeError, match="either an AdapterConfig or its fields"):
        mk.inject_adapters(model_and_input()[0], mk.AdapterConfig("mmea"), rank=8)
    with pytest.raises(KeyError, match="no field"):
        mk.AdapterConfig.from_dict({"method": "mmea", "ranks": 3})


def test_adapter_classes_own_their_options():
    """What differs between adapter kinds lives on the class: options, which of them shape the saved
    weights, which may change on load, mergeability (peft's per-layer ownership)."""
    assert mk.MMEALinear.option_names == ("phi", "init", "init_std", "backend")
    assert not mk.MMEALinear.mergeable and mk.ELoRALinear.mergeable
    assert mk.MMEALinear.runtime_options == ("backend",) and mk.ELoRALinear.runtime_options == ()
    m, _ = model_and_input()
    mk.inject_adapters(m, method="elora", rank=2)
    state = mk.adapter_state_dict(m)
    with pytest.raises(ValueError, match=r"no option can be chosen when loading elora adapters; \['backend'\]"):
        mk.load_adapter_state_dict(model_and_input()[0], state, backend="torch")


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_scripting_the_model_itself_leaves_the_peft_api_working(method):
    """torch.jit.script(model) replaces each adapter and FusedGate by its TorchScript form in the model's
    own tree (torch's __prepare_scriptable__ protocol); the peft functions and restore_gates put the
    eager modules back first, so they act on the adapters (they were silent no-ops: disable_adapters
    left the adapted output, unload left the adapters in, adapter_state_dict found none)."""
    model, x = model_and_input()
    base = model(x).detach()
    mk.inject_adapters(model, method=method, rank=3)
    randomise_adapters(model)
    mk.replace_gates(model)
    adapted = model(x).detach()
    assert (adapted - base).abs().max() > 1e-3
    scripted = torch.jit.script(model)
    assert "Scriptable" in type(model.embed).__name__  # what torch did to the eager tree
    torch.testing.assert_close(model(x), adapted, **TOL[torch.float64])  # its forms compute the same
    with mk.disable_adapters(model):
        torch.testing.assert_close(model(x), base, **TOL[torch.float64])
    assert type(model.embed).__name__ == ("MMEALinear" if method == "mmea" else "ELoRALinear")
    state = mk.adapter_state_dict(model)
    assert state["targets"].keys() == mk.adapted_modules(model).keys() and len(state["targets"]) == 6
    assert mk.restore_gates(model).swapped and isinstance(model.blocks[0].gate, enn.Gate)
    torch.testing.assert_close(model(x), adapted, **TOL[torch.float64])
    torch.testing.assert_close(scripted(x), adapted, **TOL[torch.float64])  # the scripted model is its own
    mk.unload(model)
    assert isinstance(model.embed, o3.Linear)
    torch.testing.assert_close(model(x), base, **TOL[torch.float64])


def test_injection_and_loading_errors_name_the_layer_and_the_way_out():
    """An adapter that cannot wrap a layer names it and how to leave it out; a layer's second name
    (one module in two places) is named as such; a saved state for another model lists this model's
    layers; options are checked at injection; a failed load changes nothing."""
    class External(nn.Module):  # weights from elsewhere (a radial MLP in NequIP-style models)
        def __init__(self):
            super().__init__()
            self.inner = o3.Linear("4x0e+2x1o", "4x0e+2x1o")
            self.ext = o3.Linear("4x0e+2x1o", "4x0e+2x1o", internal_weights=False, shared_weights=False)

    with pytest.raises(TypeError, match=r"cannot put elora adapters on layer 'ext' .*exclude_modules=\['ext'\]"):
        mk.inject_adapters(External(), method="elora", rank=2)
    assert mk.inject_adapters(External(), method="elora", rank=2, exclude_modules=["ext"]).modules[0].name == "inner"

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            lin = o3.Linear("4x0e+2x1o", "4x0e+2x1o")
            self.layers = nn.ModuleList([lin, lin])
            self.out = o3.Linear("4x0e+2x1o", "1x0e")

    for key in ("target_modules", "exclude_modules"):
        with pytest.raises(ValueError, match=r"names 'layers\.1', which is the layer 'layers\.0' used in a second place"):
            mk.inject_adapters(Shared(), method="mmea", rank=2, **{key: ["layers.1"]})
    for bad in (dict(method="mmea", backend="cuda"), dict(method="elora", alpha=0.0), dict(method="elora", alpha=math.nan)):
        with pytest.raises(ValueError, match=r"^(unknown backend 'cuda'|ELoRA alpha must be)") as err:
            mk.inject_adapters(model_and_input()[0], rank=2, **bad)
        assert "exclude_modules" not in str(err.value)  # a setting's error, not a layer's: leaving one out won't help

    model, x = model_and_input()
    mk.inject_adapters(model, method="mmea", rank=2)
    state = mk.adapter_state_dict(model)
    wrapped = nn.Module()
    wrapped.net = model_and_input()[0]
    with pytest.raises(ValueError, match=r"targets module 'embed', which the model does not have .*its linear "
                                         r"layers: \['net\.blocks\.0\.linear'"):
        mk.load_adapter_state_dict(wrapped, state)
    other, _ = model_and_input()
    mk.inject_adapters(other, method="mmea", rank=2, target_modules=["embed"], backend="torch")
    with pytest.raises(ValueError, match="differ from the saved ones"):
        mk.load_adapter_state_dict(other, state, backend="cpp")
    assert other.embed.backend == "torch"  # all or nothing: the runtime option was not set either
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):  # checked when set on loaded adapters too
        mk.load_adapter_state_dict(model, state, backend="gpu")


def test_models_compiled_in_place_by_e3nn_are_left_alone_and_loads_after_scripting_work():
    """e3nn's jit.compile (mace-torch's LAMMPS path) compiles a model in place: its modules are then
    ScriptModules, which the peft functions must not try to swap back (they broke the model or raised
    'Cannot re-assign modules in a ScriptModule'); after a plain torch.jit.script(model), a
    load_adapter_state_dict puts the eager adapters back before checking the targets."""
    from e3nn.util import jit

    model, x = model_and_input()
    mk.inject_adapters(model, method="mmea", rank=3)
    randomise_adapters(model)
    ref = model(x).detach()
    jit.compile(model)
    assert mk.adapted_modules(model) == {}  # nothing eager to act on, as before
    torch.testing.assert_close(model(x), ref, **TOL[torch.float64])
    model, x = model_and_input()
    mk.inject_adapters(model, method="mmea", rank=3)
    randomise_adapters(model)
    mk.replace_gates(model)  # (e3nn's Gate does not script)
    state, ref = mk.adapter_state_dict(model), model(x).detach()
    torch.jit.script(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    mk.load_adapter_state_dict(model, state)
    assert type(model.embed).__name__ == "MMEALinear"
    torch.testing.assert_close(model(x), ref, **TOL[torch.float64])
    from mmea_kernels.nn.scriptable import fused_form_reason, script_kernels

    torch.jit.script(model)  # scripted once more: the cpp forms are still chosen from the eager adapters
    with script_kernels("cpp", model):
        scripted = torch.jit.script(model)
    if fused_form_reason(mk.adapted_modules(model)["embed"]) is None:  # the C++ extension is built
        assert scripted.embed.original_name == "ScriptableMMEAFusedLinear"
    torch.testing.assert_close(scripted(x), ref, **TOL[torch.float64])
