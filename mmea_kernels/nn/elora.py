"""ELoRA baseline: per weight block (e3nn instruction / cuEquivariance path) a low-rank weight
update ``ΔW = (α/r)·A·B``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import AdapterLinear

__all__ = ["ELoRALinear"]


class ELoRALinear(AdapterLinear):
    """Wraps a frozen ``o3.Linear`` or ``cuequivariance_torch.Linear``; weight block ``i`` (an e3nn
    instruction, or a path of the cuEquivariance descriptor: ``irreps_in[i_in] -> irreps_out[i_out]``,
    ``W_i`` of shape ``m_in × m_out``) gets ``A_i`` (``m_in × r``) and ``B_i`` (``r × m_out``),
    ``B_i = 0`` at start (so the adapted layer equals the base layer), ``A_i`` kaiming-uniform as in
    LoRA. ``alpha`` defaults to ``rank``. ``merge()`` folds ``ΔW`` into the base weights exactly.

    Both layer kinds order their blocks the same way (every pair of equal irreps, input-major), so
    the adapter weights of an e3nn layer and of its cuEquivariance conversion correspond one to one
    (:attr:`paths` lists ``(i_in, i_out)`` of each block). Needs internal weights (a weight parameter
    to update); a ``cuet.Linear`` must also have a single weight class.
    """

    method = "elora"
    option_names = ("alpha",)
    shaping_options = ("rank", "alpha")
    mergeable = True

    def __init__(self, base: nn.Module, rank: int = 16, alpha: Optional[float] = None):
        super().__init__(base)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.view.check_weight_update(base, "ELoRA")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        if not (math.isfinite(self.alpha) and self.alpha != 0):
            raise ValueError(f"ELoRA alpha must be finite and non-zero (the update is (alpha/rank)·A·B; 0 would "
                             f"train nothing), got {alpha!r}")
        self.scaling = self.alpha / rank
        fk = self._factory()
        self.paths = self.spec.instructions
        off = 0
        for p in self.paths:  # blocks tile the flat weight in order: ΔW is their concatenation
            if p.weight_offset != off:
                raise ValueError(f"weight blocks of {type(base).__name__} are not contiguous in path order")
            off += p.numel
        if off != base.weight.numel():
            raise ValueError(f"weight blocks cover {off} of the {base.weight.numel()} weight elements (an o3.Linear with "
                             f"f_in/f_out feature channels, weight shape {tuple(base.weight.shape)}, has a weight per "
                             "channel pair; ELoRA adapts one)")
        self.merged = False  # merge(): ΔW is in base.weight (the forward then adds nothing)
        self.path_shapes = [(p.mul_in, p.mul_out) for p in self.paths]
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

    def target_info(self) -> dict:
        return {**super().target_info(), "paths": [[p.i_in, p.i_out] for p in self.paths]}  # the block of each A_i, B_i

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` shaped like ``base.weight`` (block by block, row-major; ``[weight_numel]`` for an
        ``o3.Linear``, ``[1, weight_numel]`` for a ``cuet.Linear``)."""
        parts = [(A @ B).reshape(-1) for A, B in zip(self.elora_A, self.elora_B)]
        if not parts:
            return self.base.weight.new_zeros(self.base.weight.shape)
        return (torch.cat(parts) * self.scaling).reshape(self.base.weight.shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.check_input(x)
        if self.merged:  # the base weight holds ΔW already
            if self.adapter_enabled:
                return self.base(x, *args, **kwargs)
            return self.view.call_with_weight(self.base, x, self.base.weight - self.delta_weight(), args, kwargs)
        if not self.adapter_enabled:
            return self.base(x, *args, **kwargs)
        return self.view.call_with_weight(self.base, x, self.base.weight + self.delta_weight(), args, kwargs)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Add ``ΔW`` into the base weights (once: a second call changes nothing) and return the base
        layer; this adapter then adds nothing in its forward (the same output as before), until
        :meth:`unmerge` takes ``ΔW`` out again (to round-off)."""
        if not self.merged:
            self.base.weight.add_(self.delta_weight())
            self.merged = True
        return self.base

    @torch.no_grad()
    def unmerge(self) -> nn.Module:
        """Undo :meth:`merge` (``W + ΔW − ΔW``: the original weights to round-off); the base layer."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight())
            self.merged = False
        return self.base

    # the state dict says whether base.weight holds ΔW: the key MERGED_KEY (a True tensor) is there
    # only after merge(), so a merged model's state_dict() loads into a fresh model as merged (not with
    # ΔW added a second time), and files saved unmerged (every earlier file) load as before
    MERGED_KEY = "elora_merged"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + self.MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        flag = state_dict.pop(prefix + self.MERGED_KEY, None)  # state_dict: load_state_dict's own copy
        merged = bool(flag) if flag is not None else False
        factors = any(k.startswith(prefix + "elora_") for k in state_dict)
        if prefix + "base.weight" in state_dict:  # the loaded base weight says whether ΔW is in it
            self.merged = merged
        elif (factors and (self.merged or merged)) or (flag is not None and merged != self.merged):
            error_msgs.append(
                f"ELoRA layer {prefix.rstrip('.') or '(root)'}: the state {'has' if merged else 'has no'} ΔW merged into "
                f"its base weight but holds no base weight, and the layer is {'merged' if self.merged else 'unmerged'}"
                ": loading it would leave a base weight that does not match the factors; unmerge() the layer first "
                "(or load the full state, base weight included)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"irreps_in={self.in_layout.irreps_str}, irreps_out={self.out_layout.irreps_str}, "
                f"rank={self.rank}, alpha={self.alpha}, paths={len(self.path_shapes)}")
