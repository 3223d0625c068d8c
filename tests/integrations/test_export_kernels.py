"""Scripted files with the fused C++ adapter (``export --kernels cpp``; ``script_kernels("cpp")``;
csrc/adapter_op.cpp, ``torch.ops.mmea_kernels_ext.mmea_linear``): the op's output and input gradient
against the method's equations written column by column on the e3nn layer's output (float64 and
float32, 0e blocks first or not, outputs of 0e only, φ = 1 + γ, no bias), gradcheck; what it
refuses (a graph through its backward, weight gradients, other dtypes) with a clear error; the
bare scripted adapter and a whole scripted MACE (LAMMPS_MACE: energies, forces, virials) against
the eager model on the torch backend; the portable file stays free of the op; the command line's
``--kernels`` and its refusals; a fresh interpreter loads the file after ``load_kernels()`` and
names the missing op without it."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import mmea_kernels as mk
from mmea_kernels import MMEALinear
from mmea_kernels.nn.scriptable import fused_form_reason, script_kernels

from helpers import IN, OUT, TOL, assert_rel, load_bench, make_linear, naive_mmea, randomise_adapters

pytest.importorskip("mmea_kernels._C", reason="the C++ extension is not built")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*is deprecated. Please switch to:DeprecationWarning")]
if not hasattr(torch.ops.mmea_kernels_ext, "mmea_linear"):
    pytest.skip("mmea_kernels._C predates csrc/adapter_op.cpp: rebuild it", allow_module_level=True)

LAYERS = {  # (irreps in, irreps out)
    "mixed": (IN, OUT),
    "0e-not-first": ("2x1o+3x0e+1x2e", "1x1e+2x0e+2x2o+1x0e"),
    "scalars-out": ("4x0e+2x1o", "5x0e"),
}


def _adapter(layer, phi="exp", dtype=torch.float64, biases=True, seed=0):
    lin = make_linear(*LAYERS[layer], seed=seed, biases=biases).to(dtype)
    ad = MMEALinear(lin, rank=3, phi=phi).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ad.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.4)
    return ad


def _reference(ad, x):
    """y' and dy'/dx·v from the method's equations on the e3nn layer's output (float64)."""
    ad64 = copy.deepcopy(ad).double()
    x64 = x.detach().double().requires_grad_(True)
    y = naive_mmea(ad64, ad64.base(x64), x64, str(ad.base.irreps_in), str(ad.base.irreps_out), phi=ad.phi)
    return y, x64


def _scripted(ad):
    """The model holding (a copy of) ``ad`` (bench/scripted_layers.py's holder), scripted with the
    fused form; ``.m``: the adapter's."""
    with script_kernels("cpp", ad):
        return torch.jit.script(load_bench("scripted_layers").Holder(copy.deepcopy(ad)))


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("phi", ["exp", "residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_scripted_adapter_matches_the_equations(layer, phi, dtype):
    ad = _adapter(layer, phi, dtype, biases=layer != "0e-not-first")
    for p in ad.parameters():
        p.requires_grad_(False)
    scripted = _scripted(ad)
    assert scripted.m.original_name == "ScriptableMMEAFusedLinear"
    assert "mmea_kernels_ext.mmea_linear" in scripted.m.code
    x = torch.randn(2, 9, ad.in_layout.dim, dtype=dtype).requires_grad_(True)
    y = scripted(x)
    want, x64 = _reference(ad, x.reshape(-1, ad.in_layout.dim))
    tol = TOL[dtype]
    torch.testing.assert_close(y.reshape(-1, y.shape[-1]).double(), want.detach(), **tol)
    v = torch.randn_like(y)
    dx, = torch.autograd.grad(y, x, v)
    dx_want, = torch.autograd.grad(want, x64, v.reshape(want.shape).double())
    torch.testing.assert_close(dx.reshape(-1, dx.shape[-1]).double(), dx_want, **tol)


def test_fused_op_gradcheck_strided_input_and_refusals():
    ad = _adapter("mixed")
    for p in ad.parameters():
        p.requires_grad_(False)
    scripted = _scripted(ad)
    x = torch.randn(5, ad.in_layout.dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scripted, (x,))
    xt = torch.randn(ad.in_layout.dim, 7, dtype=torch.float64).t().requires_grad_(True)  # column-major
    y = scripted(xt)
    want, x64 = _reference(ad, xt)
    torch.testing.assert_close(y, want, **TOL[torch.float64])
    torch.testing.assert_close(torch.autograd.grad(y.sum(), xt)[0], torch.autograd.grad(want.sum(), x64)[0],
                               **TOL[torch.float64])
    with pytest.raises(RuntimeError, match="first derivatives only.*create_graph"):
        torch.autograd.grad(scripted(x).sum(), x, create_graph=True)
    trainable = _scripted(_adapter("mixed"))  # adapter weights with requires_grad
    with pytest.raises(RuntimeError, match="input only, not its weights"):
        trainable(x).sum().backward()
    with pytest.raises(RuntimeError, match="must match x's dtype"):  # the op itself, called with mixed dtypes
        op_args = _op_args(scripted.m)
        torch.ops.mmea_kernels_ext.mmea_linear(x.float(), *op_args)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode derivatives"):
        scripted(fwAD.make_dual(x.detach(), torch.ones_like(x)))


def test_fused_scripted_adapter_changes_dtype_after_scripting():
    """``.to(float32)`` after scripting runs float32 kernels; back to float64 gives the numbers of the
    eager layer taken through the same round trip (its weights rounded, the kernels' float64 path
    weights not)."""
    ad = _adapter("mixed")
    for p in ad.parameters():
        p.requires_grad_(False)
    scripted = _scripted(ad)
    x = torch.randn(6, ad.in_layout.dim, dtype=torch.float64)
    want = _reference(ad, x)[0].detach()
    torch.testing.assert_close(scripted.to(torch.float32)(x.float()).double(), want, **TOL[torch.float32])
    round_trip = _reference(copy.deepcopy(ad).float().double(), x)[0].detach()
    torch.testing.assert_close(scripted.to(torch.float64)(x), round_trip, **TOL[torch.float64])


def _op_args(m):
    """The scripted module's call of the op, its tensors and constants (as its forward passes them)."""
    b = m.base.bias if m.base.bias.numel() else None
    return (m.base.weight, b, m.mmea_down.weight, m.mmea_down.bias, m.mmea_up.weight, m.mmea_up.bias, m.k_tasks,
            m.k_instructions, m.k_path_weights, m.k_t_tasks, m.k_t_instructions, m.k_t_path_weights,
            m.k_gate_of_column, m.k_gate_cols, m.out_scalar_columns, m.num_additive, m.phi_code, m.scalar_first,
            m.scalar_count, m.out_first, m.block_w, m.t_block_w)


def test_fused_form_falls_back_where_the_op_does_not_apply():
    ad = _adapter("mixed")
    for p in ad.parameters():
        p.requires_grad_(False)
    scripted = _scripted(ad)
    x = torch.randn(6, ad.in_layout.dim, dtype=torch.float64)
    ad.backend = "torch"
    ad.adapter_enabled = False  # disabled: the base layer alone, through the aten form
    scripted.m.adapter_enabled = False
    torch.testing.assert_close(scripted(x), ad(x), **TOL[torch.float64])
    static = MMEALinear(make_linear("2x1o+1x2e", OUT), rank=3).double()  # no 0e input: static gates
    elora = mk.ELoRALinear(make_linear(), rank=3).double()
    assert "static" in fused_form_reason(static) and "elora" in fused_form_reason(elora)
    with script_kernels("cpp", torch.nn.ModuleList([static, elora])):
        assert torch.jit.script(copy.deepcopy(static)).original_name == "ScriptableMMEALinear"
        assert torch.jit.script(copy.deepcopy(elora)).original_name == "ScriptableELoRALinear"
    with pytest.raises(ValueError, match="kernels='bogus'"):
        with script_kernels("bogus"):
            pass


# ----------------------------------------------------------------------------- a whole MACE
@pytest.fixture(scope="module")
def mace_model():
    pytest.importorskip("mace")
    from mmea_kernels.integrations.mace import build_mace

    torch.manual_seed(0)
    model = build_mace("tiny").double()
    mk.inject_adapters(model, method="mmea", rank=4)
    randomise_adapters(model, 0.2, seed=7)
    return model


def test_lammps_file_with_fused_adapters_matches_the_torch_backend(mace_model, tmp_path):
    """LAMMPS_MACE with every adapter fused: energies, forces and virials of a periodic frame equal
    the eager model's on the torch backend (the reference path, no C++ kernel) to 1e-10; the
    portable export of the same model has no call of the op."""
    import numpy as np

    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations import export
    from mmea_kernels.integrations.mace import atoms_to_batch

    atoms = toy_molecules("ethanol", 1, seed=3)[0]
    atoms.cell = np.diag([6.5, 7.0, 7.5]) + 0.3 * np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    atoms.pbc = True
    b = atoms_to_batch([atoms], [1, 6, 8], 5.0, energy_key="__none__", forces_key="__none__", dtype=torch.float64)
    ref = copy.deepcopy(mace_model)
    for m in mk.adapted_modules(ref).values():
        m.backend = "torch"
    want = ref({k: v.clone() for k, v in b.items()}, training=False, compute_force=True, compute_virials=True)
    fused = export.export_lammps(mace_model, tmp_path / "cpp.pt", kernels="cpp")
    names = [m.original_name for m in fused.modules() if "MMEA" in m.original_name]
    assert names == ["ScriptableMMEAFusedLinear"] * 10
    portable = export.lammps_model(mace_model)
    assert not any("mmea_kernels_ext" in m.code for m in portable.modules() if hasattr(m, "code"))
    for module in (torch.jit.load(str(tmp_path / "cpp.pt")), portable):
        data = {k: v.detach().clone() for k, v in b.items() if torch.is_tensor(v)}
        out = module(data, torch.ones(len(atoms), dtype=torch.float64), compute_virials=True)
        assert_rel(out["total_energy_local"], want["energy"], "energy")
        assert_rel(out["forces"], want["forces"], "forces")
        assert_rel(out["virials"].reshape(3, 3), want["virials"].reshape(3, 3), "virials")


def test_export_command_kernels_and_a_fresh_interpreter(tmp_path):
    """``export --kernels cpp`` of a fine-tuning checkpoint reports the fused adapters; the file
    loads in a fresh interpreter after ``mmea_kernels.load_kernels()`` and not before (the error
    names the op); the refusals name the option."""
    pytest.importorskip("mace")
    import contextlib
    import io

    import ase.io

    from mmea_kernels.app.cli import main
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.app.deploy import export_checkpoint
    from mmea_kernels.integrations.mace import PRESETS, build_mace
    from mmea_kernels.train import FinetuneConfig, finetune
    from mmea_kernels.train.foundation import save_model

    torch.manual_seed(0)
    save_model(build_mace(PRESETS["tiny"]), PRESETS["tiny"], tmp_path / "base.pt")
    ase.io.write(str(tmp_path / "train.xyz"), toy_molecules("ethanol", 4, "B", seed=1))
    finetune(FinetuneConfig(train=str(tmp_path / "train.xyz"), valid=str(tmp_path / "train.xyz"),
                            model=str(tmp_path / "base.pt"), out_dir=str(tmp_path / "run"), method="mmea", epochs=1,
                            batch_size=4, progress=False), log=lambda *a: None)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    with contextlib.redirect_stdout(io.StringIO()) as s:
        assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "m.pt"), "--kernels", "cpp"]) == 0
    res = json.loads(s.getvalue())
    assert res["kernels"] == "cpp" and res["fused_adapters"]["fused"] == res["fused_adapters"]["adapters"] > 0
    assert "not ACEsuit's LAMMPS" in res["lammps"] and res["verified_max_rel_diff"] <= 1e-10
    with pytest.raises(ValueError, match="--kernels cpp is for --format lammps, lammps-parallel or torchscript"):
        export_checkpoint(ckpt, tmp_path / "x", "lammps-mliap", kernels="cpp")
    script = ("import sys, torch\n"
              f"path = {str(tmp_path / 'm.pt')!r}\n"
              "try:\n    torch.jit.load(path)\nexcept RuntimeError as e:\n    print('REFUSED', 'mmea_kernels_ext::mmea_linear' in str(e))\n"
              "import mmea_kernels\nmmea_kernels.load_kernels()\nm = torch.jit.load(path)\nprint('LOADED', type(m).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED True" in proc.stdout and "LOADED RecursiveScriptModule" in proc.stdout
