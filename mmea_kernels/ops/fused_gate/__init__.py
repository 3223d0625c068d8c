"""Fused equivariant gate (``mmea_kernels.nn.FusedGate``): spec, reference, C++/Triton kernels,
custom ops. One folder per op family: ``spec`` (what is computed, tables), ``reference`` (torch),
``triton`` (GPU kernels), ``function`` (custom ops, autograd, backend choice); the C++ kernels are
``csrc/fused_gate.cpp``."""
from .function import FUSED_GATE_BACKENDS, fused_gate, fused_gate_backend_status
from .spec import ACT_CODES, FusedGateSpec, activation_code, ssp

__all__ = ["fused_gate", "fused_gate_backend_status", "FUSED_GATE_BACKENDS", "FusedGateSpec", "ACT_CODES",
           "activation_code", "ssp"]
