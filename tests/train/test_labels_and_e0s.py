"""Labels under ASE's standard names (read by ase.io.read into ``atoms.calc.results``), frame numbers
in data-check errors after the validation split is shuffled off, ``--e0s FILE.json`` that leaves out
elements absent from the data, and the warning for compositions outside the span of those the E0s
were fitted on. Small: the shipped model and a few shipped PBE ethanol frames, 1 epoch."""
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
import ase  # noqa: E402
import ase.io  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402

from mmea_kernels.app.cli import main  # noqa: E402
from mmea_kernels.app.data import toy_molecules  # noqa: E402
from mmea_kernels.integrations.mace import PRESETS, build_mace  # noqa: E402
from mmea_kernels.train import evaluate_checkpoint  # noqa: E402
from mmea_kernels.train.checks import DataError, check_labels, checked_graphs, read_label  # noqa: E402
from mmea_kernels.train.e0s import E0OffsetWarning, composition_span, outside_span, refit_e0s  # noqa: E402
from mmea_kernels.train.foundation import ASSETS, load_model  # noqa: E402

DATA = ASSETS / "ethanol_pbe"
TINY = PRESETS["tiny"]  # H, C, O


def _plain(frames):
    """The frames with positions and the REF labels only."""
    out = []
    for a in frames:
        b = ase.Atoms(a.numbers, positions=a.positions)
        b.info["REF_energy"] = float(a.info["REF_energy"])
        b.arrays["REF_forces"] = np.array(a.arrays["REF_forces"])
        out.append(b)
    return out


def _standard(frames):
    """The frames as ASE writes computed results: SinglePointCalculator(energy=, forces=), no REF keys."""
    out = []
    for a in frames:
        b = ase.Atoms(a.numbers, positions=a.positions)
        b.calc = SinglePointCalculator(b, energy=float(a.info["REF_energy"]), forces=np.array(a.arrays["REF_forces"]))
        out.append(b)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 shipped ethanol frames: ref_{train,valid}.xyz (REF_energy / REF_forces) and the same as
    std_{train,valid}.xyz (written by ase.io.write from SinglePointCalculator results: energy= and
    forces), and a 1-epoch mmea run on std_*.xyz (--energy-key energy --forces-key forces; E0s by
    lstsq on ethanol alone)."""
    d = tmp_path_factory.mktemp("labels")
    frames = _plain(ase.io.read(str(DATA / "train.xyz"), ":8"))
    for name, part in (("train", frames[:6]), ("valid", frames[6:8])):
        ase.io.write(str(d / f"ref_{name}.xyz"), part)
        ase.io.write(str(d / f"std_{name}.xyz"), _standard(part))
    assert main(["finetune", "--train", str(d / "std_train.xyz"), "--valid", str(d / "std_valid.xyz"),
                 "--energy-key", "energy", "--forces-key", "forces", "--out", str(d / "run"), "--epochs", "1",
                 "--batch-size", "2", "--no-progress"]) == 0
    return d


# ------------------------------------------------------------------ 1. labels in atoms.calc.results
def test_standard_ase_keys_are_read_from_calc_results(data):
    """A file with energy= / forces (ase.io.read puts them in atoms.calc.results) passes the label
    checks and gives graphs whose labels are the values written; evaluate gives the same errors on it
    as on the same frames under REF_energy / REF_forces."""
    ref = ase.io.read(str(data / "ref_train.xyz"), ":")
    std = ase.io.read(str(data / "std_train.xyz"), ":")
    assert "energy" not in std[0].info and "forces" not in std[0].arrays  # where ASE leaves them
    check_labels(std, "std_train.xyz", "energy", "forces")
    for a, b in zip(ref, std):
        assert read_label(b, "energy", "energy")[0] == a.info["REF_energy"]
        np.testing.assert_array_equal(read_label(b, "forces", "forces")[0], a.arrays["REF_forces"])
    graphs = checked_graphs(std, [1, 6, 7, 8], 5.0, "std_train.xyz", "energy", "forces", dtype=torch.float64)
    for a, g in zip(ref, graphs):
        assert float(g.energy) == a.info["REF_energy"]
        np.testing.assert_array_equal(g.forces.numpy(), a.arrays["REF_forces"])
    moved = std[0].copy()
    moved.calc = std[0].calc
    moved.positions[0] += 0.1  # the calculator's results are of the old geometry: not labels of this one
    assert read_label(moved, "energy", "energy") == (None, None)
    assert read_label(std[0], "energy", "energy")[0] == ref[0].info["REF_energy"]
    ck = data / "run" / "checkpoint.pt"
    on_std = evaluate_checkpoint(ck, str(data / "std_valid.xyz"), energy_key="energy", forces_key="forces")
    on_ref = evaluate_checkpoint(ck, str(data / "ref_valid.xyz"), energy_key="REF_energy", forces_key="REF_forces")
    for k in ("energy_mae_meV", "forces_mae_meV_per_A", "loss"):
        assert on_std[k] == on_ref[k], k


def test_stress_and_messages_from_calc_results():
    """A stress in calc.results is read under its name too (graph stress = the Voigt values given);
    a missing key lists the calculator's results; a bad value there is named as calc.results[...]."""
    from ase.stress import voigt_6_to_full_3x3_stress

    a = toy_molecules("ethanol", 1, seed=1)[0]
    a.cell, a.pbc = np.eye(3) * 12.0, True
    a.center()
    voigt = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])
    b = a.copy()
    b.info, b.arrays = {}, {k: v for k, v in b.arrays.items() if k in ("numbers", "positions")}
    b.calc = SinglePointCalculator(b, energy=a.info["REF_energy"], forces=a.arrays["REF_forces"], stress=voigt)
    (g,) = checked_graphs([b], TINY.atomic_numbers, TINY.r_max, "s.xyz", "energy", "forces", dtype=torch.float64,
                          stress_key="stress")
    np.testing.assert_allclose(g.stress.numpy()[0], voigt_6_to_full_3x3_stress(voigt), rtol=0, atol=1e-15)
    assert float(g.energy) == a.info["REF_energy"]
    with pytest.raises(KeyError, match=r"frame 0 has no energy under info\['REF_energy'\] \(info keys: \[\]; "
                                       r"ASE calculator results \(calc.results\): \['energy', 'forces', 'stress'\]\)"):
        check_labels([b], "s.xyz", "REF_energy", "REF_forces")
    b.calc.results["energy"] = float("nan")
    with pytest.raises(DataError, match=r"s\.xyz: frame 0: the energy calc.results\['energy'\] is nan"):
        check_labels([b], "s.xyz", "energy", "forces")


# ------------------------------------------------------------------ 2. frame numbers after the split
def test_frame_numbers_are_the_files_without_valid(tmp_path, capsys):
    """Without --valid the training frames are shuffled before the validation set is split off; a
    data-check error still names the frame's number in the file (its selection): a corrupted frame
    1 is 'frame 1' whichever split it lands in, and 'frame 0' of file@1:."""
    from mmea_kernels.train.config import FinetuneConfig
    from mmea_kernels.train.data import read_splits, split_graphs

    frames = _plain(ase.io.read(str(DATA / "train.xyz"), ":10"))
    # seed 0 puts frame 4 of the file (frame 4 of @1:, the file's 5) in the validation split
    for k in (1, 4, 5):
        bad = [a.copy() for a in frames]
        bad[k].positions[1] = bad[k].positions[0] + 0.01
        ase.io.write(str(tmp_path / "bad.xyz"), bad)
        for spec, want, valid in ((str(tmp_path / "bad.xyz"), k, 4), (f"{tmp_path / 'bad.xyz'}@1:", k - 1, 5)):
            cfg = FinetuneConfig(train=spec, out_dir=str(tmp_path / "o"), seed=0)
            split = read_splits(cfg)
            assert any(np.allclose(a.positions, bad[k].positions) for a in split["valid"]) == (k == valid)
            with pytest.raises(DataError, match=rf"bad\.xyz(@1:)?: frame {want}: atoms 0 and 1 are 0.01"):
                split_graphs(cfg, split, [1, 6, 7, 8], 5.0, torch.float64)
    capsys.readouterr()
    assert main(["finetune", "--train", str(tmp_path / "bad.xyz"), "--out", str(tmp_path / "r"), "--epochs", "1",
                 "--no-progress"]) == 2
    assert "bad.xyz: frame 5: atoms 0 and 1 are 0.01" in capsys.readouterr().err


# ------------------------------------------------------------------ 3. --e0s FILE.json
def test_e0_file_may_leave_out_elements_absent_from_the_data(tmp_path):
    """Elements the file leaves out that the data do not contain keep the base model's E0 (one log
    line names them); one the data contain is refused; keys that are no atomic number, repeated keys
    and non-finite values are refused naming the file (given, not fitted, E0s); elements the base
    model lacks are not used, and said so."""
    model = build_mace(TINY, atomic_numbers=(1, 6, 7, 8), atomic_energies=[-1.0, -2.0, -3.0, -4.0]).double()
    frames = toy_molecules("ethanol", 2, seed=1)
    f = tmp_path / "e0.json"
    f.write_text(json.dumps({"1": -13.6, "6": -1030.0, "8": -2040.0}))
    lines = []
    got = refit_e0s(model, frames, [1, 6, 7, 8], str(f), "REF_energy", log=lines.append)
    assert got == [-13.6, -1030.0, -3.0, -2040.0]
    assert len(lines) == 1 and "keep the base model's E0s: N (Z=7)" in lines[0] and "e0.json" in lines[0]
    for text, err, why in (
            ('{"1": -13.6, "6": -1030.0, "7": -1.0, "8": -2040.0, "0": 5.0}', ValueError,
             r"E0 file .*e0\.json: \[0\] is not an atomic number"),
            ('{"1": -13.6, "6": -1030.0, "8": -2040.0, "1": -99.0}', ValueError,  # json.loads keeps the last one
             r"E0 file .*e0\.json gives elements H \(Z=1\) more than once"),
            ('{"1": -13.6, "6": -1030.0}', KeyError, r"no E0 for elements \[8\] \(O \(Z=8\)\), which the training data contain"),
            ('{"1": NaN, "6": -1030.0, "8": -2040.0}', ValueError, r"E0 file .*e0\.json: non-finite given E0s Z=1: nan")):
        f.write_text(text)
        with pytest.raises(err, match=why):
            refit_e0s(model, frames, [1, 6, 7, 8], str(f), "REF_energy", log=lines.append)
    # a periodic-table file serves several base models: the elements this one lacks are not used (said)
    f.write_text(json.dumps({"1": -13.6, "6": -1030.0, "7": -1.0, "8": -2040.0, "14": -7.0, "99": 5.0}))
    lines.clear()
    got = refit_e0s(build_mace(TINY).double(), frames, TINY.atomic_numbers, str(f), "REF_energy", log=lines.append)
    assert got == [{1: -13.6, 6: -1030.0, 8: -2040.0}[z] for z in TINY.atomic_numbers]
    assert any(re.search(r"e0\.json: N \(Z=7\), Si \(Z=14\), Es \(Z=99\) not used \(not elements of the base "
                         r"model\)", line) for line in lines), lines


def test_e0_file_without_absent_elements_trains(data, tmp_path, capsys):
    """finetune --e0s with H, C, O only (the shipped model also knows N, absent from ethanol): the
    checkpoint holds the given E0s and the base model's for N; the log says so."""
    base = load_model("builtin:mace-xtb-small")
    base_e0 = base.atomic_energies_fn.atomic_energies.detach().double().reshape(-1).tolist()
    (tmp_path / "e0.json").write_text(json.dumps({"1": -13.6, "6": -1029.8, "8": -2041.3}))
    capsys.readouterr()
    assert main(["finetune", "--train", str(data / "ref_train.xyz"), "--valid", str(data / "ref_valid.xyz"),
                 "--e0s", str(tmp_path / "e0.json"), "--out", str(tmp_path / "r"), "--epochs", "1",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert "keep the base model's E0s: N (Z=7)" in capsys.readouterr().out
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["e0s"] == [-13.6, -1029.8, base_e0[2], -2041.3]
    assert ck["e0_span"] is None  # given E0s: no fit, no span to warn about


# ------------------------------------------------------------------ 4. compositions outside the fit
def test_composition_span():
    """CH4 and H2O span C2H10O (2 CH4 + H2O) and H4O2, not methanol CH4O, CO2 or H2."""
    def mol(formula):
        return ase.Atoms(formula, positions=np.arange(3 * len(ase.Atoms(formula))).reshape(-1, 3))

    span = composition_span([mol("CH4"), mol("H2O"), mol("CH4")], [1, 6, 8])
    assert sorted(span["compositions"]) == ["CH4", "H2O"] and len(span["basis"]) == 2
    probe = ["C2H10O", "CH4O", "H4O2", "CO2", "CH4", "H2"]
    assert outside_span(span, [mol(f) for f in probe]) == [1, 3, 5]
    assert outside_span(None, [mol("H2O")]) == []


def test_outside_the_fitted_span_warns_once_numbers_unchanged(data, tmp_path):
    """The run fitted its E0s on ethanol alone: evaluate and the calculator warn (once) for toluene,
    naming it and saying forces are unaffected; ethanol does not warn; a checkpoint without the span
    (as before it was stored) does not warn and gives the same numbers."""
    from mmea_kernels.app.calculator import MMEACalculator

    ck = data / "run" / "checkpoint.pt"
    assert composition_span([], [1])["basis"] == []
    assert torch.load(ck, weights_only=True)["e0_span"]["compositions"] == ["C2H6O"]
    tol = toy_molecules("toluene", 2, seed=1)
    ase.io.write(str(tmp_path / "tol.xyz"), tol)
    kw = dict(energy_key="REF_energy", forces_key="REF_forces")
    with pytest.warns(E0OffsetWarning, match=r"tol\.xyz: 2 of 2 frames .* \(C7H8\) outside the span of the training "
                                             r"compositions .* \(C2H6O\): .*unknown per-element offset.*forces are unaffected"):
        res = evaluate_checkpoint(ck, str(tmp_path / "tol.xyz"), **kw)
    from mmea_kernels.app.predict import predict

    with pytest.warns(E0OffsetWarning, match=r"tol\.xyz: 2 of 2 frames .* \(C7H8\) outside the span"):
        predict(ck, str(tmp_path / "tol.xyz"), tmp_path / "pred.xyz")
    old = torch.load(ck, weights_only=True)
    del old["e0_span"]
    torch.save(old, tmp_path / "old.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", E0OffsetWarning)
        assert evaluate_checkpoint(tmp_path / "old.pt", str(tmp_path / "tol.xyz"), **kw) == res
        evaluate_checkpoint(ck, str(data / "ref_valid.xyz"), **kw)
        calc = MMEACalculator(checkpoint=str(ck))
        eth = ase.io.read(str(data / "ref_valid.xyz"), "0")
        eth.calc = calc
        eth.get_potential_energy()
    radical = eth.copy()
    del radical[-1]  # C2H5O: outside too
    with pytest.warns(E0OffsetWarning) as rec:
        for a in (tol[0], radical, tol[1], radical.copy()):
            a.calc = calc
            e = a.get_potential_energy()
    ours = [r for r in rec if issubclass(r.category, E0OffsetWarning)]  # (other warnings a first call may raise)
    assert len(ours) == 1 and "MMEACalculator: the structure has a composition (C7H8)" in str(ours[0].message)
    old_calc = MMEACalculator(checkpoint=str(tmp_path / "old.pt"))
    b = radical.copy()
    b.calc = old_calc
    assert math.isclose(b.get_potential_energy(), e, rel_tol=0, abs_tol=1e-9)
