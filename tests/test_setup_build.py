"""setup.py's optional extension build: a failed CUDA build falls back to the CPU-only extension
(the C++ kernels are not lost to a CUDA toolchain problem), a failed CPU build installs without
the extension, and a CUDA build on a machine without a visible GPU gets an architecture list.

The build classes are exercised with a stand-in for torch's BuildExtension (no compiler runs);
setup.py is executed with ``setuptools.setup`` replaced, so nothing is installed."""
import runpy
import sys

import pytest
from setuptools import Extension

from helpers import REPO


def _setup_namespace(monkeypatch, **env):
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return runpy.run_path(str(REPO / "setup.py"))


class _FakeBuild:
    """torch's BuildExtension as far as OptionalBuildExt uses it: builds ``self.extensions`` and
    fails on any with CUDA sources (or on every one, with ``fail_all``)."""
    fail_all = False

    def __init__(self, exts):
        self.extensions = exts
        self.ext_map = {}
        for e in exts:
            e._full_name, e._file_name, e._needs_stub, e._links_to_dynamic = e.name, "_C.so", False, False
            self.ext_map[e.name] = self.ext_map[e.name.split(".")[-1]] = e
        self.build_temp = "/tmp/build/temp"
        self.built = []

    def build_extensions(self):
        for e in self.extensions:
            if self.fail_all or any(s.endswith(".cu") for s in e.sources):
                raise RuntimeError(f"ld: cannot find -lcudart (building {e.sources})")
        self.built.append((list(self.extensions), self.build_temp))


def _cuda_ext():
    return Extension("mmea_kernels._C", ["csrc/gate_ops.cpp", "csrc/gate_ops_cuda.cu"])


def _cpu_ext():
    return Extension("mmea_kernels._C", ["csrc/gate_ops.cpp"])


def test_failed_cuda_build_builds_the_cpu_extension(monkeypatch, capsys):
    ns = _setup_namespace(monkeypatch, MMEA_NO_EXT="1")
    cls = ns["_make_build_ext"](_FakeBuild, cpu_fallback=_cpu_ext)
    b = cls([_cuda_ext()])
    b.build_extensions()
    assert len(b.built) == 1, "the CPU-only extension was not built after the CUDA build failed"
    (exts, temp), = b.built
    assert [e.sources for e in exts] == [["csrc/gate_ops.cpp"]]
    assert temp == "/tmp/build/temp_cpu"  # objects compiled with CUDA flags are not reused
    e = exts[0]
    assert (e._full_name, e._file_name, e._needs_stub) == ("mmea_kernels._C", "_C.so", False)
    assert b.ext_map["mmea_kernels._C"] is e and b.ext_map["_C"] is e
    err = capsys.readouterr().err
    assert "with its CUDA kernels failed" in err and "cannot find -lcudart" in err
    assert "C++ CPU kernels only" in err and "MMEA_NO_CUDA_EXT" in err


def test_failed_cpu_build_installs_without_the_extension(monkeypatch, capsys):
    ns = _setup_namespace(monkeypatch, MMEA_NO_EXT="1")

    class AlwaysFails(_FakeBuild):
        fail_all = True

    for fallback in (None, _cpu_ext):  # a CPU build, and a CUDA build whose fallback fails as well
        b = ns["_make_build_ext"](AlwaysFails, cpu_fallback=fallback)([_cuda_ext() if fallback else _cpu_ext()])
        b.build_extensions()
        assert b.extensions == [] and b.built == []
        assert "is installed without it" in capsys.readouterr().err


def test_cuda_build_without_a_visible_gpu_gets_an_architecture_list(monkeypatch, tmp_path, capsys):
    """With a CUDA torch and nvcc but no GPU and no TORCH_CUDA_ARCH_LIST, torch's own flag code
    fails on an empty list (IndexError in _get_cuda_arch_flags, seen with torch 2.11.0+cu130):
    setup.py sets a default list and says so. (A CUDA torch is stood in for: torch.version.cuda,
    torch.cuda.is_available and CUDA_HOME with a bin/nvcc.)"""
    import os

    import torch
    from torch.utils import cpp_extension

    for part in ("bin/nvcc", "include/cuda_runtime_api.h"):
        (tmp_path / part).parent.mkdir(exist_ok=True)
        (tmp_path / part).write_text("")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    made = {}
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda name, sources, **kw: made.setdefault("cuda", sources))
    for var in ("TORCH_CUDA_ARCH_LIST", "MMEA_NO_EXT", "MMEA_NO_CUDA_EXT"):
        monkeypatch.delenv(var, raising=False)  # and restored (absent) after the test
    ns = _setup_namespace(monkeypatch)
    assert "csrc/gate_ops_cuda.cu" in made["cuda"]
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == ns["DEFAULT_CUDA_ARCHS"] == "8.0;9.0+PTX"
    assert "no GPU visible and TORCH_CUDA_ARCH_LIST unset" in capsys.readouterr().err
    # a list the user set is kept
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    _setup_namespace(monkeypatch)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_a_cuda_home_without_runtime_headers_is_replaced_by_the_toolkit(monkeypatch, tmp_path, capsys):
    """torch takes CUDA_HOME from the first nvcc on PATH; an nvcc wrapper script in /usr/local/bin
    made it /usr/local, where the link failed (cannot find -lcudart, torch 2.14.1 in a review):
    setup.py builds against the toolkit (CUDA_PATH, then /usr/local/cuda) and says so."""
    import torch
    from torch.utils import cpp_extension

    wrapper, toolkit = tmp_path / "usr-local", tmp_path / "cuda-13.0"
    for root, parts in ((wrapper, ["bin/nvcc"]), (toolkit, ["bin/nvcc", "include/cuda_runtime_api.h"])):
        for part in parts:
            (root / part).parent.mkdir(parents=True, exist_ok=True)
            (root / part).write_text("")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper))
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda name, sources, **kw: sources)
    for var in ("MMEA_NO_EXT", "MMEA_NO_CUDA_EXT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    _setup_namespace(monkeypatch, CUDA_PATH=str(toolkit))
    assert cpp_extension.CUDA_HOME == str(toolkit)
    err = capsys.readouterr().err
    assert f"CUDA_HOME {wrapper} (from the nvcc on PATH) holds no CUDA runtime headers; using the toolkit in " \
           f"{toolkit}" in err
    assert f"nvcc: {toolkit}/bin/nvcc" in err
    # a CUDA_HOME the user set is kept; so is torch's guess when the toolkit is of another major version
    for env, version in (({"CUDA_HOME": str(wrapper)}, None), ({}, "12.8")):
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper))
        if version:
            (toolkit / "version.json").write_text('{"cuda": {"version": "%s"}}' % version)
        _setup_namespace(monkeypatch, CUDA_PATH=str(toolkit), **env)
        if env:
            assert cpp_extension.CUDA_HOME == str(wrapper)
        else:  # (a /usr/local/cuda of torch's version, where the machine has one, may be taken instead)
            assert cpp_extension.CUDA_HOME != str(toolkit)
        monkeypatch.delenv("CUDA_HOME", raising=False)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_built_package_carries_the_kernel_sources_for_the_lammps_build(tmp_path):
    """``setup.py build_py`` (what a wheel is built from) copies csrc/'s C++ sources beside the LAMMPS
    build script, where an installed package's ``lammps-build`` finds them; the LAMMPS plugin's
    mmea_ops.so is compiled from exactly the files the extension is built from."""
    import os
    import subprocess

    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, MMEA_NO_EXT="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    copied = tmp_path / "mmea_kernels" / "integrations" / "lammps_plugin" / "csrc"
    want = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".h"))
    assert "adapter_op.cpp" in want and sorted(p.name for p in copied.iterdir()) == want
    for name in want:
        assert (copied / name).read_bytes() == (REPO / "csrc" / name).read_bytes(), name
    assert (tmp_path / "mmea_kernels" / "integrations" / "lammps_plugin" / "build.sh").is_file()
    # build.sh compiles every csrc/*.cpp into mmea_ops.so: the extension's C++ sources, all of them
    setup_text = (REPO / "setup.py").read_text()
    assert all(f'"csrc/{name}"' in setup_text for name in want if name.endswith(".cpp"))


def test_sdist_carries_every_kernel_source(tmp_path):
    """An sdist (``pip install mmea_kernels-*.tar.gz``, or what pip downloads when no wheel fits)
    builds the extension from csrc/: it must carry every source and header there (MANIFEST.in;
    setuptools alone packs only the .cpp files an extension names, not its headers or the .cu)."""
    import os
    import subprocess
    import tarfile

    # a fresh egg-info: setuptools would otherwise re-read the checkout's SOURCES.txt (an editable
    # install's), which lists whatever an earlier MANIFEST.in put there
    egg = tmp_path / "egg"
    egg.mkdir()
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg), "sdist", "-d",
                           str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, MMEA_NO_EXT="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (archive,) = tmp_path.glob("mmea_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name and m.isfile()}
        want = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".h", ".cu"))
        assert {"adapter_op.cpp", "checks.h", "gate_ops_cuda.cu"} <= set(want)
        for name in want:
            assert f"csrc/{name}" in packed, f"the sdist lacks csrc/{name}"
            assert tar.extractfile(packed[f"csrc/{name}"]).read() == (REPO / "csrc" / name).read_bytes(), name
        assert "scripts/install.sh" in packed and "setup.py" in packed
        assert not [n for n in packed if n.endswith((".so", ".o"))], "the sdist carries built objects"
