"""Weights made trainable again outside the adapters (per-element energy shifts, a readout: peft's
``modules_to_save``) were dropped by ``adapter_state_dict`` without a word (NequIP review,
2026-12-03: a reloaded adapter file gave energies 4.5 eV off). Now a warning names them, and
``trainable="include"`` saves them and loads them back."""
import warnings

import pytest
import torch
from e3nn import o3
from torch import nn

import mmea_kernels as mk

IRREPS = "4x0e+2x1o"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = o3.Linear(IRREPS, IRREPS)
        self.b = o3.Linear(IRREPS, "3x0e+1x1o")
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        y = self.b(self.a(x))
        return torch.cat([y[:, :3] + self.shift, y[:, 3:]], dim=1)


def _net(seed=1):
    torch.manual_seed(seed)
    return Net().double()


def _trained():
    model = _net()
    mk.inject_adapters(model, method="mmea", rank=2)
    model.shift.requires_grad_(True)  # the user trains the shifts too
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def test_a_trainable_weight_outside_the_adapters_is_named_and_can_be_saved(tmp_path):
    model = _trained()
    x = torch.randn(5, 10, dtype=torch.float64)
    want = model(x).detach()
    with pytest.warns(RuntimeWarning, match=r"1 trainable parameters outside the adapters \(shift\) are not saved"):
        plain = mk.adapter_state_dict(model)
    assert "trainable" not in plain
    fresh = _net()
    mk.load_adapter_state_dict(fresh, plain)
    assert (fresh(x) - want).abs().max() > 0.1  # the shifts were lost: what the warning is about

    path = tmp_path / "adapter.pt"
    torch.save(mk.adapter_state_dict(model, trainable="include"), path)
    fresh = _net()
    mk.load_adapter_file(fresh, path)  # read without running code (the file holds tensors and dicts only)
    torch.testing.assert_close(fresh(x), want, rtol=1e-12, atol=1e-12)
    assert fresh.shift.requires_grad and not fresh.a.base.weight.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.adapter_state_dict(model, trainable="ignore")  # no warning
        mk.adapter_state_dict(_trained_without_extras())


def _trained_without_extras():
    model = _net()
    mk.inject_adapters(model, method="elora", rank=2)
    return model


def test_bad_trainable_entries_are_refused_by_name_and_load_nothing():
    model = _trained()
    state = mk.adapter_state_dict(model, trainable="include")
    with pytest.raises(ValueError, match="trainable must be one of"):
        mk.adapter_state_dict(model, trainable="yes")
    for key, value, err, msg in (
            ("shiftt", torch.zeros(3, dtype=torch.float64), KeyError, "trainable parameter 'shiftt' is not a parameter"),
            ("shift", torch.zeros(4, dtype=torch.float64), ValueError, r"'shift' is shape \(4,\).* but shape \(3,\)"),
            ("shift", torch.full((3,), float("nan"), dtype=torch.float64), ValueError, "non-finite")):
        bad = dict(state, trainable={key: value})
        fresh = _net()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(err, match=msg):
            mk.load_adapter_state_dict(fresh, bad)
        assert not mk.adapted_modules(fresh)  # all or nothing
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    # into a model that has the adapters already: checked before anything is copied
    fresh = _net()
    mk.load_adapter_state_dict(fresh, state)
    adapter_before = fresh.a.mmea_up.weight.detach().clone()
    with pytest.raises(KeyError, match="'nope'"):
        mk.load_adapter_state_dict(fresh, dict(state, state={k: v + 1 for k, v in state["state"].items()},
                                               trainable={"nope": torch.zeros(1)}))
    assert torch.equal(fresh.a.mmea_up.weight, adapter_before)


def _elora_with_trained_base():
    model = _net()
    mk.inject_adapters(model, method="elora", rank=2)
    model.a.base.weight.requires_grad_(True)  # the user trains this layer's base weight too
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    return model


def _merged_elora():
    model = _net()  # the source's base, with other (merged) ELoRA weights
    mk.inject_adapters(model, method="elora", rank=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(0.2)
    for m in mk.adapted_modules(model).values():
        m.merge()
    return model


def test_a_merged_elora_model_takes_a_saved_base_weight_and_a_refused_state_changes_nothing():
    """(diff review) into a model whose ELoRA adapters are merged: a saved base weight was copied after
    the re-merge, over W + ΔW (0.43 off, merged flag still set); a refused 'trainable' entry left the
    layers unmerged and their base weights changed."""
    source = _elora_with_trained_base()
    x = torch.randn(5, 10, dtype=torch.float64)
    state = mk.adapter_state_dict(source, trainable="include")
    assert sorted(state["trainable"]) == ["a.base.weight"]
    target = _merged_elora()
    mk.load_adapter_state_dict(target, state)
    assert all(m.merged for m in mk.adapted_modules(target).values())
    torch.testing.assert_close(target(x), source(x), rtol=1e-12, atol=1e-12)

    target = _merged_elora()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(KeyError, match="'nope'"):
        mk.load_adapter_state_dict(target, dict(state, trainable={"nope": torch.zeros(1)}))
    assert all(m.merged for m in mk.adapted_modules(target).values())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # trainable="ignore": the adapters load, the extra weights do not (a model whose names differ)
    target = _merged_elora()
    mk.load_adapter_state_dict(target, dict(state, trainable={"nope": torch.zeros(1)}), trainable="ignore")
    assert torch.equal(target.a.elora_B[0], source.a.elora_B[0]) and not target.a.base.weight.requires_grad
    with pytest.raises(ValueError, match="trainable must be 'load' or 'ignore'"):
        mk.load_adapter_state_dict(target, state, trainable="yes")
