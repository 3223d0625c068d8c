"""ELoRA baseline: per e3nn instruction (path) a low-rank weight update ``ΔW = (α/r)·A·B``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .common import AdapterLinear

__all__ = ["ELoRALinear"]


class ELoRALinear(AdapterLinear):
    """Wraps a frozen ``o3.Linear``; instruction ``i`` with weight block ``W_i`` (``m_in × m_out``)
    gets ``A_i`` (``m_in × r``) and ``B_i`` (``r × m_out``), ``B_i = 0`` at start (so the adapted
    layer equals the base layer), ``A_i`` kaiming-uniform as in LoRA. ``alpha`` defaults to ``rank``.
    ``merge()`` folds ``ΔW`` into the base weights exactly.
    """

    method = "elora"

    def __init__(self, base: nn.Module, rank: int = 16, alpha: Optional[float] = None):
        super().__init__(base)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not getattr(base, "internal_weights", True) or getattr(base, "weight", None) is None:
            raise TypeError("ELoRA needs an o3.Linear with internal (shared) weights")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        fk = self._factory()
        self.path_shapes = [tuple(ins.path_shape) for ins in base.instructions]
        self.elora_A = nn.ParameterList([nn.Parameter(torch.empty(m_in, rank, **fk)) for m_in, _ in self.path_shapes])
        self.elora_B = nn.ParameterList([nn.Parameter(torch.empty(rank, m_out, **fk)) for _, m_out in self.path_shapes])
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        for A, B in zip(self.elora_A, self.elora_B):
            if A.numel():
                nn.init.kaiming_uniform_(A.T, a=math.sqrt(5))  # LoRA's init of A (fan-in = m_in)
            B.zero_()

    def adapter_options(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha}

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` flattened like ``base.weight`` (instruction by instruction, row-major)."""
        parts = [(A @ B).reshape(-1) for A, B in zip(self.elora_A, self.elora_B)]
        if not parts:
            return self.base.weight.new_zeros(0)
        return torch.cat(parts) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.check_input(x)
        if not self.adapter_enabled:
            return self.base(x, *args, **kwargs)
        return self.base(x, self.base.weight + self.delta_weight(), *args, **kwargs)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        self.base.weight.add_(self.delta_weight())
        return self.base

    def extra_repr(self) -> str:
        return (f"irreps_in={self.in_layout.irreps_str}, irreps_out={self.out_layout.irreps_str}, "
                f"rank={self.rank}, alpha={self.alpha}, paths={len(self.path_shapes)}")
