"""Module paths from before the package was laid out in layers (``mmea_kernels.finetune``,
``mmea_kernels.inject``, ``mmea_kernels.models.mace``, ...) keep importing: each old name is an
alias of the module that now holds its code (the same module object, so ``isinstance`` checks,
monkeypatching and pickles that name old paths keep working). New code should use the new paths.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module path -> new module path
ALIASES = {
    "mmea_kernels.ops.gate": None,  # a package now: its old names are re-exported there
    "mmea_kernels.ops.torch_backend": "mmea_kernels.ops.gate.reference",
    "mmea_kernels.ops.triton_backend": "mmea_kernels.ops.gate.triton",
    "mmea_kernels.ops.cpp_backend": "mmea_kernels.ops.gate.cpp",
    "mmea_kernels.ops.linear_spec": "mmea_kernels.linear_spec",
    "mmea_kernels.nn.common": "mmea_kernels.nn.base",
    "mmea_kernels.inject": "mmea_kernels.peft",
    "mmea_kernels.cueq": "mmea_kernels.integrations.cueq",
    "mmea_kernels.export": "mmea_kernels.integrations.export",
    "mmea_kernels.models": "mmea_kernels.integrations",
    "mmea_kernels.models.mace": "mmea_kernels.integrations.mace",
    "mmea_kernels.models.sevenn": "mmea_kernels.integrations.sevenn",
    "mmea_kernels.finetune": "mmea_kernels.train",  # the package re-exports the old module's names
    "mmea_kernels.methods": "mmea_kernels.train.methods",
    "mmea_kernels.foundation": "mmea_kernels.train.foundation",
    "mmea_kernels.checks": "mmea_kernels.train.checks",
    "mmea_kernels.safe_load": "mmea_kernels.train.safe_load",
    "mmea_kernels.selfcheck": "mmea_kernels.train.selfcheck",
    "mmea_kernels.train_guard": "mmea_kernels.train.guard",
    "mmea_kernels.data": "mmea_kernels.app.data",
    "mmea_kernels.cli": "mmea_kernels.app.cli",
    "mmea_kernels.demo": "mmea_kernels.app.demo",
    "mmea_kernels.calculator": "mmea_kernels.app.calculator",
    "mmea_kernels.rmd17": "mmea_kernels.app.rmd17",
}
ALIASES = {k: v for k, v in ALIASES.items() if v is not None}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):  # already executed under its new name
        # importlib has just set module.__spec__ to the alias's spec: put the module's own back, or
        # every relative import run later inside its functions warns (ImportWarning: __package__ !=
        # __spec__.parent), and a test that turns warnings on saw it
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # before the path finder, which would load a second copy
