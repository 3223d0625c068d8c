#!/usr/bin/env bash
# Installs mmea_kernels with its test, MACE, cuEquivariance (CPU) and SevenNet dependencies into the
# current Python environment.
# torch is pinned in the same pip command, so no dependency can pull another torch. The pin fixes
# the version, not the build: from PyPI alone torch 2.13.0 is the CUDA build (a 527 MB wheel plus
# several GB of nvidia-* packages). TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU
# build from PyTorch's index instead (an extra index: everything else still comes from PyPI or the
# machine's configured wheels); the development VM's pip config serves the CPU wheel locally.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MACE_VERSION=${MACE_VERSION:-0.3.16}
INDEX=()
if [ -n "${TORCH_INDEX:-}" ]; then INDEX=(--extra-index-url "$TORCH_INDEX"); fi
# triton (a test dependency): the release paired with this torch, in the same pip command (a CUDA
# torch pins its own, e.g. 2.14.1 needs triton~=3.8.0; a CPU torch pins none). TRITON_VERSION overrides.
case "$TORCH_VERSION" in
  2.11.*) TRITON_DEFAULT=3.6.0 ;; 2.13.*) TRITON_DEFAULT=3.7.1 ;; 2.14.*) TRITON_DEFAULT=3.8.0 ;; *) TRITON_DEFAULT= ;;
esac
TRITON_VERSION=${TRITON_VERSION:-$TRITON_DEFAULT}
TRITON=()
if [ -n "$TRITON_VERSION" ]; then TRITON=("triton==${TRITON_VERSION}"); fi
# The package is built without build isolation so that its optional C++ extension
# (mmea_kernels._C, see setup.py) is compiled against this pinned torch, which is installed first.
$PY -m pip install -q --disable-pip-version-check "${INDEX[@]}" "torch==${TORCH_VERSION}" "setuptools>=64" wheel
$PY -m pip install -q --disable-pip-version-check "${INDEX[@]}" --no-build-isolation "torch==${TORCH_VERSION}" \
  "${TRITON[@]}" -e ".[test,mace,cueq,sevenn,nequip]"
# mace-torch pins e3nn==0.4.4, which does not import under torch>=2.6 without a global
# weights_only override; it runs fine with e3nn 0.6, so it is installed without its pins.
$PY -m pip install -q --disable-pip-version-check --no-deps "mace-torch==${MACE_VERSION}"
$PY -c "import torch, e3nn, mace, sevenn, nequip, cuequivariance_torch, mmea_kernels; print('installed: torch', torch.__version__, '| e3nn', e3nn.__version__, '| sevenn', sevenn.__version__, '| nequip', nequip.__version__, '| cuequivariance_torch', cuequivariance_torch.__version__, '| mmea_kernels', mmea_kernels.__version__)"
$PY -c "from mmea_kernels.ops import backend_status; ok, why = backend_status('cpp', 'cpu'); print('C++ extension (cpp backend):', 'built' if ok else 'not available: ' + why)"
