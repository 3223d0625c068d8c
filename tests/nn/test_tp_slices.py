"""split_tp_slices: e3nn's generated TensorProduct / Linear graphs with one split per sliced tensor
give bitwise the same values and first and second derivatives as e3nn's own graphs (float64 and
float32), run no slice_backward (the zero-filled copies it replaces; in the second backward too, the
output's cat), script, and leave the state dict alone; on SevenNet-0 the energies, forces and a force-training step's gradients are unchanged."""
import copy
import pickle

import pytest
import torch
from e3nn import o3

from mmea_kernels.nn.tp_slices import plain_cats, split_tp_slices


def _tp():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "fc": o3.FullyConnectedTensorProduct("8x0e+8x1o+4x2e", "0e+1o+2e", "8x0e+8x1o+4x2e+2x3o",
                                             shared_weights=False, internal_weights=False),
        "uvu": o3.TensorProduct("6x0e+4x1o+2x2e", "0e+1o", "6x0e+4x1o+4x1e+2x2e",
                                [(0, 0, 0, "uvu", True), (1, 0, 1, "uvu", True), (1, 1, 2, "uvu", True),
                                 (2, 0, 3, "uvu", True)],
                                shared_weights=False, internal_weights=False),
        "lin": o3.Linear("8x0e+8x1o+4x2e", "4x0e+4x1o+2x2e"),
    })


def _all_orders(mods, dtype, n=23, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in ("fc", "uvu"):
        tp = mods[name]
        xs = [torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
              for d in (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel)]
        y = tp(*xs)
        g = torch.autograd.grad(y.sin().sum(), xs, create_graph=True)
        g2 = torch.autograd.grad(sum((t * t).sum() for t in g), xs)
        out += [y, *g, *g2]
    lin = mods["lin"]
    x = torch.randn(n, lin.irreps_in.dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    y = lin(x)
    (g,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
    out += [y, g, *torch.autograd.grad((g * g).sum(), [x, lin.weight])]
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_derivatives_bitwise_equal(dtype):
    ref = _tp().to(dtype)
    new = copy.deepcopy(ref)
    state = {k: v.clone() for k, v in new.state_dict().items()}
    assert split_tp_slices(new) == 3
    assert split_tp_slices(new) == 0  # already rewritten: nothing left to do
    for a, b in zip(_all_orders(ref, dtype), _all_orders(new, dtype)):
        assert torch.equal(a, b)
    again = pickle.loads(pickle.dumps(new))  # e3nn pickles its graphs as fx (deepcopy does the same)
    assert ".split(" in again["fc"]._compiled_main_left_right.code and split_tp_slices(again) == 0
    for a, b in zip(_all_orders(ref, dtype), _all_orders(again, dtype)):
        assert torch.equal(a, b)
    assert new.state_dict().keys() == state.keys()
    assert all(torch.equal(new.state_dict()[k], v) for k, v in state.items())


def test_a_model_with_scripted_submodules_is_walked():
    """A ScriptModule's module dict has no .get (found with e3nn 0.5, whose generated graphs are
    scripted): the rewrite and its undo pass over it and still rewrite the e3nn layers beside it."""
    model = torch.nn.ModuleDict({"tp": _tp()["fc"], "scripted": torch.jit.script(torch.nn.Linear(3, 3))})
    assert split_tp_slices(model) == 1 and plain_cats(model) == 1


def test_plain_cats_undoes_the_cat_rewrite_only():
    """plain_cats (for files that must load without this package): no graph names cat_split_backward
    any more, the splits stay, and every value and derivative is still bitwise e3nn's."""
    ref = _tp().double()
    new = copy.deepcopy(ref)
    split_tp_slices(new)
    assert b"mmea_kernels" in pickle.dumps(new)  # the rewritten graphs name this package's cat
    assert plain_cats(new) == 3 and plain_cats(new) == 0
    codes = [g.code for m in new.values() for a, g in m._modules.items() if a.startswith("_compiled")]
    assert codes and not any("cat_split_backward" in c for c in codes) and any(".split(" in c for c in codes)
    assert b"mmea_kernels" not in pickle.dumps(new)
    for a, b in zip(_all_orders(ref, torch.float64), _all_orders(new, torch.float64)):
        assert torch.equal(a, b)


def _backward_ops(tp, second: bool) -> set:
    """The ops the profiler sees in ``tp``'s backward (``second``: in the backward of its input
    gradient taken with create_graph, as a force loss runs it)."""
    x1 = torch.randn(9, tp.irreps_in1.dim, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(9, tp.irreps_in2.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, tp.weight_numel, dtype=torch.float64, requires_grad=True)
    y = tp(x1, x2, w)
    if second:
        (g,) = torch.autograd.grad(y.sin().sum(), [x1], create_graph=True)
        y = g * g
    with torch.profiler.profile() as prof:
        torch.autograd.grad(y.sum(), [x1, x2, w])
    return {e.key for e in prof.key_averages()}


def test_backward_runs_no_zero_filled_slice_copies():
    mods = _tp().double()
    assert "aten::slice_backward" in _backward_ops(mods["fc"], False)  # e3nn's graph: a zero-filled copy per slice
    split_tp_slices(mods)
    names = _backward_ops(mods["fc"], False)
    assert "aten::slice_backward" not in names and "SplitWithSizesBackward0" in names, names


def test_force_training_backward_runs_no_zero_filled_slice_copies():
    """The output's cat: its backward (the forces, create_graph) narrowed the gradient once per
    instruction, and the loss backward zero-filled a copy of the whole output for each narrow;
    rewritten, the first backward splits once and the second runs no slice_backward."""
    mods = _tp().double()
    assert "aten::slice_backward" in _backward_ops(mods["uvu"], True)
    split_tp_slices(mods)
    assert "aten::slice_backward" not in _backward_ops(mods["uvu"], True)


def test_the_rewritten_cat_under_forward_mode_functorch_and_compile():
    """cat_split_backward: forward-mode tangents, torch.func.hessian and torch.compile (the plain
    cat there) give e3nn's own numbers."""
    import torch.autograd.forward_ad as fwAD

    ref = _tp().double()
    new = copy.deepcopy(ref)
    split_tp_slices(new)
    gen = torch.Generator().manual_seed(3)
    tps = [(m["uvu"], m["fc"]) for m in (ref, new)]
    dims = (ref["uvu"].irreps_in1.dim, ref["uvu"].irreps_in2.dim, ref["uvu"].weight_numel)
    x1, x2, w = (torch.randn(2, d, generator=gen, dtype=torch.float64) for d in dims)
    tangents = []
    for tp, _ in tps:
        with fwAD.dual_level():
            y = tp(fwAD.make_dual(x1.clone().requires_grad_(), torch.ones_like(x1)), x2, w)
            tangents.append(fwAD.unpack_dual(y).tangent)
    assert torch.equal(*tangents)
    hess = [torch.func.hessian(lambda x, tp=tp: tp(x, x2, w).sin().sum())(x1) for tp, _ in tps]
    assert torch.equal(*hess)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(tps[1][0], backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x1, x2, w), tps[0][0](x1, x2, w), rtol=1e-14, atol=1e-14)
    finally:
        torch._dynamo.reset()


def test_rewritten_layers_script():
    mods = _tp().double()
    split_tp_slices(mods)
    tp = mods["fc"]
    x1, x2 = torch.randn(5, tp.irreps_in1.dim, dtype=torch.float64), torch.randn(5, tp.irreps_in2.dim, dtype=torch.float64)
    w = torch.randn(5, tp.weight_numel, dtype=torch.float64)
    scripted = torch.jit.script(tp._compiled_main_left_right)
    assert torch.equal(scripted(x1, x2, w), tp(x1, x2, w))
    lin = mods["lin"]
    x = torch.randn(5, lin.irreps_in.dim, dtype=torch.float64)
    assert torch.equal(torch.jit.script(lin._compiled_main)(x, lin.weight, lin.bias), lin(x))


def test_sevennet_energies_forces_and_training_gradients_unchanged():
    pytest.importorskip("sevenn")
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.integrations.sevenn import load_sevennet
    from mmea_kernels.app.data import toy_molecules

    ref = load_sevennet("7net-0", dtype=torch.float64)
    new = copy.deepcopy(ref)
    assert split_tp_slices(new) > 0
    batch = atoms_to_batch(toy_molecules("ethanol", 2), ref.atomic_numbers.tolist(), float(ref.r_max),
                           dtype=torch.float64)

    def run(m):
        out = m(dict(batch), training=True, compute_force=True)
        loss = out["energy"].square().sum() + out["forces"].square().sum()
        params = [p for p in m.parameters() if p.requires_grad]
        return [out["energy"], out["forces"], *torch.autograd.grad(loss, params)]

    got, want = run(new), run(ref)
    assert len(got) > 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_load_model_splits_by_default_with_the_same_numbers():
    """``load_model`` rewrites the base model's e3nn graphs unless ``split_slices=False``; energies and
    forces of the two are bitwise equal."""
    from torch import fx

    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.train.foundation import fingerprint, load_model

    def codes(m):
        return [g.code for g in m.modules() if isinstance(g, fx.GraphModule)]

    fast = load_model("builtin:mace-xtb-small", dtype=torch.float64)
    plain = load_model("builtin:mace-xtb-small", dtype=torch.float64, split_slices=False)
    assert any(".split(" in c for c in codes(fast)) and not any(".split(" in c for c in codes(plain))
    assert fingerprint(fast) == fingerprint(plain)  # same state dict
    batch = atoms_to_batch(toy_molecules("ethanol", 2), fast.atomic_numbers.tolist(), float(fast.r_max),
                           dtype=torch.float64)
    a = fast(dict(batch), training=False, compute_force=True)
    b = plain(dict(batch), training=False, compute_force=True)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
