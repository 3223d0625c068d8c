"""C++ backend: the gate primitives as compiled kernels of the optional extension
``mmea_kernels._C`` (csrc/gate_ops.cpp: OpenMP CPU kernels; csrc/gate_ops_cuda.cu: CUDA kernels,
compiled only with a CUDA build of torch and nvcc).

Kernel-level functions (no autograd) with the same interface as
:mod:`mmea_kernels.ops.gate.reference`; they call ``torch.ops.mmea_kernels_ext.gate_mul`` and
``torch.ops.mmea_kernels_ext.seg_dot``, which have fake (meta) implementations registered here so
that ``torch.compile`` can trace them.

The extension is built by ``pip install --no-build-isolation -e .`` (see setup.py); when it is
missing or fails to import, :func:`available` says why and ``auto`` backend selection falls back
to the torch backend.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..tables import LayoutTables

name = "cpp"

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(or `python setup.py build_ext --inplace`) with a C++ compiler and the torch you run with"
)


def _registered_elsewhere() -> bool:
    """Whether another library in this process registered the kernels' ops (LAMMPS' ``mmea_ops.so``,
    which ``pair_style mace`` loads for ``--kernels cpp`` files and the e3gnn pair styles when
    created): loading ``_C`` too would register them twice, which aborts the process."""
    import sys

    if __name__.rsplit(".", 3)[0] + "._C" in sys.modules:  # ours, imported already: nothing to guard
        return False
    try:
        torch.ops.mmea_kernels_ext.gate_mul
    except (AttributeError, RuntimeError):
        return False
    return True


class _RegisteredElsewhere(RuntimeError):
    pass


def _import_ext():
    """(module, None) or (None, the import error)."""
    if _registered_elsewhere():
        return None, _RegisteredElsewhere(
            "this package's kernels were registered in this process by another library (LAMMPS' mmea_ops.so, "
            "loaded by pair_style mace or e3gnn?); loading mmea_kernels._C as well would abort "
            "the process, so the cpp backend is off here (the scripted files still run on those kernels)")
    try:
        from ... import _C  # noqa: WPS433 - optional compiled extension
    except Exception as exc:  # ImportError, or OSError/undefined symbols for a stale build
        return None, exc
    return _C, None


_EXT, _EXT_ERROR = _import_ext()


def _register_fakes() -> None:
    """Shape-only implementations of the extension ops for torch.compile / FakeTensor tracing."""

    def gate_mul_fake(x, gates, gate_of_column, keep_ungated):
        return x.new_empty(x.shape)

    def seg_dot_fake(a, b, gate_of_column, gate_cols, shared):
        g = gate_cols.shape[0]
        return a.new_empty((g,)) if shared else a.new_empty((a.shape[0], g))

    register_fakes((("mmea_kernels_ext::gate_mul", gate_mul_fake), ("mmea_kernels_ext::seg_dot", seg_dot_fake)))


def register_fakes(fakes) -> None:
    """``torch.library.register_fake`` for each (qualified op name, fake), once per process."""
    for qualname, fn in fakes:
        try:
            torch.library.register_fake(qualname)(fn)
        except RuntimeError as exc:  # this module was reloaded: the fake is registered already
            if "already" not in str(exc):
                raise


if _EXT is not None:
    _register_fakes()


def available(device: torch.device) -> Tuple[bool, str]:
    if isinstance(_EXT_ERROR, _RegisteredElsewhere):
        return False, str(_EXT_ERROR)
    if _EXT is None:
        return False, (
            f"the C++ extension mmea_kernels._C is not built or failed to import "
            f"({type(_EXT_ERROR).__name__}: {_EXT_ERROR}); {BUILD_HINT}"
        )
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if getattr(_EXT, "WITH_CUDA", 0):
            return True, ""
        return False, (
            "mmea_kernels._C was built without its CUDA kernels (they need a CUDA build of torch and "
            f"nvcc at build time; this torch has CUDA {torch.version.cuda}); {BUILD_HINT}"
        )
    return False, f"the cpp backend runs on cpu (and cuda) tensors, not {device.type}"


# the dtypes of the fused CPU kernels (gated linear, gate net)
CPP_DTYPES = (torch.float32, torch.float64)


def load_kernels() -> None:
    """Load this package's C++ kernels (``mmea_kernels._C``), which registers their ops
    (``torch.ops.mmea_kernels_ext.*``): needed before ``torch.jit.load`` of a file exported with
    ``--kernels cpp``. Raises ``RuntimeError`` with the reason when the extension is not built."""
    if hasattr(torch.ops.mmea_kernels_ext, "mmea_linear"):  # loaded already (here, or LAMMPS' mmea_ops.so)
        return
    ok, why = ext_op_status("mmea_linear", "scripted fused adapter", "csrc/adapter_op.cpp")
    if not ok:
        raise RuntimeError(f"cannot load the C++ kernels: {why}")


def ext_op_status(op: str, what: str, source: str) -> Tuple[bool, str]:
    """(available, reason) of the extension's CPU op ``op`` (``what``, compiled from ``source``): the
    extension loads and was built with that op."""
    ok, why = available(torch.device("cpu"))
    if ok and not hasattr(torch.ops.mmea_kernels_ext, op):
        return False, f"mmea_kernels._C predates the {what} kernels ({source}): rebuild it"
    return ok, why


def gate_mul(x: torch.Tensor, gates: torch.Tensor, t: LayoutTables, keep_ungated: bool) -> torch.Tensor:
    """``y[n,c] = x[n,c]·gates[n, gate(c)]``; 0e columns copied (keep_ungated) or zeroed."""
    return torch.ops.mmea_kernels_ext.gate_mul.default(x, gates, t.gate_of_column, bool(keep_ungated))


def seg_dot(a: torch.Tensor, b: torch.Tensor, t: LayoutTables, shared: bool) -> torch.Tensor:
    """``out[n,j] = Σ_{c in gate j} a[n,c]·b[n,c]`` (also summed over n when ``shared``)."""
    return torch.ops.mmea_kernels_ext.seg_dot.default(a, b, t.gate_of_column, t.gate_cols_padded, bool(shared))
