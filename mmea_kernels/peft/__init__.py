"""peft-style adapter management: inject adapters into a model, save/load only their weights,
merge, unload, switch off."""
from .inject import (adapted_modules, adapter_state_dict, disable_adapters, inject_adapters,
                     load_adapter_state_dict, merge_and_unload, report, unload)

__all__ = ["inject_adapters", "adapter_state_dict", "load_adapter_state_dict", "merge_and_unload", "unload",
           "disable_adapters", "adapted_modules", "report"]
