"""mmea_kernels: magnitude-modulated equivariant adapters (MMEA) with fused gate kernels.

Install with torch pinned in the same command (see scripts/install.sh); the C++/CUDA
extensions of csrc/ are optional and never break installation.
"""
from setuptools import find_packages, setup

setup(
    name="mmea_kernels",
    version="0.1.0",
    description="Fast, exactly equivariant magnitude-modulated adapters (MMEA) for e3nn/MACE potentials",
    packages=find_packages(include=["mmea_kernels", "mmea_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.2",  # pin the build in the same pip command (scripts/install.sh) to keep a CPU wheel
        "e3nn>=0.5,<0.7",
        "numpy",
        "ase>=3.22",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # mace-torch itself is installed with --no-deps (it pins e3nn==0.4.4, see README);
        # these are the runtime dependencies it imports.
        "mace": ["torch-ema", "prettytable", "matscipy", "h5py", "torchmetrics", "python-hostlist",
                 "configargparse", "GitPython", "pyYAML", "tqdm", "lmdb", "orjson", "pandas", "matplotlib"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "triton==3.7.1",
                 "cuequivariance==0.13.0"],
    },
    entry_points={"console_scripts": ["mmea-kernels=mmea_kernels.cli:main"]},
)
