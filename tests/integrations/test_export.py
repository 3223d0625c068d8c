"""TorchScript export on mace-torch's deployment path (mace/cli/create_lammps_model.py: LAMMPS_MACE
wrapper, e3nn ``jit.compile``, ``.save``): an MMEA- or ELoRA-adapted tiny MACE (float64, random
nonzero adapter weights) scripts, saves, loads and gives the eager model's energies and forces
(≤ 1e-10 relative); the saved LAMMPS model loads in an interpreter without mmea_kernels, mace or
e3nn; bare adapters (e3nn and cuEquivariance layers, every variant) script with the same outputs and
gradients; adapters pinned to a backend TorchScript cannot run are refused with a clear error."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import mmea_kernels as mk
from mmea_kernels import ELoRALinear, MMEALinear
from mmea_kernels.integrations import export
from mmea_kernels.nn.scriptable import ScriptableELoRALinear, ScriptableMMEALinear

from helpers import IN, MODEL_RTOL, OUT, TOL, assert_rel, make_linear, randomise_adapters

try:
    import ase  # noqa: F401
    from mace.calculators import LAMMPS_MACE
    HAVE_MACE = True
except ImportError:
    HAVE_MACE = False
needs_mace = pytest.mark.skipif(not HAVE_MACE, reason="needs mace-torch and ase")

Z, R_MAX = [1, 6, 8], 5.0
STD = {"mmea": 0.2, "elora": 0.3}
pytestmark = [pytest.mark.filterwarnings("ignore:.*is deprecated. Please switch to:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------- MACE
@pytest.fixture(scope="module")
def batch():
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch

    return atoms_to_batch(toy_molecules("ethanol", 3), Z, R_MAX, dtype=torch.float64)


@pytest.fixture(scope="module")
def frames():
    """The same three frames one batch each: LAMMPS_MACE evaluates one configuration per call."""
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch

    return [atoms_to_batch([a], Z, R_MAX, dtype=torch.float64) for a in toy_molecules("ethanol", 3)]


def fresh(batch_dict):
    """A copy of the batch (MACE's forward writes into the dict and marks positions requires_grad)."""
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in batch_dict.items()}


def evaluate(model, batch_dict):
    from mmea_kernels.integrations.mace import energy_and_forces

    e, f = energy_and_forces(model, fresh(batch_dict))
    return e.detach(), f.detach()


def lammps_inputs(batch_dict):
    data = {k: v for k, v in fresh(batch_dict).items() if torch.is_tensor(v)}
    return data, torch.ones(data["positions"].shape[0], dtype=torch.float64)


def run_lammps(model, frames):
    """Energies per frame and forces from a (scripted) LAMMPS_MACE with every atom local."""
    es, fs = [], []
    for frame in frames:
        data, local = lammps_inputs(frame)
        out = model(data, local)
        es.append(out["total_energy_local"].detach())
        fs.append(out["forces"].detach())
    return torch.cat(es), torch.cat(fs)


@pytest.fixture(scope="module", params=["mmea", "elora"])
def adapted(request, batch):
    """(method, adapted tiny MACE, eager energies, eager forces); the adapters change the energies."""
    from mmea_kernels.integrations.mace import build_mace

    torch.manual_seed(0)
    model = build_mace("tiny").double()
    base_e, _ = evaluate(model, batch)
    mk.inject_adapters(model, method=request.param, rank=4)
    randomise_adapters(model, STD[request.param], seed=7)
    e, f = evaluate(model, batch)
    assert (e - base_e).abs().max() > 1e-3, "the adapters should change the energies"
    return request.param, model, e, f


@needs_mace
def test_e3nn_jit_compile_save_load(adapted, batch, tmp_path):
    """The plain path: ``e3nn.util.jit.compile`` (in place, on a copy), ``torch.jit.save`` / ``load``."""
    from e3nn.util import jit

    method, model, e, f = adapted
    scripted = jit.compile(copy.deepcopy(model))
    assert isinstance(scripted, torch.jit.ScriptModule)
    code = "\n".join(m.code for m in scripted.modules() if isinstance(m, torch.jit.ScriptModule)
                     and hasattr(m, "code"))
    assert "mmea_kernels" not in code  # aten ops only
    e1, f1 = evaluate(scripted, batch)
    assert_rel(e1, e, f"{method} scripted energies")
    assert_rel(f1, f, f"{method} scripted forces")
    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    e2, f2 = evaluate(loaded, batch)
    assert_rel(e2, e, f"{method} loaded energies")
    assert_rel(f2, f, f"{method} loaded forces")


@needs_mace
def test_lammps_export_as_create_lammps_model(adapted, batch, frames, tmp_path):
    """mace-torch's create_lammps_model steps verbatim, then mmea_kernels.integrations.export.export_lammps; the
    eager model keeps its adapters and its numbers."""
    from e3nn.util import jit

    method, model, e, f = adapted
    # create_lammps_model: model.double().to("cpu"); LAMMPS_MACE(model); jit.compile(...).save(path)
    raw = jit.compile(LAMMPS_MACE(copy.deepcopy(model).double().to("cpu")))
    raw.save(str(tmp_path / "raw-lammps.pt"))
    helper = export.export_lammps(model, tmp_path / "model-lammps.pt")
    for name in ("raw-lammps.pt", "model-lammps.pt"):
        loaded = torch.jit.load(str(tmp_path / name))
        e1, f1 = run_lammps(loaded, frames)
        assert_rel(e1, e, f"{method} {name} energies")
        assert_rel(f1, f, f"{method} {name} forces")
    e2, f2 = run_lammps(helper, frames)
    assert_rel(e2, e, f"{method} export_lammps energies")
    # the eager model is untouched: same adapters, trainable, same numbers
    assert len(mk.adapted_modules(model)) == 10
    assert all(p.requires_grad for m in mk.adapted_modules(model).values() for p in m.adapter_parameters())
    e3, f3 = evaluate(model, batch)
    assert torch.equal(e3, e) and torch.equal(f3, f)


@needs_mace
@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_lammps_export_virials_match_the_calculator_stress(method):
    """LAMMPS' NPT needs virials: the exported adapted model's ``virials`` of a periodic (triclinic)
    frame equal ``-σ V`` of the eager model's stress (the ASE calculator's, itself tested against
    finite differences of the energy under strain)."""
    import numpy as np

    from mmea_kernels.app.calculator import MMEACalculator
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch, build_mace

    torch.manual_seed(0)
    model = build_mace("tiny").double()
    mk.inject_adapters(model, method=method, rank=4)
    randomise_adapters(model, STD[method], seed=7)
    atoms = toy_molecules("ethanol", 1, seed=3)[0]
    atoms.positions += 1.0
    atoms.cell = np.diag([6.5, 7.0, 7.5]) + 0.3 * np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    atoms.pbc = True
    atoms.calc = MMEACalculator(module=model)
    want = -atoms.get_stress(voigt=False) * atoms.get_volume()
    assert np.abs(want).max() > 1e-3
    b = atoms_to_batch([atoms], [1, 6, 8], 5.0, energy_key="__none__", forces_key="__none__", dtype=torch.float64)
    data, local = lammps_inputs(b)
    out = export.lammps_model(model)(data, local, compute_virials=True)
    np.testing.assert_allclose(out["virials"].detach().numpy().reshape(3, 3), want, rtol=1e-10, atol=1e-12)


@needs_mace
def test_saved_lammps_model_loads_without_mmea_kernels(frames, tmp_path):
    """The saved file holds aten ops only: a fresh interpreter with torch alone (no mmea_kernels, mace,
    e3nn importable) loads and runs it, as libtorch in LAMMPS would."""
    from mmea_kernels.integrations.mace import build_mace

    torch.manual_seed(0)
    model = build_mace("tiny").double()
    mk.inject_adapters(model, method="mmea", rank=4, phi="residual")
    randomise_adapters(model, 0.2, seed=7)
    e, f = evaluate(model, frames[0])
    export.export_lammps(model, tmp_path / "m-lammps.pt")
    data, local = lammps_inputs(frames[0])
    torch.save({"data": data, "local": local, "e": e, "f": f}, tmp_path / "inputs.pt")
    script = (
        "import sys\n"
        "class Block:\n"  # make mmea_kernels, mace and e3nn unimportable
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mmea_kernels', 'mace', 'e3nn'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"m = torch.jit.load({str(tmp_path / 'm-lammps.pt')!r})\n"
        "out = m(d['data'], d['local'])\n"
        "re = ((out['total_energy_local'] - d['e']).abs().max() / d['e'].abs().max()).item()\n"
        "rf = ((out['forces'] - d['f']).abs().max() / d['f'].abs().max()).item()\n"
        f"assert re <= {MODEL_RTOL!r} and rf <= {MODEL_RTOL!r}, (re, rf)\n"
        "assert not any(k.split('.')[0] in ('mmea_kernels', 'mace', 'e3nn') for k in sys.modules)\n"
        "print('LOADED-OK', re, rf)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "LOADED-OK" in proc.stdout


@needs_mace
def test_pinned_backend_is_refused_with_a_clear_error(batch, tmp_path):
    from mmea_kernels.integrations.mace import build_mace

    torch.manual_seed(0)
    model = build_mace("tiny").double()
    mk.inject_adapters(model, method="mmea", rank=4, target_modules=["linear_up"], backend="triton")
    with pytest.raises(NotImplementedError, match=r"adapter 'interactions.0.linear_up' has its gate backend "
                                                  r"pinned to 'triton'.*adapter.backend = None"):
        export.script_model(model)
    with pytest.raises(NotImplementedError, match="pinned to 'triton'"):
        export.export_lammps(model, tmp_path / "never-written.pt")
    assert not (tmp_path / "never-written.pt").exists()
    assert len(mk.adapted_modules(model)) == 2  # checked before anything was copied or compiled
    for m in mk.adapted_modules(model).values():
        m.backend = None  # unpinned: scripts
    scripted = export.script_model(model)
    e1, f1 = evaluate(scripted, batch)
    e, f = evaluate(model, batch)
    assert_rel(e1, e, "unpinned energies")
    assert_rel(f1, f, "unpinned forces")


# ----------------------------------------------------------------------------- bare layers
def check_same(ad, scripted, x, *args):
    """Outputs, input gradients and a second derivative of the scripted adapter equal eager ones."""
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = ad(x1, *args), scripted(x2, *args)
    torch.testing.assert_close(y2, y1, **TOL[torch.float64])
    w = torch.randn_like(y1)
    g1, = torch.autograd.grad((y1 * w).sum(), x1, create_graph=True)
    g2, = torch.autograd.grad((y2 * w).sum(), x2, create_graph=True)
    torch.testing.assert_close(g2, g1, **TOL[torch.float64])
    names = [n for n, _ in ad.named_parameters() if not n.startswith("base.")]
    p1, p2 = dict(ad.named_parameters()), dict(scripted.named_parameters())  # same names
    d1 = torch.autograd.grad((g1 ** 2).sum(), [p1[n] for n in names], allow_unused=True)
    d2 = torch.autograd.grad((g2 ** 2).sum(), [p2[n] for n in names], allow_unused=True)
    for a, b in zip(d1, d2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def rand_adapter(ad, std=0.4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return ad


@pytest.mark.parametrize("variant", ["exp", "residual", "static", "external-weights", "disabled", "leading-dims"])
def test_bare_mmea_scripts(variant):
    irreps_in = "2x1o+1x2e" if variant == "static" else IN
    lin = make_linear(irreps_in, OUT, internal_weights=variant != "external-weights",
                      shared_weights=variant != "external-weights")
    ad = rand_adapter(MMEALinear(lin, rank=3, phi="residual" if variant == "residual" else "exp").double())
    if variant == "static":
        assert ad.mmea_up is None
    ad.adapter_enabled = variant != "disabled"
    scripted = torch.jit.script(copy.deepcopy(ad))
    assert scripted.original_name == "ScriptableMMEALinear"
    shape = (2, 3, 7) if variant == "leading-dims" else (7,)
    x = torch.randn(*shape, ad.in_layout.dim, dtype=torch.float64)
    args = (torch.randn(7, lin.weight_numel, dtype=torch.float64),) if variant == "external-weights" else ()
    check_same(ad, scripted, x, *args)
    with pytest.raises(torch.jit.Error, match="needs the last dimension to be"):
        scripted(torch.randn(4, ad.in_layout.dim + 1, dtype=torch.float64))


def test_bare_elora_scripts_and_e3nn_compile_marks():
    from e3nn.util import jit

    ad = rand_adapter(ELoRALinear(make_linear(), rank=3, alpha=2.0))
    scripted = jit.compile(copy.deepcopy(ad))  # the adapter's compile_mode is "script"
    assert scripted.original_name == "ScriptableELoRALinear"
    check_same(ad, scripted, torch.randn(6, ad.in_layout.dim, dtype=torch.float64))
    # torch.jit.script directly on a model replaces the adapters in that model (torch's
    # __prepare_scriptable__ protocol); the scriptable forms share the parameters
    holder = torch.nn.Sequential(ad)
    torch.jit.script(holder)
    assert isinstance(holder[0], ScriptableELoRALinear) and holder[0].elora_A[0] is ad.elora_A[0]
    mm = torch.nn.Sequential(MMEALinear(make_linear()))
    torch.jit.script(mm)
    assert isinstance(mm[0], ScriptableMMEALinear)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_bare_pinned_backend_is_refused(backend):
    ad = MMEALinear(make_linear(), backend=backend)
    with pytest.raises(NotImplementedError, match=f"pinned to '{backend}'.*Unpin it"):
        torch.jit.script(ad)
    for ok in (None, "torch", "auto"):
        ad.backend = ok
        torch.jit.script(copy.deepcopy(ad))


@pytest.mark.parametrize("layouts", [("ir_mul", "ir_mul"), ("mul_ir", "mul_ir"), ("mul_ir", "ir_mul")],
                         ids=["ir_mul", "mul_ir", "mul_ir->ir_mul"])
@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_bare_cuet_adapters_script(method, layouts):
    cue = pytest.importorskip("cuequivariance")
    cuet = pytest.importorskip("cuequivariance_torch")
    torch.manual_seed(0)
    lin, lout = (getattr(cue, name) for name in layouts)
    base = cuet.Linear(cue.Irreps("O3", IN), cue.Irreps("O3", OUT), layout_in=lin, layout_out=lout,
                       dtype=torch.float64)
    ad = rand_adapter(MMEALinear(base, rank=3) if method == "mmea" else ELoRALinear(base, rank=3))
    scripted = torch.jit.script(copy.deepcopy(ad))
    assert scripted.original_name.endswith("CuetLinear")
    check_same(ad, scripted, torch.randn(5, ad.in_layout.dim, dtype=torch.float64))
