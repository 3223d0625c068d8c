"""Fused equivariant linear + MMEA gate, ``y = G ⊙ (Linear_W(x) + bias) + additive``.

``reference.py`` (plain torch, the numerical reference, and the argument checks),
``triton_kernels.py`` (Triton kernels and launchers), ``cpp_kernels.py`` (the C++ CPU kernels of
the extension), ``function.py`` (the closed autograd over either kernel backend and
:func:`gated_linear`), ``adapter.py`` (the whole MMEA adapter as one autograd node, and
:func:`split_scalars`)."""
from ...linear_spec import LinearSpec
from .cpp_kernels import cpp_status
from .adapter import mmea_adapter_fused, split_scalars
from .function import _core, gated_linear, kernel_backend
from .reference import gated_linear_reference
from .triton_kernels import fp32_precision


def triton_status(device):
    """(available, reason) of the triton backend for tensors on ``device`` (the conditions of the
    triton gate backend: both share one triton import and interpreter flag)."""
    from ..gate.triton import available
    return available(device)


__all__ = ["gated_linear", "gated_linear_reference", "LinearSpec", "triton_status", "cpp_status", "kernel_backend",
           "fp32_precision", "split_scalars", "mmea_adapter_fused", "_core"]
