"""fetch_rmd17 on a small fake archive with the published rMD17 layout (no network)."""
import io
import os
import tarfile

import ase.io
import ase.units
import numpy as np
import pytest

from mmea_kernels.app.rmd17 import MOLECULES, fetch_rmd17

N_FRAMES = 12
SIZES = dict(n_train=4, n_valid=3, n_test=5)  # uses all 12 frames
FAKE = {"ethanol": [6, 6, 8, 1, 1, 1, 1, 1, 1], "benzene": [6] * 6 + [1] * 6}
EV_PER_KCAL_MOL = ase.units.kcal / ase.units.mol  # independent of the module's constant


def _molecule_arrays(numbers, seed):
    rng = np.random.default_rng(seed)
    n = len(numbers)
    return {
        "nuclear_charges": np.array(numbers, dtype=np.int64),
        "coords": rng.normal(scale=1.5, size=(N_FRAMES, n, 3)),
        "energies": -97000.0 + rng.normal(scale=5.0, size=N_FRAMES),  # kcal/mol
        "forces": rng.normal(scale=30.0, size=(N_FRAMES, n, 3)),  # kcal/mol/Å
        "old_indices": np.arange(N_FRAMES) * 7,
        "old_energies": rng.normal(size=N_FRAMES),
        "old_forces": rng.normal(size=(N_FRAMES, n, 3)),
    }


def _make_archive(path, arrays, extra_members=()):
    """``rmd17/npz_data/rmd17_<molecule>.npz`` and ``rmd17/splits/*.csv`` packed as .tar.bz2."""
    with tarfile.open(path, "w:bz2") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        for d in ("rmd17", "rmd17/npz_data", "rmd17/splits"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for mol, arrs in arrays.items():
            buf = io.BytesIO()
            np.savez(buf, **arrs)
            add(f"rmd17/npz_data/rmd17_{mol}.npz", buf.getvalue())
        add("rmd17/splits/index_train_01.csv", b"0\n1\n2\n")
        add("rmd17/splits/index_test_01.csv", b"3\n4\n5\n")
        for name, data in extra_members:
            add(name, data)
    return path


@pytest.fixture
def fake(tmp_path):
    arrays = {mol: _molecule_arrays(z, seed=i) for i, (mol, z) in enumerate(FAKE.items())}
    (tmp_path / "src").mkdir()
    return _make_archive(tmp_path / "src" / "rmd17.tar.bz2", arrays), arrays


def _check_outputs(out, arrays, result, molecules, seed=123):
    assert set(result) == set(molecules)
    for mol in molecules:
        a = arrays[mol]
        d = out / mol
        assert result[mol] == {**{k[2:]: v for k, v in SIZES.items()}, "dir": str(d)}
        perm = np.random.default_rng(seed).permutation(N_FRAMES)
        bounds = np.cumsum([0, SIZES["n_train"], SIZES["n_valid"], SIZES["n_test"]])
        used = []
        for split, lo, hi in zip(("train", "valid", "test"), bounds[:-1], bounds[1:]):
            frames = ase.io.read(d / f"{split}.xyz", ":")
            assert len(frames) == hi - lo
            for k, at in zip(perm[lo:hi], frames):
                # the frame comes from the archive, at the index the seeded permutation gives
                assert at.info["rmd17_index"] == k
                assert np.array_equal(at.numbers, a["nuclear_charges"])
                assert np.array_equal(at.positions, a["coords"][k])
                e_ev = a["energies"][k] * EV_PER_KCAL_MOL
                assert abs(at.info["REF_energy"] - e_ev) <= 1e-12 * abs(e_ev)
                np.testing.assert_allclose(at.arrays["REF_forces"], a["forces"][k] * EV_PER_KCAL_MOL,
                                           rtol=1e-12, atol=0)
                assert not at.pbc.any() and not at.cell.any()
                assert at.calc is None  # labels stay under REF_* keys, not a calculator
                used.append(np.where([np.array_equal(at.positions, c) for c in a["coords"]])[0].tolist())
        # splits are disjoint and together use every frame exactly once (4 + 3 + 5 = 12)
        assert sorted(i for u in used for i in u) == list(range(N_FRAMES))


def test_constant_is_ev_per_kcal_mol():
    assert EV_PER_KCAL_MOL == pytest.approx(0.0433641, rel=1e-5)


def test_fetch_file_url_and_archive(fake, tmp_path):
    archive, arrays = fake
    out_url = tmp_path / "out_url"
    res = fetch_rmd17(out_url, url=archive.resolve().as_uri(), molecules=["ethanol", "benzene"], **SIZES)
    _check_outputs(out_url, arrays, res, ["ethanol", "benzene"])
    # the download is kept under its final name, no temporary files or extraction left behind
    assert (out_url / "rmd17.tar.bz2").read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in out_url.iterdir()) == ["benzene", "ethanol", "rmd17.tar.bz2"]

    out_arc = tmp_path / "out_arc"
    res = fetch_rmd17(str(out_arc), molecules="benzene,ethanol", archive=archive, **SIZES)
    _check_outputs(out_arc, arrays, res, ["ethanol", "benzene"])
    assert not (out_arc / "rmd17.tar.bz2").exists()
    for mol in FAKE:
        for split in ("train", "valid", "test"):
            assert (out_arc / mol / f"{split}.xyz").read_bytes() == (out_url / mol / f"{split}.xyz").read_bytes()


def test_subset_and_seed(fake, tmp_path):
    archive, arrays = fake
    res = fetch_rmd17(tmp_path / "o", molecules=["benzene"], archive=archive, seed=7, **SIZES)
    _check_outputs(tmp_path / "o", arrays, res, ["benzene"], seed=7)
    assert not (tmp_path / "o" / "ethanol").exists()


def test_existing_files_need_overwrite(fake, tmp_path):
    archive, _ = fake
    out = tmp_path / "o"
    fetch_rmd17(out, molecules=["ethanol"], archive=archive, **SIZES)
    with pytest.raises(FileExistsError, match=r"ethanol.train\.xyz"):
        fetch_rmd17(out, molecules=["ethanol"], archive=archive, **SIZES)
    fetch_rmd17(out, molecules=["ethanol"], archive=archive, overwrite=True, **SIZES)


def test_unknown_molecule(fake, tmp_path):
    archive, _ = fake
    with pytest.raises(ValueError, match="caffeine") as err:
        fetch_rmd17(tmp_path / "o", molecules=["ethanol", "caffeine"], archive=archive, **SIZES)
    for name in MOLECULES:
        assert name in str(err.value)
    assert not (tmp_path / "o" / "ethanol").exists()


def test_molecule_missing_from_archive(fake, tmp_path):
    archive, _ = fake
    with pytest.raises(ValueError, match="aspirin"):
        fetch_rmd17(tmp_path / "o", molecules=["aspirin"], archive=archive, **SIZES)


def test_npz_missing_key(tmp_path):
    arrays = {mol: _molecule_arrays(z, seed=i) for i, (mol, z) in enumerate(FAKE.items())}
    del arrays["benzene"]["forces"]
    archive = _make_archive(tmp_path / "bad.tar.bz2", arrays)
    with pytest.raises(ValueError) as err:
        fetch_rmd17(tmp_path / "o", molecules=["ethanol", "benzene"], archive=archive, **SIZES)
    assert "'forces'" in str(err.value) and "rmd17_benzene.npz" in str(err.value)
    # checked before anything is written: no split of the good molecule either
    assert not list((tmp_path / "o").rglob("*.xyz"))


def test_npz_with_pickled_objects_is_refused_by_name(tmp_path):
    """An object array in a member is never unpickled; the error names the archive member and the
    array (it was numpy's text, which invites loading the file unsafely; found in review)."""
    arrays = {mol: _molecule_arrays(z, seed=i) for i, (mol, z) in enumerate(FAKE.items())}
    bad = np.empty(3, dtype=object)
    bad[:] = [1, "x", None]
    arrays["benzene"]["energies"] = bad
    archive = _make_archive(tmp_path / "bad.tar.bz2", arrays)
    with pytest.raises(ValueError, match=r"rmd17_benzene\.npz.*array 'energies' holds pickled objects, which are never"):
        fetch_rmd17(tmp_path / "o", molecules=["benzene"], archive=archive, **SIZES)


def test_too_few_frames(fake, tmp_path):
    archive, _ = fake
    with pytest.raises(ValueError, match="'ethanol' has 12 frames"):
        fetch_rmd17(tmp_path / "o", molecules=["ethanol"], archive=archive, n_train=10, n_valid=2, n_test=1)


def test_bad_url(tmp_path):
    url = (tmp_path / "nowhere" / "rmd17.tar.bz2").as_uri()
    out = tmp_path / "o"
    with pytest.raises(ConnectionError) as err:
        fetch_rmd17(out, molecules=["ethanol"], url=url, **SIZES)
    assert url in str(err.value) and "--archive" in str(err.value)
    assert not out.exists()  # no partial download, and not the directory the call created, left behind


def test_url_not_a_tar(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html>rate limited</html>")
    out = tmp_path / "o"
    with pytest.raises(ConnectionError, match="not a tar archive"):
        fetch_rmd17(out, molecules=["ethanol"], url=page.as_uri(), **SIZES)
    assert not out.exists()


def test_missing_archive_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar.bz2"):
        fetch_rmd17(tmp_path / "o", archive=tmp_path / "nope.tar.bz2")


@pytest.mark.parametrize("member", ["../evil", "rmd17/../../evil", "ABSOLUTE"])
def test_unsafe_member_rejected(tmp_path, member):
    arrays = {"ethanol": _molecule_arrays(FAKE["ethanol"], seed=0)}
    (tmp_path / "a" / "b").mkdir(parents=True)
    if member == "ABSOLUTE":
        member = str(tmp_path / "evil")
    archive = _make_archive(tmp_path / "evil.tar.bz2", arrays, extra_members=[(member, b"x")])
    with tarfile.open(archive) as tar:
        assert member in tar.getnames()
    out = tmp_path / "a" / "b" / "o"
    with pytest.raises(ValueError, match="refusing archive") as err:
        fetch_rmd17(out, molecules=["ethanol"], archive=archive, **SIZES)
    assert repr(member) in str(err.value)
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
    assert not list(out.rglob("*.xyz"))


def test_output_dir_is_a_file(fake, tmp_path):
    archive, _ = fake
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="output directory"):
        fetch_rmd17(blocker / "o", archive=archive, **SIZES)


def test_output_dir_not_writable(fake, tmp_path, monkeypatch):
    archive, _ = fake
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: make the write probe fail instead
            import mmea_kernels.app.rmd17 as mod

            def mkstemp(*a, **k):
                raise PermissionError(13, "Permission denied", str(k.get("dir")))

            monkeypatch.setattr(mod.tempfile, "mkstemp", mkstemp)
        with pytest.raises(PermissionError, match=r"ro is not writable"):
            fetch_rmd17(ro, archive=archive, **SIZES)
    finally:
        ro.chmod(0o700)


def test_python_without_extraction_filters(fake, tmp_path, monkeypatch):
    """Pythons before 3.11.4 have no tarfile.data_filter: the npz files are copied out by hand."""
    archive, arrays = fake
    monkeypatch.delattr(tarfile, "data_filter")
    res = fetch_rmd17(tmp_path / "o", molecules=["ethanol"], archive=archive, **SIZES)
    _check_outputs(tmp_path / "o", arrays, res, ["ethanol"])


def test_cli_data_rmd17(fake, tmp_path, capsys):
    from mmea_kernels.app.cli import main

    out = tmp_path / "cli"
    assert main(["data", "rmd17", "--out", str(out), "--archive", str(fake[0]), "--molecules", "ethanol",
                 "--n-train", "4", "--n-valid", "3", "--n-test", "5"]) == 0
    assert "ethanol: 4 train / 3 valid / 5 test" in capsys.readouterr().out
    assert (out / "ethanol" / "test.xyz").is_file()
    assert main(["data", "rmd17", "--out", str(out), "--archive", str(fake[0]), "--molecules", "ethanol",
                 "--n-train", "4", "--n-valid", "3", "--n-test", "5"]) == 2
    assert "overwrite" in capsys.readouterr().err
