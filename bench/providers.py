"""The adapted-linear variants that the benchmarks compare, all computing the same MMEA layer
``y' = φ(γ_gate) ⊙ L(x) + γ_add`` (or the base ``L(x)`` alone)."""
from __future__ import annotations

import torch
from e3nn import o3

from mmea_kernels import MMEALinear, gate_mul
from mmea_kernels.layout import IrrepsLayout


def published_gate(y: torch.Tensor, add: torch.Tensor, logits: torch.Tensor, irreps_out) -> torch.Tensor:
    """The gate structured as the published implementation does it: clone, per-irrep
    slice/reshape/permute, exp, multiply, concatenate (mul_ir layout)."""
    y = y.clone()
    n = y.shape[0]
    parts, col, gate, s = [], 0, 0, 0
    for mul, ir in o3.Irreps(irreps_out):
        d = mul * ir.dim
        block = y[:, col:col + d]
        if ir.l == 0 and ir.p == 1:
            parts.append(block + add[:, s:s + mul])
            s += mul
        else:
            b = block.reshape(n, mul, ir.dim).permute(0, 2, 1)  # [n, 2l+1, mul]
            scale = torch.exp(logits[:, gate:gate + mul]).unsqueeze(1)
            parts.append((b * scale).permute(0, 2, 1).reshape(n, d))
            gate += mul
        col += d
    return torch.cat(parts, dim=1)


class Variant(torch.nn.Module):
    """One provider: ``base`` (o3.Linear alone), ``published``, ``broadcast`` (torch backend),
    ``compiled`` (broadcast gate under torch.compile), ``cpp`` (C++ extension backend),
    ``triton`` (Triton backend)."""

    def __init__(self, linear: o3.Linear, provider: str, rank: int = 16):
        super().__init__()
        self.provider = provider
        self.adapter = MMEALinear(linear, rank=rank, backend={"cpp": "cpp", "triton": "triton"}.get(provider, "torch"))
        with torch.no_grad():  # gates away from 1, as after training
            self.adapter.mmea_up.weight.normal_(0, 0.05)
        self.out_layout = IrrepsLayout.of(linear.irreps_out, "mul_ir")
        if provider == "compiled":
            self._gate = torch.compile(self._broadcast, dynamic=False)
        else:
            self._gate = self._broadcast

    def _broadcast(self, y, add, gates):
        a = self.adapter
        y = gate_mul(y, gates, self.out_layout, backend="torch")
        return torch.index_add(y, 1, a.out_scalar_columns, add)

    def forward(self, x):
        a = self.adapter
        if self.provider == "base":
            return a.base(x)
        if self.provider in ("cpp", "triton"):
            return a(x)
        y = a.base(x)
        if self.provider == "published":
            add, logits = a.gamma(x)
            return published_gate(y, add, logits, a.irreps_out)
        add, gates = a.gate_parameters(x)
        return self._gate(y, add, gates)
