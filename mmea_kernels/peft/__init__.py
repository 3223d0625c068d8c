"""peft-style adapter management: :class:`AdapterConfig`, inject adapters into a model, save and
load only their weights, merge, unload, switch off."""
from .config import AdapterConfig
from .inject import (InjectionReport, adapted_modules, disable_adapters, inject_adapters, merge_and_unload, report,
                     unload)
from .state import FORMAT, adapter_state_dict, load_adapter_state_dict

__all__ = ["AdapterConfig", "InjectionReport", "inject_adapters", "adapter_state_dict", "load_adapter_state_dict",
           "merge_and_unload", "unload", "disable_adapters", "adapted_modules", "report", "FORMAT"]
