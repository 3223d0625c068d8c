"""Torch index tables for an :class:`~mmea_kernels.layout.IrrepsLayout`, cached per device.

Every backend reads its indices from here, so a layout is turned into tensors once per device.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

from ..layout import IrrepsLayout

__all__ = ["LayoutTables", "layout_tables"]


@dataclasses.dataclass(frozen=True)
class LayoutTables:
    layout: IrrepsLayout
    dim: int  # D, feature columns
    num_gates: int  # G
    gate_of_column: torch.Tensor  # int32 [D], gate index or -1 for 0e columns
    gate_index_ext: torch.Tensor  # int64 [D], gate index or G for 0e columns (index into gates ++ [fill])
    gated_columns: torch.Tensor  # int64 [Dg], all gated columns, gate-sorted
    gated_gate: torch.Tensor  # int64 [Dg], gate of each entry of gated_columns
    gate_cols_padded: torch.Tensor  # int32 [G, W], columns of each gate, padded with -1; W a power of 2
    scalar_columns: torch.Tensor  # int64 [S], the 0e columns

    @property
    def gate_width(self) -> int:
        return int(self.gate_cols_padded.shape[1])


_CACHE: Dict[Tuple[Tuple[str, str], str], LayoutTables] = {}


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def layout_tables(layout: IrrepsLayout, device) -> LayoutTables:
    """Index tables of ``layout`` on ``device`` (built once, then cached)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (layout.key, str(device))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    # plain tensors even inside a torch.func transform: built there, they would be wrapped at its
    # level and the cached tables would break the next transform (a second torch.func.hessian)
    with torch._C._DisableFuncTorch():
        G = layout.num_gates
        gate_of = torch.tensor(layout.gate_of_column, dtype=torch.int32)
        ext = gate_of.to(torch.int64).clone()
        ext[ext < 0] = G
        cols = [c for gc in layout.gate_columns for c in gc]
        owner = [g for g, gc in enumerate(layout.gate_columns) for _ in gc]
        width = _next_pow2(max(layout.max_gate_width, 1))
        padded = torch.full((G, width), -1, dtype=torch.int32)
        for g, gc in enumerate(layout.gate_columns):
            padded[g, : len(gc)] = torch.tensor(gc, dtype=torch.int32)
        tables = LayoutTables(
            layout=layout,
            dim=layout.dim,
            num_gates=G,
            gate_of_column=gate_of.to(device),
            gate_index_ext=ext.to(device),
            gated_columns=torch.tensor(cols, dtype=torch.int64, device=device),
            gated_gate=torch.tensor(owner, dtype=torch.int64, device=device),
            gate_cols_padded=padded.to(device),
            scalar_columns=torch.tensor(layout.scalar_columns, dtype=torch.int64, device=device),
        )
    _CACHE[key] = tables
    return tables
