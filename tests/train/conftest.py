"""Fixtures of the fine-tuning tests: ``train_files``, a tiny random 'pretrained' MACE file and
Morse-labelled ethanol/toluene extended-XYZ files (imports mace-torch only when used)."""
import pytest


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    """``base.pt`` (the tiny preset, seed 0), ``train.xyz`` (8 ethanol + 4 toluene), ``valid.xyz``
    (4 ethanol) and ``test.xyz`` (6 ethanol) in one directory."""
    import ase.io
    import torch

    from mmea_kernels.app.data import toy_molecules
    from mmea_kernels.integrations.mace import PRESETS, build_mace
    from mmea_kernels.train.foundation import save_model

    d = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    save_model(build_mace(PRESETS["tiny"]), PRESETS["tiny"], d / "base.pt")
    ase.io.write(str(d / "train.xyz"), toy_molecules("ethanol", 8, "B", seed=1) + toy_molecules("toluene", 4, "B", seed=2))
    ase.io.write(str(d / "valid.xyz"), toy_molecules("ethanol", 4, "B", seed=3))
    ase.io.write(str(d / "test.xyz"), toy_molecules("ethanol", 6, "B", seed=4))
    return d
