"""NequIP models (nequip 0.19, e3nn 0.6): FusedGate in place of e3nn's Gate, MMEA and ELoRA adapters,
the config builders of mmea_kernels.integrations.nequip, and what NequIP's AOTInductor loader and
packager need from this package. References: the same NequIP model without this package's modules
(float64), and rotated inputs."""
import pytest
import torch

nequip = pytest.importorskip("nequip")

import mmea_kernels as mk  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402

from helpers import default_dtype  # noqa: E402

TYPES = ["H", "C", "O"]


@pytest.fixture(autouse=True, scope="module")
def _nequip_global_state():
    """NequIP builds models only after its set_global_state(), which changes process-wide settings
    (default dtype, seeds, e3nn's optimisation defaults, TorchScript fusion, torch._dynamo flags, the
    multiprocessing sharing strategy): all put back after this module, for the tests that follow in
    the same worker."""
    import random

    import e3nn
    import numpy as np
    from nequip.utils.global_state import set_global_state

    dynamo = torch._dynamo.config
    flags = {k: getattr(dynamo, k) for k in ("capture_dynamic_output_shape_ops", "capture_scalar_outputs")}
    e3nn_opts, sharing = e3nn.get_optimization_defaults(), torch.multiprocessing.get_sharing_strategy()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    with default_dtype(torch.get_default_dtype()):
        set_global_state()
        try:
            yield
        finally:
            torch.jit.set_fusion_strategy(_FUSION_BEFORE)
            e3nn.set_optimization_defaults(**e3nn_opts)
            torch.multiprocessing.set_sharing_strategy(sharing)
            for k, v in flags.items():
                setattr(dynamo, k, v)
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])


# TorchScript's fusion strategy as it was before nequip's: set_fusion_strategy returns the one it replaces
_FUSION_BEFORE = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])
torch.jit.set_fusion_strategy(_FUSION_BEFORE)


def _kwargs(**kw):
    cfg = dict(seed=1, model_dtype="float64", r_max=5.0, type_names=TYPES, num_layers=2, l_max=2, parity=True,
               num_features=8, radial_mlp_width=16, avg_num_neighbors=8.0,
               per_type_energy_scales={"H": 0.5, "C": 0.7, "O": 0.9},
               per_type_energy_shifts={"H": -13.0, "C": -1030.0, "O": -2040.0})
    cfg.update(kw)
    return cfg


def _base(**kw):
    from nequip.model import NequIPGNNModel
    return NequIPGNNModel(**_kwargs(**kw))


def _data(atoms):
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES)
    return AtomicDataDict.batched_from_list([compute_neighborlist_(mapper(from_ase(a)), r_max=5.0) for a in atoms])


def _ef(model, data):
    out = model({k: (v.clone() if torch.is_tensor(v) else v) for k, v in data.items()})
    return out["total_energy"].detach(), out["forces"].detach()


def _perturbed(model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize("nonlin", ["silu", "ssp"])
def test_fused_gate_in_a_nequip_model_gives_its_numbers(nonlin):
    """Every e3nn Gate of the model (silu/tanh or NequIP's shifted softplus/abs) becomes a fused
    FusedGate; energies and forces as before to 1e-10 (float64); the state dict's keys unchanged."""
    acts = {"silu": ({"e": "silu", "o": "tanh"}, {"e": "silu", "o": "tanh"}),
            "ssp": ({"e": "ssp", "o": "abs"}, {"e": "ssp", "o": "abs"})}[nonlin]
    kw = dict(convnet_nonlinearity_scalars=acts[0], convnet_nonlinearity_gates=acts[1])
    base, model = _base(**kw), _base(**kw)
    data = _data(toy_molecules("ethanol", 2, seed=3))
    keys = list(model.state_dict())
    report = mk.replace_gates(model)
    gates = [m for m in model.modules() if type(m).__name__ == "FusedGate"]
    assert len(gates) == 2 and all(g.fused for g in gates), report
    assert list(model.state_dict()) == keys
    (e, f), (e0, f0) = _ef(model, data), _ef(base, data)
    torch.testing.assert_close(e, e0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_builder_adapts_a_nequip_model_exactly_and_equivariantly(method):
    """AdaptedNequIPGNNModel: FusedGate and adapters on the convolutions' o3.Linear layers; at
    initialisation the base model's numbers; with adapter weights moved, energies invariant and
    forces rotating with a rotation and a reflection of the input; only the adapters (and the
    listed shifts) train."""
    from e3nn import o3
    from mmea_kernels.integrations.nequip import AdaptedNequIPGNNModel

    base = _base(per_type_energy_shifts_trainable=True)
    shifts = "model.func.per_type_energy_scale_shift.shifts"
    model = AdaptedNequIPGNNModel(adapter_method=method, adapter_rank=4, trainable=[shifts],
                                  **_kwargs(per_type_energy_shifts_trainable=True))
    adapted = mk.adapted_modules(model)
    assert len(adapted) == 4 and all(n.endswith(("conv.linear_1", "conv.linear_2")) for n in adapted)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert shifts in trained
    assert all(f".{method}_" in n or "shifts" in n for n in trained), trained
    atoms = toy_molecules("toluene", 1, seed=8)
    e, f = _ef(model, _data(atoms))
    e0, f0 = _ef(base, _data(atoms))
    torch.testing.assert_close(e, e0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f0, rtol=1e-10, atol=1e-10)
    _perturbed(model)
    e, f = _ef(model, _data(atoms))
    assert (e - e0).abs().max() > 1e-3  # the adapters act
    for det in (1, -1):
        R = o3.angles_to_matrix(torch.tensor(0.3), torch.tensor(1.1), torch.tensor(-0.7)).double() * det
        moved = atoms[0].copy()
        moved.positions = moved.positions @ R.numpy().T
        er, fr = _ef(model, _data([moved]))
        torch.testing.assert_close(er, e, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fr, f @ R.T, rtol=1e-9, atol=1e-9)


def test_force_training_step_reaches_only_the_adapters():
    """A NequIP force loss (forces from autograd with create_graph in training mode) backpropagates to
    the adapter weights, and the same step on the model without FusedGate gives the same gradients."""
    from mmea_kernels.integrations.nequip import adapt

    data = _data(toy_molecules("ethanol", 2, seed=1))
    grads = []
    for fused in (True, False):
        torch.manual_seed(0)  # the same adapter weights in both
        model = adapt(_base(), "mmea", 4, fused_gate=fused)
        _perturbed(model).train()
        out = model({k: (v.clone() if torch.is_tensor(v) else v) for k, v in data.items()})
        loss = (out["forces"] ** 2).mean() + 1e-3 * out["total_energy"].sum()
        loss.backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        assert got == {n for n, p in model.named_parameters() if p.requires_grad} and got
        assert all(".mmea_" in n for n in got), sorted(got)  # the adapters' weights, nothing else
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_nequip_finds_the_libraries_its_compiled_files_import_and_packaging_keeps_us_external():
    """NequIP's GraphModel metadata lists the modules' _nequip_custom_ops_libs (nequip-compile embeds
    it in an AOTInductor file and imports it before loading); importing the integration registers
    mmea_kernels as external for nequip-package; a name in `trainable` that matches nothing is refused."""
    from nequip.scripts import _package_utils
    from mmea_kernels.integrations import nequip as integ

    plain = _base()
    assert "nequip_custom_ops_libs" not in plain.metadata
    model = integ.adapt(_base(), "mmea", 4)
    assert model.metadata["nequip_custom_ops_libs"] == "mmea_kernels"
    assert integ.PACKAGING_REGISTERED and "mmea_kernels" in _package_utils._EXTERNAL_MODULES
    with pytest.raises(ValueError, match=r"trainable names \['shiftz'\] match no parameter"):
        integ.adapt(_base(), "mmea", 4, trainable=["shiftz"])
    # a name without its full path: the message shows the parameter it probably meant
    with pytest.raises(ValueError, match=r"names that end alike: \['model\.func\.per_type_energy_scale_shift\.shifts'\]"):
        integ.adapt(_base(per_type_energy_shifts_trainable=True), "mmea", 4,
                    trainable=["per_type_energy_scale_shift.shifts"])
    # no adapters: FusedGate only, nothing frozen; with `trainable`, only those weights train
    assert all(p.requires_grad for p in integ.adapt(_base(), None).parameters())
    only = integ.adapt(_base(per_type_energy_shifts_trainable=True), None,
                       trainable=["model.func.per_type_energy_scale_shift.shifts"])
    assert [n for n, p in only.named_parameters() if p.requires_grad] == ["model.func.per_type_energy_scale_shift.shifts"]


@pytest.mark.skipif(not hasattr(torch.ops.mmea_kernels_ext, "mmea_linear"), reason="C++ extension not built")
def test_the_cpp_ops_modifier_gives_a_model_that_calls_only_the_cpp_kernels():
    """``--modifiers mmea_kernels_cpp_ops``: MMEA adapters on e3nn linears become the C++ fused op
    (export_forms "cpp"); energies and forces stay; the file still lists mmea_kernels for NequIP's
    Python loader to import (it registers the ops), and NequIP's make_fx graph calls this package's
    C++-registered ops only (no Python custom op: what pair_nequip cannot run)."""
    from nequip.model.modify_utils import modify
    from nequip.nn.compile import ListInputOutputWrapper
    from nequip.utils.fx import nequip_make_fx

    from mmea_kernels.integrations.nequip import adapt

    data = _data(toy_molecules("ethanol", 1, seed=2))
    keys = ["pos", "edge_index", "atom_types", "cell", "edge_cell_shift"]
    model = _perturbed(adapt(_base(), "mmea", 4))
    e0, f0 = _ef(model, data)
    modify(model, [{"modifier": "mmea_kernels_cpp_ops"}])
    model.eval()  # as nequip-compile: forces without a graph of their own (the C++ op: first derivatives)
    ours = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("mmea_kernels")]
    assert "ScriptableMMEAFusedLinear" in ours and all(n.startswith("Scriptable") for n in ours), ours
    assert model.metadata["nequip_custom_ops_libs"] == "mmea_kernels"
    e, f = _ef(model, data)
    torch.testing.assert_close(e, e0, rtol=0, atol=1e-9)
    torch.testing.assert_close(f, f0, rtol=0, atol=1e-11)
    fx = nequip_make_fx(ListInputOutputWrapper(model, keys, ["total_energy", "forces"]), {k: data[k] for k in keys}, keys)
    called = {str(n.target) for n in fx.graph.nodes if n.op == "call_function" and "mmea_kernels" in str(n.target)}
    assert "mmea_kernels_ext.gate_net_bwd.default" in called and all(t.startswith("mmea_kernels_ext.") for t in called)


def test_the_aten_only_modifier_gives_a_model_that_needs_no_mmea_kernels():
    """``nequip-compile ... --modifiers mmea_kernels_aten_only``: NequIP's modify() finds the modifier
    (one name on the adapters and FusedGates alike), applies it at compile time only (not persistent:
    packages keep the eager modules), and the model keeps its energies and forces (MMEA and ELoRA),
    lists no custom-op library, and traces (NequIP's make_fx, what its AOTInductor export compiles)
    to a graph without this package's ops (the eager model's program calls them:
    tests/nn/test_aten_forms.py)."""
    from nequip.model.modify_utils import get_all_modifiers, modify
    from nequip.nn.compile import ListInputOutputWrapper
    from nequip.nn.model_modifier_utils import is_persistent_model_modifier
    from nequip.utils.fx import nequip_make_fx

    from mmea_kernels.integrations.nequip import adapt

    data = _data(toy_molecules("ethanol", 1, seed=2))
    keys = ["pos", "edge_index", "atom_types", "cell", "edge_cell_shift"]
    for method in ("elora", "mmea"):
        model = _perturbed(adapt(_base(), method, 4))
        e0, f0 = _ef(model, data)
        assert model.metadata["nequip_custom_ops_libs"] == "mmea_kernels"
        assert not is_persistent_model_modifier(get_all_modifiers(model)["mmea_kernels_aten_only"])
        modify(model, [{"modifier": "mmea_kernels_aten_only"}])
        ours = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("mmea_kernels")]
        assert ours and all(n.startswith("Scriptable") for n in ours), ours
        assert "nequip_custom_ops_libs" not in model.metadata
        e, f = _ef(model, data)
        torch.testing.assert_close(e, e0, rtol=0, atol=1e-9)
        torch.testing.assert_close(f, f0, rtol=0, atol=1e-11)
    fx = nequip_make_fx(ListInputOutputWrapper(model, keys, ["total_energy", "forces"]), {k: data[k] for k in keys}, keys)
    called = {str(n.target) for n in fx.graph.nodes if n.op == "call_function"}
    assert any("addmm" in t for t in called) and not [t for t in called if "mmea_kernels" in t], called
