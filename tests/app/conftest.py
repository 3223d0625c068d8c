"""``calc``: an ASE calculator on the shipped pretrained MACE (a smooth H, C, N, O potential) with
random MMEA adapters, in float64 (the MD and relaxation tests)."""
import pytest


@pytest.fixture(scope="module")
def calc():
    pytest.importorskip("mace")
    import mmea_kernels as mk
    from helpers import randomise_adapters
    from mmea_kernels.app.calculator import MMEACalculator
    from mmea_kernels.train.foundation import load_model

    net = load_model().double()
    mk.inject_adapters(net, method="mmea", rank=4)
    return MMEACalculator(module=randomise_adapters(net, 0.05, seed=0))


@pytest.fixture(scope="module")
def train_checkpoint(tmp_path_factory):
    """An MMEA checkpoint of the shipped model: 1 epoch on 4 frames of the shipped PBE ethanol set."""
    pytest.importorskip("mace")
    import ase.io

    from helpers import REPO
    from mmea_kernels.train import FinetuneConfig, finetune

    d = tmp_path_factory.mktemp("ck")
    frames = ase.io.read(str(REPO / "mmea_kernels" / "assets" / "ethanol_pbe" / "train.xyz"), ":4")
    ase.io.write(str(d / "train.xyz"), frames)
    finetune(FinetuneConfig(train=str(d / "train.xyz"), valid=str(d / "train.xyz"), out_dir=str(d / "run"),
                            method="mmea", epochs=1, batch_size=2, progress=False), log=lambda *_: None)
    return d / "run" / "checkpoint.pt"
