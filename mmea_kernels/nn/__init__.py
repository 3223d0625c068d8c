"""User-facing adapter layers."""
from .base import AdapterLinear, is_equivariant_linear
from .elora import ELoRALinear
from .fused_gate import FusedGate, replace_gates, restore_gates
from .mmea import MMEALinear

ADAPTERS = {"mmea": MMEALinear, "elora": ELoRALinear}

__all__ = ["AdapterLinear", "MMEALinear", "ELoRALinear", "ADAPTERS", "is_equivariant_linear",
           "FusedGate", "replace_gates", "restore_gates"]
