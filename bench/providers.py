"""The adapted-linear variants that the benchmarks compare, all computing the same MMEA layer
``y' = φ(γ_gate) ⊙ L(x) + γ_add`` (or the base ``L(x)`` alone)."""
from __future__ import annotations

import torch
from e3nn import o3

from mmea_kernels import MMEALinear, gate_mul
from mmea_kernels.layout import IrrepsLayout

# The CPU grid's layers (bench/test_bench_cpu.py, bench/linear_speed.py): name -> (irreps_in, irreps_out)
CPU_LAYERS = {
    "128x0e+128x1o": ("128x0e+128x1o", "128x0e+128x1o"),
    "128x0e+128x1o+128x2e+128x3o": ("128x0e+128x1o+128x2e+128x3o",) * 2,
    "mace-interaction-1 (10 blocks)": (
        "128x0e+128x0e+128x1o+128x1o+128x1o+128x2e+128x2e+128x2e+128x3o+128x3o", "128x0e+128x1o+128x2e+128x3o"),
}


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
    ``compiled`` (broadcast gate under torch.compile), ``cpp`` (``MMEALinear`` on the C++ extension:
    the fused linear + gate kernels, what it runs on CPU by default), ``cpp-unfused`` (the base linear,
    then the C++ gate ops: what ``cpp`` was before the fused kernels), ``triton`` (Triton backend)."""

    def __init__(self, linear: o3.Linear, provider: str, rank: int = 16):
        super().__init__()
        self.provider = provider
        backend = {"cpp": "cpp", "cpp-unfused": "cpp", "triton": "triton"}.get(provider, "torch")
        self.adapter = MMEALinear(linear, rank=rank, backend=backend)
        if provider == "cpp-unfused":
            # the adapter's "no fused kernel for this layer" mark (eager, and its key for torch.compile)
            self.adapter._kernel_spec, self.adapter._kernel_key = False, ""
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
        if self.provider in ("cpp", "cpp-unfused", "triton"):
            return a(x)
        y = a.base(x)
        if self.provider == "published":
            add, logits = a.gamma(x)
            return published_gate(y, add, logits, a.irreps_out)
        add, gates = a.gate_parameters(x)
        return self._gate(y, add, gates)


def make_run(module, x: torch.Tensor, dy: torch.Tensor, mode: str):
    """The timed call: ``fwd`` (no grad), ``fwd+bwd`` (the input gradient ``dy``-weighted) or
    ``force`` (that gradient with ``create_graph``, then the gradient of ``<it, w>`` with respect to
    ``x``: the second derivatives a force-training step takes; ``w`` fixed, x-shaped)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                module(x)
    elif mode == "fwd+bwd":
        def run():
            torch.autograd.grad(module(x), x, dy)
    elif mode == "force":
        w = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=torch.Generator(x.device).manual_seed(1))

        def run():
            (g,) = torch.autograd.grad(module(x), x, dy, create_graph=True)
            torch.autograd.grad(g, x, w)
    else:
        raise ValueError(f"mode {mode!r}: expected fwd, fwd+bwd or force")
    return run
