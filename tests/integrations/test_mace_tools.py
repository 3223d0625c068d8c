"""mace-torch's own tools on adapted models: its conversions, its training loop, its calculator.

mace-torch converts a MACE to cuEquivariance (``MACECalculator(enable_cueq=True)``,
``mace_create_lammps_model --format mliap``, ``--enable_cueq``) by copying the state-dict entries
whose names a plain MACE has; an adapted layer keeps its weight under ``<layer>.base.weight``, so the
adapters and the adapted layers' weights were dropped without an error
(``mmea_kernels.integrations.mace_convert_guard``). Checked here against the adapted e3nn model
itself (float64, correlation 2 as in test_cueq.py): mace-torch's conversion, unchanged, really loses
them (the control); with the package imported it carries them over, both ways; what cannot be
carried is refused by name; the OpenEquivariance conversions refuse an adapted model; a plain model
converts exactly as mace-torch alone converts it; the patch is in place whichever of the two
packages a process imports first. mace-torch's ``train_one_epoch`` (its loss, EMA, gradient
clipping) moves the adapters and leaves every frozen weight bitwise as it was.
"""
import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("cuequivariance")
cuet = pytest.importorskip("cuequivariance_torch")
pytest.importorskip("mace")
pytest.importorskip("ase")

from e3nn import o3  # noqa: E402

from helpers import assert_rel, build_mace64, default_dtype, max_rel, randomise_adapters  # noqa: E402
from mmea_kernels import adapted_modules, inject_adapters  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import atoms_to_batch, energy_and_forces  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
Z, R_MAX = (1, 6, 8), 5.0
SMALL = dict(hidden_irreps="8x0e+8x1o", max_ell=2, correlation=2, num_interactions=2)


@pytest.fixture(scope="module")
def base():
    return build_mace64(**SMALL)


@pytest.fixture(scope="module")
def batch():
    return atoms_to_batch(toy_molecules("ethanol", 2), Z, R_MAX, dtype=torch.float64)


def evaluate(model, batch):
    e, f = energy_and_forces(model, batch)
    return e.detach(), f.detach()


def adapted(base, method, std, **opts):
    model = copy.deepcopy(base)
    inject_adapters(model, method, rank=4, **opts)
    return randomise_adapters(model, std, seed=7)


def to_cueq(model):
    from mace.cli.convert_e3nn_cueq import run

    with default_dtype(torch.float64):
        return run(copy.deepcopy(model), device="cpu", layout="ir_mul")


@pytest.mark.parametrize("method,std", [("mmea", 0.1), ("elora", 0.5)])
def test_mace_conversion_carries_the_adapters_both_ways(base, batch, method, std):
    from mace.cli.convert_cueq_e3nn import run as back_to_e3nn

    model = adapted(base, method, std)
    e, f = evaluate(model, batch)
    assert max_rel(e, evaluate(base, batch)[0]) > 1e-3  # the adapters change the model
    cq = to_cueq(model)
    mods = adapted_modules(cq)
    assert list(mods) == list(adapted_modules(model)) and all(isinstance(m.base, cuet.Linear) for m in mods.values())
    e_cq, f_cq = evaluate(cq, batch)
    assert_rel(e_cq, e, "energies")
    assert_rel(f_cq, f, "forces")
    assert {n for n, p in cq.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    with default_dtype(torch.float64):
        back = back_to_e3nn(copy.deepcopy(cq), device="cpu")
    assert all(isinstance(m.base, o3.Linear) for m in adapted_modules(back).values())
    e_b, f_b = evaluate(back, batch)
    assert_rel(e_b, e, "energies")
    assert_rel(f_b, f, "forces")


def test_without_the_patch_mace_drops_the_adapters(base, batch, monkeypatch):
    """The control: mace-torch's transfer_weights as shipped loses the adapted layers' weights."""
    import mace.cli.convert_e3nn_cueq as conv

    assert hasattr(conv.transfer_weights, "__wrapped__")  # the package's patch is in place
    model = adapted(base, "mmea", 0.1)
    e, _ = evaluate(model, batch)
    monkeypatch.setattr(conv, "transfer_weights", conv.transfer_weights.__wrapped__)
    cq = to_cueq(model)
    assert not adapted_modules(cq)
    assert max_rel(evaluate(cq, batch)[0], e) > 1e-3


def test_a_plain_model_converts_as_mace_alone_converts_it(base, monkeypatch):
    import mace.cli.convert_e3nn_cueq as conv

    patched = to_cueq(base).state_dict()
    monkeypatch.setattr(conv, "transfer_weights", conv.transfer_weights.__wrapped__)
    alone = to_cueq(base).state_dict()
    assert patched.keys() == alone.keys() and all(torch.equal(patched[k], alone[k]) for k in alone)


@pytest.mark.parametrize("method,message", [("mmea-paper", "parametrized weights"), ("mmea-tp", "mmea-tp gates")])
def test_what_cannot_be_carried_is_refused(base, method, message):
    from mmea_kernels.train.methods import apply_method

    model = copy.deepcopy(base)
    apply_method(model, method, rank=2)
    with pytest.raises(ValueError, match=message):
        to_cueq(model)


def test_openequivariance_conversions_refuse_an_adapted_model(base):
    from mace.cli import convert_e3nn_oeq

    with default_dtype(torch.float64), \
            pytest.raises(ValueError, match=r"convert_e3nn_oeq .*would drop this model's adapters \(node_embedding"):
        convert_e3nn_oeq.run(adapted(base, "mmea", 0.1), device="cpu")  # (run sets the default dtype first)
    config = convert_e3nn_oeq.extract_config_mace_model(base)  # a plain model passes through
    assert config["num_interactions"] == 2


def test_mace_calculator_with_enable_cueq_on_a_saved_adapted_model(base, tmp_path):
    from mace.calculators import MACECalculator

    path = tmp_path / "adapted.model"
    torch.save(adapted(base, "mmea", 0.1), path)
    atoms = toy_molecules("ethanol", 1, seed=3)[0]
    got = []
    for cueq in (False, True):
        with default_dtype(torch.float64):
            calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64", enable_cueq=cueq)
        a = atoms.copy()
        a.calc = calc
        got.append((a.get_potential_energy(), a.get_forces()))
    assert abs(got[1][0] - got[0][0]) <= 1e-9 * abs(got[0][0])
    assert abs(got[1][1] - got[0][1]).max() <= 1e-8


@pytest.mark.parametrize("first", ["mmea_kernels", "mace"])
def test_patched_whichever_package_is_imported_first(first):
    mace_mods = ("import mace.cli.convert_e3nn_cueq as a, mace.cli.convert_cueq_e3nn as b, mace.cli.convert_e3nn_oeq as c, "
                 "mace.calculators.mace as d, mace.cli.select_head as e, mace.tools.scripts_utils as f, importlib.machinery")
    code = ("import mmea_kernels\n" + mace_mods if first == "mmea_kernels" else mace_mods + "\nimport mmea_kernels") + (
        "\nprint(all(hasattr(g, '__wrapped__') for g in (a.transfer_weights, b.transfer_weights, "
        "c.extract_config_mace_model, d.extract_model, e.remove_pt_head, f.extract_model, f.remove_pt_head)) "
        "and isinstance(a.__loader__, importlib.machinery.SourceFileLoader))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_mace_torchs_training_loop_trains_only_the_adapters(base, tmp_path):
    from mace import data as mdata
    from mace import modules
    from mace.tools import MetricsLogger, torch_geometric
    from mace.tools import utils as mutils
    from mace.tools.train import train_one_epoch
    from torch_ema import ExponentialMovingAverage

    model = adapted(base, "mmea", 0.1)
    keys = mdata.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    configs = mdata.config_from_atoms_list(toy_molecules("ethanol", 4, seed=5), key_specification=keys)
    table = mutils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with default_dtype(torch.float64):  # mace-torch's data take the default dtype
        loader = torch_geometric.dataloader.DataLoader(
            [mdata.AtomicData.from_config(c, z_table=table, cutoff=float(model.r_max)) for c in configs], batch_size=2)
        train_one_epoch(model=model, loss_fn=modules.WeightedEnergyForcesLoss(1.0, 1000.0), data_loader=loader,
                        optimizer=torch.optim.Adam(trainable, lr=1e-2, amsgrad=True), epoch=0,
                        output_args={"energy": True, "forces": True, "virials": False, "stress": False},
                        max_grad_norm=10.0, ema=ExponentialMovingAverage(trainable, decay=0.99),
                        logger=MetricsLogger(directory=str(tmp_path), tag="t"), device=torch.device("cpu"),
                        distributed=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # frozen: bitwise the same; adapters: moved
    assert any(p.requires_grad for p in model.parameters()) and any(not p.requires_grad for p in model.parameters())


def test_mace_extract_model_carries_the_adapters(base, batch):
    """mace's extract_model (MACECalculator(compile_mode=...)) rebuilds a plain MACE and loads the state
    dict with strict=False: the adapters were dropped (the control); they are carried over now."""
    import mace.tools.scripts_utils as su

    model = adapted(base, "mmea", 0.1)
    e, f = evaluate(model, batch)
    with default_dtype(torch.float64):
        rebuilt = su.extract_model(model)
        plain = su.extract_model.__wrapped__(model)
    assert list(adapted_modules(rebuilt)) == list(adapted_modules(model)) and not adapted_modules(plain)
    e_r, f_r = evaluate(rebuilt, batch)
    assert_rel(e_r, e, "energies")
    assert_rel(f_r, f, "forces")
    assert max_rel(evaluate(plain, batch)[0], e) > 1e-3


def test_mace_converter_run_as_a_script_is_patched(base, tmp_path):
    """python -m mace.cli.convert_e3nn_cueq runs the converter as __main__, which the import hook never
    sees: loading the adapted model imports this package, which patches __main__ too."""
    model = adapted(base, "mmea", 0.1)
    torch.save(model, tmp_path / "a.model")
    out = subprocess.run([sys.executable, "-m", "mace.cli.convert_e3nn_cueq", str(tmp_path / "a.model"),
                          "--output_model", "cq.model", "--return_model"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    converted = torch.load(tmp_path / "a.cq.model", weights_only=False)
    assert list(adapted_modules(converted)) == list(adapted_modules(model))
