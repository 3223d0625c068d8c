#!/usr/bin/env bash
# Makes .whl/ (ignored by git through .git/info/exclude): the wheels that the GPU device machine
# lacks (it cannot fetch anything), for Python 3.12 on x86-64, within the device tool's 64 MiB
# limit. bench/gpu/device_check.sh installs them with --no-index into /tmp/site.
# Not carried: cuequivariance-ops-torch-cu13 and cuequivariance-ops-cu13 (73 MB together), so
# cuet.Linear runs its plain PyTorch path there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
# sevenn (43 MB: the wheel carries SevenNet-0's weights) and braceexpand, its one need the device lacks:
# the device check times SevenNet-0 with e3nn's and the fused gates (bench/gate_speed.py). All of .whl
# with the working tree stays under the device tool's 64 MiB (about 52 MB).
for pkg in cuequivariance==0.13.0 cuequivariance-torch==0.13.0 ase==3.26.0 mace-torch==0.3.16 torch-ema==0.3 \
           matscipy==1.3.1 prettytable==3.18.0 wcwidth==0.9.4 lmdb==3.0.0 orjson==3.11.4 sevenn==0.13.0 braceexpand==0.1.7; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
du -sh .whl
