"""The MMEA gate network ``(add, gates) = split(W_up SiLU(W_down x0 + b_down) + b_up)``, ``gates = φ(·)``,
as one fused op (C++ on CPU: csrc/gate_net.cpp; Triton on GPU: triton.py) with a closed autograd
(function.py)."""
from .function import PHI_CODES, gate_net, gate_net_cpp_status, gate_net_kernels, gate_net_reference, gate_net_status

__all__ = ["gate_net", "gate_net_kernels", "gate_net_reference", "gate_net_cpp_status", "gate_net_status", "PHI_CODES"]
