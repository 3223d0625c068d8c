"""Independent references for the tests (naive per-column loops in float64), the devices the
kernel tests run on, and the repository root (REPO) for the tests that run its scripts."""
import os
import pathlib

import pytest
import torch

from mmea_kernels.layout import IrrepsLayout, parse_irreps

REPO = pathlib.Path(__file__).resolve().parents[1]  # tests/helpers.py -> the repository


def naive_gate_of_column(irreps: str, layout: str):
    """Column -> gate, written from the definition (not from IrrepsLayout)."""
    out = []
    gate = 0
    for mul, l, p in parse_irreps(irreps):
        d = 2 * l + 1
        block = [None] * (mul * d)
        for k in range(mul):
            for m in range(d):
                col = k * d + m if layout == "mul_ir" else m * mul + k
                block[col] = -1 if (l == 0 and p == 1) else gate + k
        out += block
        if not (l == 0 and p == 1):
            gate += mul
    return out, gate


def naive_gate_mul(x, gates, irreps, layout, keep_ungated=True):
    owner, G = naive_gate_of_column(irreps, layout)
    y = torch.empty_like(x, dtype=torch.float64)
    for c, g in enumerate(owner):
        if g < 0:
            y[..., c] = x[..., c].double() if keep_ungated else 0.0
        else:
            gg = gates[g] if gates.dim() == 1 else gates[..., g]
            y[..., c] = x[..., c].double() * gg.double()
    return y


def naive_seg_dot(a, b, irreps, layout, shared=False):
    owner, G = naive_gate_of_column(irreps, layout)
    out = torch.zeros(a.shape[:-1] + (G,), dtype=torch.float64)
    for c, g in enumerate(owner):
        if g >= 0:
            out[..., g] += a[..., c].double() * b[..., c].double()
    return out.reshape(-1, G).sum(0) if shared else out


def random_orthogonal(seed: int, reflect: bool, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = -q
    return q


def naive_mmea(ad, y, x, irreps_in: str, irreps_out: str, layout_in: str = "mul_ir", layout_out: str = "mul_ir",
               phi: str = "exp"):
    """y' from the method's equations, column by column: z = SiLU(W_down x0 + b_down),
    γ = W_up z + b_up; 0e output columns get + γ_add, the others × φ(γ_gate)."""
    in_owner, _ = naive_gate_of_column(irreps_in, layout_in)
    out_owner, _ = naive_gate_of_column(irreps_out, layout_out)
    x0 = x[:, [c for c, g in enumerate(in_owner) if g < 0]]
    z = torch.nn.functional.silu(x0 @ ad.mmea_down.weight.T + ad.mmea_down.bias)
    gamma = z @ ad.mmea_up.weight.T + ad.mmea_up.bias
    n_add = sum(1 for g in out_owner if g < 0)
    cols, j = [], 0
    for c, g in enumerate(out_owner):
        if g < 0:
            cols.append(y[:, c] + gamma[:, j])
            j += 1
        else:
            lg = gamma[:, n_add + g]
            cols.append(y[:, c] * (torch.exp(lg) if phi == "exp" else 1 + lg))
    return torch.stack(cols, dim=1)


# ---------------------------------------------------------------------------- devices
# The kernel tests run once per device: "cpu" runs the Triton kernels through the interpreter
# (TRITON_INTERPRET=1, set by conftest unless MMEA_TEST_CUDA=1), "cuda" on a GPU where one exists.
CUDA_AVAILABLE = torch.cuda.is_available()
_NO_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device on this machine")
TRITON_DEVICES = [
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="triton kernels on CPU tensors need TRITON_INTERPRET=1 (unset for the CUDA run)")),
    pytest.param("cuda", id="cuda", marks=_NO_CUDA),
]
CPP_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_NO_CUDA)]
