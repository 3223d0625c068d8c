"""The MMEA gate network ``(add, gates) = split(W_up SiLU(W_down x0 + b_down) + b_up)``, ``gates = φ(·)``,
as one fused CPU op (csrc/gate_net.cpp) with a closed autograd (function.py)."""
from .function import PHI_CODES, gate_net, gate_net_cpp_status, gate_net_reference

__all__ = ["gate_net", "gate_net_reference", "gate_net_cpp_status", "PHI_CODES"]
