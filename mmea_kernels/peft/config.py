"""What :func:`~mmea_kernels.peft.inject.inject_adapters` needs, in one object (as peft's
``LoraConfig``): the adapter method, its rank, which layers to adapt and the adapter class's own
options, checked against that class when the config is made."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Union

from ..nn import ADAPTERS

__all__ = ["AdapterConfig", "Patterns"]

Patterns = Union[None, str, Sequence[str]]


@dataclasses.dataclass
class AdapterConfig:
    """Adapters to inject.

    Attributes:
        method: ``"mmea"`` (:class:`~mmea_kernels.nn.MMEALinear`) or ``"elora"``
            (:class:`~mmea_kernels.nn.ELoRALinear`).
        rank: hidden width of the gate network (MMEA) or rank of each block update (ELoRA).
        target_modules / exclude_modules: ``None`` (all), a list of names, suffixes or globs, or one
            regular expression string (full match).
        options: the adapter class's own options (its ``option_names``: MMEA ``phi``, ``init``,
            ``init_std``, ``backend``; ELoRA ``alpha``).
    """

    method: str = "mmea"
    rank: int = 16
    target_modules: Patterns = None
    exclude_modules: Patterns = None
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.method not in ADAPTERS:
            raise ValueError(f"unknown adapter method {self.method!r}; expected one of {sorted(ADAPTERS)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        self.options = dict(self.options)
        known = self.adapter_class.option_names
        bad = sorted(set(self.options) - set(known))
        if bad:
            raise TypeError(f"unknown option(s) {bad} for {self.method} adapters; expected some of {list(known)}")

    @property
    def adapter_class(self):
        return ADAPTERS[self.method]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], **override) -> "AdapterConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise KeyError(f"AdapterConfig has no field(s) {unknown}")
        return cls(**{**d, **override})

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)
