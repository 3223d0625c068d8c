"""mmea_kernels: magnitude-modulated equivariant adapters (MMEA) for e3nn / MACE models, with
fused gate kernels and exact double backward."""
from ._compat import install as _install_aliases
from .integrations.cueq import convert_adapted_to_cueq, convert_adapted_to_e3nn
from .peft.inject import (adapter_state_dict, adapted_modules, disable_adapters, inject_adapters,
                     load_adapter_state_dict, merge_and_unload, report, unload)
from .layout import IrrepsLayout
from .nn import ELoRALinear, FusedGate, MMEALinear, replace_gates, restore_gates
from .ops import gate_mul, seg_dot

_install_aliases()  # old module paths (mmea_kernels.finetune, ...) stay importable

__version__ = "0.1.0"

__all__ = [
    "IrrepsLayout", "gate_mul", "seg_dot", "MMEALinear", "ELoRALinear", "inject_adapters",
    "adapter_state_dict", "load_adapter_state_dict", "merge_and_unload", "unload", "disable_adapters",
    "adapted_modules", "report", "convert_adapted_to_cueq", "convert_adapted_to_e3nn",
    "FusedGate", "replace_gates", "restore_gates",
]
