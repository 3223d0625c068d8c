#!/usr/bin/env bash
# The one-call device check for a lent CUDA machine (<= 8 minutes on an H200). It installs nothing
# from the network: the wheels the machine lacks travel in .whl/ (made here by
# scripts/device_wheels.sh; the device tool's `carry: [".whl"]`), the extension is built in place.
#
#   run(command="bash bench/gpu/device_check.sh", carry=[".whl"], timeout_s=540)
#
# Knobs (environment): TEST_LIMIT, BENCH_LIMIT (seconds), BENCH_SIZES (e.g. 2000,32000), BENCH_ARGS
# (e.g. "--sweep --no-cuet"),
# MODEL_DTYPES (e.g. "float32").
#
# Writes to $OUT (default bench/results/device): device_check.log (versions, build, the CUDA
# tests, the model-level check), kernels-sm90.txt (bench/gpu/kernel_report.py), the benchmark's
# .jsonl/.json/.txt (bench/gpu/bench_gpu.py, with the driver's registers and spills of every
# Triton kernel it ran) and model-overhead-gpu-<date>.json (paired ratios, then a profile of each
# model: host/wall/device time and kernel counts, fused and MMEA_FUSED_LINEAR=0; the paired ratio
# also with MMEA_FUSED_LINEAR=auto, whose rows list each layer's choice and timings). Each step
# has its own time limit and a failure does not stop the next step. The whole-model steps (the
# open <= 3 % target) run right after the tests, before the kernel report and the benchmark, so a run
# cut short by the device tool's limit still measures them.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import torch, triton, e3nn
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| e3nn", e3nn.__version__)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
for m in ("cuequivariance_torch", "mace", "ase"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "unavailable:", exc)
PY

step "build the extension in place (CUDA kernels)"
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 MMEA_FRESH_BUILD=1 timeout 300 python3 setup.py -q build_ext --inplace 2>&1 | tail -20
python3 -c "import mmea_kernels._C as C; print('WITH_CUDA =', C.WITH_CUDA); assert C.WITH_CUDA"

step "CUDA tests (every kernel against the float64 / torch references, gradcheck, gradgradcheck)"
MMEA_TEST_CUDA=1 timeout ${TEST_LIMIT:-200} python3 -m pytest -q -p no:cacheprovider -k cuda -rs --timeout 120 \
  tests/ops/test_gate_ops.py tests/ops/test_triton_backend.py tests/ops/test_gated_linear.py \
  tests/ops/test_cpp_backend.py tests/ops/test_gate_net_triton.py tests/nn/test_modules.py tests/nn/test_path_choice.py \
  $(ls tests/nn/test_fused_gate.py 2>/dev/null) 2>&1 | tail -40

step "whole model (MACE-OFF23-medium architecture), energy+forces and a training step"
for dt in ${MODEL_DTYPES:-float32 float64}; do
  timeout 60 python3 bench/model_overhead.py --device cuda --frames 64 --rounds 40 --dtype $dt --out "$OUT" 2>&1 | tail -3
  if [ "$dt" = float32 ]; then
    echo "--- MMEA_FUSED_LINEAR=auto (each MMEALinear times its fused and unfused paths at its first size, keeps the faster)"
    MMEA_FUSED_LINEAR=auto timeout 60 python3 bench/model_overhead.py --device cuda --frames 64 --rounds 40 --dtype $dt \
      --out "$OUT" 2>&1 | tail -3
  fi
done

step "whole model: where the time goes (host vs device, kernel counts; torch.profiler), fused vs unfused MMEA"
timeout 90 python3 bench/model_overhead.py --device cuda --frames 64 --rounds 20 --modes inference --profile 5 \
  --out "$OUT" 2>&1 | grep -v USDT | tail -20
echo "--- MMEA_FUSED_LINEAR=0 (every MMEALinear: base layer, then the gate kernels)"
MMEA_FUSED_LINEAR=0 timeout 90 python3 bench/model_overhead.py --device cuda --frames 64 --rounds 20 --modes inference \
  --profile 5 --out "$OUT" 2>&1 | grep -v USDT | tail -20

step "registers and spills of the Triton kernels (sm_90, ptxas -v)"
timeout 120 python3 bench/gpu/kernel_report.py --out "$OUT/kernels-sm90.txt" 2>&1 | tail -40

step "benchmark"
timeout ${BENCH_LIMIT:-220} python3 bench/gpu/bench_gpu.py --out "$OUT" --sizes "${BENCH_SIZES:-2000,8000,32000}" ${BENCH_ARGS:-} 2>&1 | tail -150

step "done"
