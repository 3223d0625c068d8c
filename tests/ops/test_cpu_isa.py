"""Every per-ISA clone of the C++ kernels (csrc/isa.h: baseline, AVX2 and AVX-512 builds of the
FusedGate and gate-net activation loops, the fused linear's mul_ir transposes and the per-row
seg_dot) against the references. The default run of the suite covers the CPU's widest ISA; here
the C++ kernel tests (tests/ops/test_gate_net.py, the cpp cases of tests/nn/test_fused_gate.py and
tests/ops/test_fused_gate_dbwd.py, tests/ops/test_cpp_gated_linear.py, tests/ops/test_cpp_backend.py)
run again in a subprocess with ``MMEA_CPU_ISA`` capping the ISA at each narrower level the CPU has. A bad ``MMEA_CPU_ISA`` fails
the extension's import with the variable's name, and the cpp backend reports it."""
import os
import subprocess
import sys

import pytest

from mmea_kernels.ops import backend_status

from helpers import REPO

_OK, _WHY = backend_status("cpp", "cpu")
if not _OK:
    pytest.skip(_WHY, allow_module_level=True)

LEVELS = ["base", "avx2", "avx512"]
KERNEL_TESTS = ["tests/ops/test_gate_net.py", "tests/nn/test_fused_gate.py", "tests/ops/test_fused_gate_dbwd.py",
                "tests/ops/test_cpp_gated_linear.py", "tests/ops/test_cpp_backend.py"]


def _run(code: str, isa: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, MMEA_CPU_ISA=isa, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _cpu_level() -> str:
    """The CPU's widest level (MMEA_CPU_ISA unset in the child, whatever this process has)."""
    proc = _run("import mmea_kernels._C as C; print(C.CPU_ISA)", "")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.parametrize("isa", LEVELS[:-1])
def test_kernel_tests_pass_on_each_narrower_isa(isa):
    own = _cpu_level()
    if LEVELS.index(isa) >= LEVELS.index(own):
        pytest.skip(f"this CPU's widest level is {own}: the suite's default run covers it")
    # the cap takes effect (the clones of that level run, not the CPU's widest)
    proc = _run("import mmea_kernels._C as C; print(C.CPU_ISA)", isa)
    assert proc.returncode == 0 and proc.stdout.strip() == isa, (proc.stdout, proc.stderr[-2000:])
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', '-p', 'no:xdist', "
            f"'-k', '(gate_net or cpp) and not thread_count', *{KERNEL_TESTS!r}]))")
    proc = _run(code, isa, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def test_bad_isa_value_is_named():
    proc = _run("from mmea_kernels.ops import backend_status; print(backend_status('cpp', 'cpu'))", "sse9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(False," in proc.stdout and "MMEA_CPU_ISA=sse9" in proc.stdout and "avx512" in proc.stdout, proc.stdout
