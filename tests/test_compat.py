"""The re-layout changed no behaviour: the old module paths import the new modules, and
checkpoints written before it load and predict what they predicted then."""
import importlib
import json
import pathlib

import pytest
import torch

import mmea_kernels  # noqa: F401  (installs the aliases)
from mmea_kernels._compat import ALIASES

DATA = pathlib.Path(__file__).resolve().parent / "data" / "pre_layout"


@pytest.mark.parametrize("old,new", sorted(ALIASES.items()))
def test_old_module_path_is_the_new_module(old, new):
    pytest.importorskip("ase") if new.startswith(("mmea_kernels.app", "mmea_kernels.train")) else None
    if new.endswith(("sevenn",)):
        pytest.importorskip("sevenn")
    if new.endswith(("cueq",)):
        pytest.importorskip("cuequivariance_torch")
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_from_imports_give_the_same_objects():
    pytest.importorskip("mace")
    from mmea_kernels.finetune import FinetuneConfig
    from mmea_kernels.inject import inject_adapters
    from mmea_kernels.models.mace import build_mace
    from mmea_kernels.nn.common import AdapterLinear
    from mmea_kernels.ops.linear_spec import LinearSpec

    import mmea_kernels as mk
    from mmea_kernels.integrations.mace import build_mace as new_build
    from mmea_kernels.linear_spec import LinearSpec as NewSpec
    from mmea_kernels.nn import AdapterLinear as NewAdapter
    from mmea_kernels.train import FinetuneConfig as NewConfig

    assert (FinetuneConfig, inject_adapters, build_mace, AdapterLinear, LinearSpec) == \
        (NewConfig, mk.inject_adapters, new_build, NewAdapter, NewSpec)


def test_old_finetune_module_names_are_there():
    """``mmea_kernels.finetune`` (one module before, split into train/ modules since) is the
    ``mmea_kernels.train`` package, which re-exports every public name of the old module."""
    pytest.importorskip("mace")
    import mmea_kernels.finetune as old
    import mmea_kernels.train as train

    assert old is train
    for name in ("FinetuneConfig", "finetune", "load_finetuned", "evaluate_checkpoint", "read_frames",
                 "CHECKPOINT_FORMAT", "refit_e0s", "errors", "loss", "format_table"):
        assert callable(getattr(old, name)) or name == "CHECKPOINT_FORMAT", name
    assert callable(old.finetune) and old.CHECKPOINT_FORMAT == "mmea_kernels.finetune/1"


@pytest.mark.parametrize("method", ["mmea", "elora"])
def test_checkpoint_from_before_the_relayout_loads_and_predicts_the_same(method):
    pytest.importorskip("mace")
    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.train import load_finetuned

    ref = json.loads((DATA / "predictions.json").read_text())[method]
    net, ckpt = load_finetuned(DATA / f"{method}.pt")  # also re-checks the checkpoint's own probe
    assert ckpt["method"] == method and "probe" in ckpt
    frames = toy_molecules("ethanol", 3, seed=1)
    out = net(atoms_to_batch(frames, net.atomic_numbers.tolist(), float(net.r_max), dtype=torch.float64),
              training=False, compute_force=True)
    torch.testing.assert_close(out["energy"], torch.tensor(ref["energy"], dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(out["forces"], torch.tensor(ref["forces"], dtype=torch.float64), rtol=0, atol=1e-9)


def test_an_alias_import_leaves_the_modules_own_spec():
    """importlib sets ``__spec__`` on the module an alias returns; left as the alias's, every relative
    import inside the module's functions warned ``__package__ != __spec__.parent`` (ImportWarning)."""
    import argparse
    import importlib
    import warnings

    import mmea_kernels.app.cli as cli

    importlib.import_module("mmea_kernels.cli")
    assert cli.__spec__.name == "mmea_kernels.app.cli" and cli.__spec__.parent == cli.__package__
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImportWarning)
        cli._finetune_parser(argparse.ArgumentParser().add_subparsers())  # relative imports inside
