"""User-facing layers: the adapters (MMEALinear, ELoRALinear on the view of their base layer in
``base``), their TorchScript forms (``scriptable``), FusedGate and the gate swap, and
``split_tp_slices`` (a faster backward for e3nn's generated tensor-product / linear code)."""
from .base import AdapterLinear, is_equivariant_linear
from .elora import ELoRALinear
from .fused_gate import FusedGate
from .gate_swap import GateSwapReport, replace_gates, restore_gates
from .mmea import MMEALinear
from .export_forms import aten_forms, export_forms
from .scriptable import restore_eager_forms
from .tp_slices import split_tp_slices

ADAPTERS = {"mmea": MMEALinear, "elora": ELoRALinear}

__all__ = ["AdapterLinear", "MMEALinear", "ELoRALinear", "ADAPTERS", "is_equivariant_linear",
           "FusedGate", "GateSwapReport", "replace_gates", "restore_gates", "split_tp_slices", "aten_forms",
           "export_forms", "restore_eager_forms"]
