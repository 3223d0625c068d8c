"""mmea_kernels: magnitude-modulated equivariant adapters (MMEA) with fused gate kernels.

Install with torch pinned and without build isolation (see scripts/install.sh), so that the
optional extension ``mmea_kernels._C`` is compiled against the torch that will run it:

    pip install --no-build-isolation -e .

The extension holds the C++/OpenMP CPU kernels of csrc/gate_ops.cpp, plus the CUDA kernels of
csrc/gate_ops_cuda.cu when torch is a CUDA build and nvcc is found (for the visible GPU, or
TORCH_CUDA_ARCH_LIST, or 8.0 and 9.0+PTX when neither is there). When the CUDA build fails, the
CPU-only extension is built instead (with a warning). It is optional: without a compiler, without
torch at build time, with ``MMEA_NO_EXT=1``, or when compilation fails, the package installs
without it (with a warning) and the ``cpp`` backend reports itself unavailable.
"""
import os
import sys
import traceback

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _setuptools_build_py

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "mmea_kernels._C"
HOW_TO_BUILD = "pip install --no-build-isolation -e ."
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset


def _warn(msg: str) -> None:
    bar = "*" * 78
    print(f"\n{bar}\nWARNING (mmea_kernels): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _make_build_ext(base, cpu_fallback=None):
    """A build_ext whose failure is a warning: the package then installs without the extension.
    ``cpu_fallback``: for a CUDA build, a function giving the CPU-only extension, which is built
    instead when the CUDA build fails (the C++ CPU kernels are not lost to a CUDA toolchain problem)."""

    class OptionalBuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            # A persistent build directory inside the project (ignored by git) lets ninja rebuild
            # only what changed when pip reinstalls the package (pip uses a fresh temp dir).
            if not _env_flag("MMEA_FRESH_BUILD"):
                self.build_temp = os.path.join(HERE, "build", "mmea_ext_temp")

        def run(self):
            if not self.extensions:
                return
            try:
                super().run()
            except BaseException as exc:  # noqa: BLE001 - compiler errors come in many types
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._skip(exc)

        def build_extensions(self):
            try:
                super().build_extensions()
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                if cpu_fallback is None or getattr(self, "_cpu_only", False):
                    return self._skip(exc)
                traceback.print_exc()
                _warn(
                    f"building {EXT_NAME} with its CUDA kernels failed ({type(exc).__name__}: {exc}).\n"
                    "Building it with the C++ CPU kernels only: the CUDA gate ops then run on the triton "
                    "(or torch) backend.\nFix the error above (nvcc, TORCH_CUDA_ARCH_LIST) and rebuild "
                    f"with `{HOW_TO_BUILD}` for the CUDA kernels, or set MMEA_NO_CUDA_EXT=1 to skip them."
                )
                self._cpu_only = True
                self.build_temp = self.build_temp.rstrip(os.sep) + "_cpu"  # no object built with CUDA flags
                self.extensions = [self._prepared(cpu_fallback(), old) for old in self.extensions]
                self.build_extensions()

        def _prepared(self, ext, like):
            """``ext`` with the names setuptools' finalize_options gave ``like`` (same module name)."""
            for attr in ("_full_name", "_links_to_dynamic", "_needs_stub", "_file_name"):
                if hasattr(like, attr):
                    setattr(ext, attr, getattr(like, attr))
            for key, val in list(self.ext_map.items()):
                if val is like:
                    self.ext_map[key] = ext
            return ext

        def _skip(self, exc):
            traceback.print_exc()
            _warn(
                f"building the C++/CUDA extension {EXT_NAME} failed ({type(exc).__name__}: {exc}).\n"
                "mmea_kernels is installed without it: the 'cpp' backend is unavailable and the torch "
                "(and triton) backends are used instead.\nFix the error above and rebuild with "
                f"`{HOW_TO_BUILD}` (or `python setup.py build_ext --inplace`)."
            )
            # Nothing to copy into the source tree or to put into the (editable) wheel.
            self.extensions = []

    return OptionalBuildExt


def _cuda_home(cpp_extension, torch_cuda: str):
    """torch's CUDA_HOME, or the toolkit itself when torch guessed one that holds no CUDA runtime
    header: without CUDA_HOME set torch takes the directory above the first ``nvcc`` on PATH, and an
    ``nvcc`` wrapper script in /usr/local/bin made it /usr/local, where the link then failed (``cannot
    find -lcudart``, seen with torch 2.14.1). A CUDA_HOME the user set is kept, as is a toolkit of
    another major CUDA version than torch's."""
    import glob
    import json

    home = cpp_extension.CUDA_HOME

    def toolkit(path):
        return bool(path) and os.path.exists(os.path.join(path, "bin", "nvcc")) and bool(
            glob.glob(os.path.join(path, "include", "cuda_runtime_api.h"))
            + glob.glob(os.path.join(path, "targets", "*", "include", "cuda_runtime_api.h")))

    def major(path):
        try:
            with open(os.path.join(path, "version.json")) as f:
                return str(json.load(f)["cuda"]["version"]).split(".")[0]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    if home is None or toolkit(home) or os.environ.get("CUDA_HOME"):
        return home
    want = str(torch_cuda).split(".")[0]
    for cand in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if toolkit(cand) and os.path.realpath(cand) != os.path.realpath(home) and major(cand) in (None, want):
            print(f"mmea_kernels: CUDA_HOME {home} (from the nvcc on PATH) holds no CUDA runtime headers; using "
                  f"the toolkit in {cand} (set CUDA_HOME to choose)", file=sys.stderr)
            cpp_extension.CUDA_HOME = cand
            return cand
    return home


def _extensions():
    """(ext_modules, build_ext class)."""
    if _env_flag("MMEA_NO_EXT"):
        print("mmea_kernels: MMEA_NO_EXT is set, not building the C++/CUDA extension", file=sys.stderr)
        return [], _setuptools_build_ext
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001
        _warn(
            f"torch cannot be imported at build time ({exc}), so the C++/CUDA extension {EXT_NAME} is "
            "not built. Install torch first, then this package without build isolation: "
            f"`{HOW_TO_BUILD}` (pip's build isolation would build against another torch)."
        )
        return [], _setuptools_build_ext

    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    sources = ["csrc/gate_ops.cpp", "csrc/fused_gate.cpp", "csrc/gated_linear.cpp", "csrc/gate_net.cpp",
               "csrc/adapter_op.cpp"]
    nvcc = None
    if torch.version.cuda is not None and _cuda_home(cpp_extension, torch.version.cuda) is not None:
        cand = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        if os.path.exists(cand):
            nvcc = cand

    def cpu_extension():
        return cpp_extension.CppExtension(EXT_NAME, sources, extra_compile_args={"cxx": cxx_flags},
                                          extra_link_args=link_flags)

    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    if nvcc is not None and not _env_flag("MMEA_NO_CUDA_EXT"):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to read the architecture from (a login node, a container build): torch would
            # fail on an empty list; build for A100 and H100/H200, with PTX for newer cards
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(f"mmea_kernels: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CUDA kernels "
                  f"for {DEFAULT_CUDA_ARCHS} (set TORCH_CUDA_ARCH_LIST to choose)", file=sys.stderr)
        print(f"mmea_kernels: building {EXT_NAME} with CUDA kernels (nvcc: {nvcc}, torch CUDA "
              f"{torch.version.cuda})", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            sources + ["csrc/gate_ops_cuda.cu"],
            define_macros=[("MMEA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        why = ("torch is a CPU build" if torch.version.cuda is None
               else "no nvcc found (set CUDA_HOME)" if nvcc is None else "MMEA_NO_CUDA_EXT is set")
        print(f"mmea_kernels: building {EXT_NAME} with the C++ CPU kernels only ({why})", file=sys.stderr)
        return [cpu_extension()], _make_build_ext(build)
    return [ext], _make_build_ext(build, cpu_fallback=cpu_extension)


EXT_MODULES, BUILD_EXT = _extensions()
CSRC_COPY = os.path.join("mmea_kernels", "integrations", "lammps_plugin", "csrc")


class BuildPyWithKernelSources(_setuptools_build_py):
    """Also copies csrc/'s C++ sources into the built package (``CSRC_COPY``), so that an installed
    wheel's ``mmea-kernels lammps-build`` compiles the LAMMPS plugins' mmea_ops.so as a checkout does."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "csrc")
        if self.editable_mode or not os.path.isdir(src):  # an editable install's build.sh finds csrc/ itself
            return
        dest = os.path.join(self.build_lib, CSRC_COPY)
        self.mkpath(dest)
        for name in sorted(os.listdir(src)):
            if name.endswith((".cpp", ".h")):
                self.copy_file(os.path.join(src, name), os.path.join(dest, name))


setup(
    name="mmea_kernels",
    version="0.1.0",
    description="Fast, exactly equivariant magnitude-modulated adapters (MMEA) for e3nn/MACE potentials",
    packages=find_packages(include=["mmea_kernels", "mmea_kernels.*"]),
    python_requires=">=3.10",
    # the project's own pretrained model, its log and the small DFT set (scripts/pretrain.py, scripts/data/)
    package_data={"mmea_kernels": ["assets/*.pt", "assets/*.log", "assets/*/*.xyz", "assets/*/*.md",
                                   "integrations/lammps_plugin/*"]},
    install_requires=[
        "torch>=2.6",  # weights_only=True is a safe unpickler from 2.6 on (CVE-2025-32434); pin the build in the same pip command (scripts/install.sh) to keep a CPU wheel
        # e3nn 0.5.x runs its generated graphs as TorchScript (jit_script_fx), which this package's graph
        # rewrites, deep copies and torch.compile do not take (a review: 23 to 86 failing tests); 0.6 is eager
        "e3nn>=0.6,<0.7",
        "numpy",
        "ase>=3.22",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # only for regenerating the shipped data (scripts/data/): GFN2-xTB, PBE/def2-SVP, SMILES -> 3D
        "data": ["tblite", "pyscf", "rdkit"],
        # mace-torch itself is installed with --no-deps (it pins e3nn==0.4.4, see README);
        # these are the runtime dependencies it imports.
        "mace": ["torch-ema", "prettytable", "matscipy", "h5py", "torchmetrics", "python-hostlist",
                 "configargparse", "GitPython", "pyYAML", "tqdm", "lmdb", "orjson", "pandas", "matplotlib"],
        # triton: scripts/install.sh pins the release paired with the torch it installs (a CUDA torch pins
        # its own: torch 2.14.1 needs triton~=3.8.0, so a fixed pin here would make pip's resolution fail)
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6", "triton>=3.0",
                 "cuequivariance==0.13.0"],
        # cuEquivariance layers (pure Python; runs on CPU through its fallback). The CUDA ops package
        # (cuequivariance-ops-torch-cu12/13) is for GPU machines only: install it there yourself.
        "cueq": ["cuequivariance==0.13.0", "cuequivariance-torch==0.13.0"],
        # SevenNet (its wheel carries the pretrained SevenNet-0 weights); needs e3nn >= 0.5 (0.6 here), which
        # is what lets it share one environment with mace-torch installed --no-deps.
        "sevenn": ["sevenn==0.13.0"],
        # NequIP (Lightning/Hydra framework; e3nn>=0.6,<0.7 as here): mmea_kernels.integrations.nequip
        "nequip": ["nequip==0.19.1"],
    },
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": BUILD_EXT, "build_py": BuildPyWithKernelSources},
    entry_points={"console_scripts": ["mmea-kernels=mmea_kernels.app.cli:main"]},
)
