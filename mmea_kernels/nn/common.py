"""What adapters need to know about the frozen linear layer they wrap."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..layout import IrrepsLayout

__all__ = ["AdapterLinear", "is_equivariant_linear", "linear_irreps"]


def is_equivariant_linear(module: nn.Module) -> bool:
    """True for layers an adapter can wrap: e3nn ``o3.Linear``."""
    try:
        from e3nn import o3
    except ImportError:  # pragma: no cover - e3nn is a hard requirement
        return False
    return isinstance(module, o3.Linear)


def linear_irreps(base: nn.Module) -> Tuple[str, str, str]:
    """(irreps_in, irreps_out, layout) of a supported linear layer."""
    if not is_equivariant_linear(base):
        raise TypeError(
            f"adapters wrap e3nn o3.Linear layers; got {type(base).__module__}.{type(base).__name__}"
        )
    return str(base.irreps_in), str(base.irreps_out), "mul_ir"


class AdapterLinear(nn.Module):
    """Common part of the adapter wrappers: the frozen base layer, irreps, on/off switch."""

    method: str = ""

    def __init__(self, base: nn.Module):
        super().__init__()
        irreps_in, irreps_out, layout = linear_irreps(base)
        self.base = base
        self.irreps_in = base.irreps_in
        self.irreps_out = base.irreps_out
        self.layout_name = layout
        self.in_layout = IrrepsLayout.of(irreps_in, layout)
        self.out_layout = IrrepsLayout.of(irreps_out, layout)
        self.adapter_enabled = True

    def _factory(self):
        p = next(self.base.parameters(), None)
        if p is None:
            return {"dtype": torch.get_default_dtype(), "device": torch.device("cpu")}
        return {"dtype": p.dtype, "device": p.device}

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.in_layout.dim:
            raise ValueError(
                f"{type(self).__name__}: input has shape {tuple(x.shape)}, but irreps_in "
                f"{self.in_layout.irreps_str} needs the last dimension to be {self.in_layout.dim}"
            )

    def adapter_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def adapter_options(self) -> dict:
        raise NotImplementedError

    def merge(self) -> nn.Module:
        raise NotImplementedError
