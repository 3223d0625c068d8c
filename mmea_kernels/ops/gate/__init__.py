"""The gate primitives ``gate_mul`` and ``seg_dot``: ``function`` (the autograd-closed entry
points, backend dispatch), ``reference`` (pure PyTorch), ``triton`` (GPU kernels, CPU through the
interpreter), ``cpp`` (the compiled extension: OpenMP on CPU, CUDA kernels where built)."""
from .function import gate_mul, layout_key, seg_dot

__all__ = ["gate_mul", "seg_dot", "layout_key"]
