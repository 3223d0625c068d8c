"""mmea_kernels: magnitude-modulated equivariant adapters (MMEA) for e3nn / MACE models, with
fused gate kernels and exact double backward.

The core (``layout``, ``linear_spec``, ``ops``, ``nn``, ``peft``) needs only torch and e3nn;
``integrations`` (cuEquivariance, TorchScript export, mace-torch, SevenNet), ``train`` (the
fine-tuning workflow) and ``app`` (command line, demo, ASE calculator, datasets) import their
libraries when used."""
from ._compat import install as _install_aliases
from .integrations.mace_convert_guard import install as _guard_mace_conversions
from .layout import IrrepsLayout
from .linear_spec import LinearSpec
from .nn import (ELoRALinear, FusedGate, MMEALinear, aten_forms, export_forms, replace_gates, restore_eager_forms,
                 restore_gates, split_tp_slices)
from .ops import gate_mul, seg_dot
from .peft import (AdapterConfig, adapted_modules, adapter_state_dict, disable_adapters, inject_adapters,
                   load_adapter_state_dict, merge_and_unload, report, unload)

_install_aliases()  # old module paths (mmea_kernels.finetune, ...) stay importable
_guard_mace_conversions()  # mace-torch's cuEquivariance conversions carry adapters over (see the module)

__version__ = "0.1.0"

__all__ = [
    "IrrepsLayout", "LinearSpec", "gate_mul", "seg_dot", "MMEALinear", "ELoRALinear", "AdapterConfig",
    "inject_adapters", "adapter_state_dict", "load_adapter_state_dict", "merge_and_unload", "unload",
    "disable_adapters", "adapted_modules", "report", "convert_adapted_to_cueq", "convert_adapted_to_e3nn",
    "FusedGate", "replace_gates", "restore_gates", "split_tp_slices", "load_kernels", "load_adapter_file",
    "aten_forms", "export_forms", "restore_eager_forms",
]

_LAZY = {"convert_adapted_to_cueq": "integrations.cueq", "convert_adapted_to_e3nn": "integrations.cueq",
         "load_kernels": "ops.gate.cpp", "load_adapter_file": "train.safe_load"}


def __getattr__(name):  # integrations load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
