"""The README's main command on its embedded default (the shipped pretrained model and DFT set,
no ../shared needed), at a tiny budget; and the shipped assets themselves."""
import json

import pytest
import torch

pytest.importorskip("mace")

from mmea_kernels.app import demo  # noqa: E402
from mmea_kernels.train import read_frames  # noqa: E402
from mmea_kernels.train.foundation import ASSETS, DEFAULT_MODEL, load_model, model_info  # noqa: E402


def test_shipped_assets_are_complete():
    model = load_model(DEFAULT_MODEL)
    z, r_max = model_info(model)
    assert z == [1, 6, 7, 8] and r_max == 5.0
    meta = torch.load(ASSETS / "mace-xtb-small.pt", weights_only=False)["meta"]["recipe"]
    assert "GFN2-xTB" in meta["data"] and meta["valid"]["forces_mae_meV_per_A"] < 200
    assert (ASSETS / "mace-xtb-small.log").stat().st_size > 0
    assert (ASSETS / "mace-xtb-small.pt").stat().st_size < 5e6
    sizes = {s: len(read_frames(str(demo.DATA / f"{s}.xyz"), "REF_energy", "REF_forces")) for s in ("train", "valid", "test")}
    assert sizes == {"train": 50, "valid": 25, "test": 75}
    frames = read_frames(str(demo.DATA / "train.xyz"), "REF_energy", "REF_forces")
    assert all(a.get_chemical_formula() == "C2H6O" for a in frames)
    # PBE/def2-SVP total energies of ethanol are near -4209.5 eV (the rMD17 level of theory)
    assert all(-4212 < a.info["REF_energy"] < -4207 for a in frames)


def test_demo_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = demo.run(epochs=1, methods=("mmea", "elora"), out=str(tmp_path), md_steps=10)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| base, E0s re-fitted only |" in out and "| mmea |" in out and "| elora |" in out
    assert "energy drift" in out
    rows = res["rows"]
    assert rows["mmea"]["trainable_parameters"] > 0 and rows["mmea"]["frames"] == 75
    assert json.loads((tmp_path / "demo.json").read_text())["md"]["steps"] == 10
    assert (tmp_path / "mmea" / "checkpoint.pt").is_file()


def test_baseline_reads_labels_as_evaluate_does(tmp_path, monkeypatch):
    """demo.baseline (public) built its graphs from info/arrays only, while the frames' labels were
    checked (and evaluate reads them) also from ``atoms.calc.results``: frames labelled there only were
    scored against no labels. No extended-XYZ file puts REF_* keys there (ASE moves only its own
    names), so frames from Python stand in: the errors must equal those of the same labels in info."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    import mmea_kernels.train as train
    from mmea_kernels.app.data import toy_molecules

    frames = {"train.xyz": toy_molecules("ethanol", 6, "B", seed=1), "test.xyz": toy_molecules("ethanol", 4, "B", seed=2)}
    for name, fs in frames.items():
        ase.io.write(str(tmp_path / name), fs)
    want = demo.baseline("preset:tiny", str(tmp_path / "train.xyz"), str(tmp_path / "test.xyz"))

    def in_results(a):
        b = a.copy()
        e, f = b.info.pop("REF_energy"), b.arrays.pop("REF_forces")
        b.calc = SinglePointCalculator(b)
        b.calc.results = {"REF_energy": e, "REF_forces": f}
        return b

    read = train.read_frames
    monkeypatch.setattr(train, "read_frames", lambda spec, *a, **k: [in_results(x) for x in read(spec, *a, **k)])
    got = demo.baseline("preset:tiny", str(tmp_path / "train.xyz"), str(tmp_path / "test.xyz"))
    assert got == pytest.approx(want, rel=1e-12)
