"""The fused gate in plain torch ops: the reference the kernels are tested against, the ``torch``
backend, and the double backward of every backend (written with torch ops on the saved tensors,
so autograd can differentiate it again).

Activations by code (spec.ACT_CODES); ``cst`` multiplies the activation (e3nn's normalize2mom):

    code  f(x)                    f'(x)                       f''(x)
    0     x                       1                           0
    1     x·σ(x)                  σ(1 + x(1-σ))               σ(1-σ)(2 + x(1-2σ))
    2     σ(x)                    σ(1-σ)                      σ(1-σ)(1-2σ)
    3     tanh x                  1 - t²                      -2t(1 - t²)
    4     |x|                     sgn x                       0
    5     softplus x              σ(x)  (1 for x > 20)        σ(1-σ) (0 for x > 20)
    6     softplus x - log 2      as softplus                 as softplus
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import LOG2, GateTables

__all__ = ["act", "act_d1", "act_d2", "forward", "backward", "double_backward"]


def act(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return x
    if code == 1:
        return F.silu(x)
    if code == 2:
        return torch.sigmoid(x)
    if code == 3:
        return torch.tanh(x)
    if code == 4:
        return torch.abs(x)
    if code == 5:
        return F.softplus(x)
    if code == 6:
        return F.softplus(x) - LOG2
    raise ValueError(f"unknown activation code {code}")


def act_d1(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return torch.ones_like(x)
    if code == 1:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if code == 2:
        s = torch.sigmoid(x)
        return s * (1 - s)
    if code == 3:
        t = torch.tanh(x)
        return 1 - t * t
    if code == 4:
        return torch.sgn(x)
    if code in (5, 6):
        return torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))
    raise ValueError(f"unknown activation code {code}")


def act_d2(x: torch.Tensor, code: int) -> torch.Tensor:
    if code in (0, 4):
        return torch.zeros_like(x)
    s = torch.sigmoid(x)
    if code == 1:
        return s * (1 - s) * (2 + x * (1 - 2 * s))
    if code == 2:
        return s * (1 - s) * (1 - 2 * s)
    if code == 3:
        t = torch.tanh(x)
        return -2 * t * (1 - t * t)
    if code in (5, 6):
        return torch.where(x > 20, torch.zeros_like(x), s * (1 - s))
    raise ValueError(f"unknown activation code {code}")


def _apply(xc: torch.Tensor, groups, fn) -> torch.Tensor:
    """``cst * fn(xc, code)`` column group by column group (columns of ``xc`` = the group positions)."""
    if len(groups) == 1 and groups[0][1] is None:
        code, _, cst = groups[0]
        v = fn(xc, code)
        return v if cst == 1.0 else v.mul(cst)
    out = torch.zeros_like(xc)
    for code, idx, cst in groups:
        v = fn(xc.index_select(1, idx), code)
        out = out.index_copy(1, idx, v if cst == 1.0 else v.mul(cst))
    return out


def _seg_sum(v: torch.Tensor, t: GateTables) -> torch.Tensor:
    return v.new_zeros(v.shape[0], t.spec.num_gates).index_add(1, t.d_gate, v)


def _scatter_in(t: GateTables, like: torch.Tensor, s, g, d) -> torch.Tensor:
    # out of place, as _apply: filled in place, vmap (torch.func's and autograd's vectorize=True) could
    # not write a batched value into the unbatched buffer (torch.vmap over autograd.grad, mace-torch's
    # Hessians, raised); that saved ~2 inputs of peak memory on the torch backend only
    out = like.new_zeros(like.shape[0], t.spec.d_in)
    return out.index_copy(1, t.s_src, s).index_copy(1, t.g_src, g).index_copy(1, t.d_src, d)


def forward(x: torch.Tensor, t: GateTables) -> torch.Tensor:
    """``y`` of a 2-D ``x`` (differentiable by autograd)."""
    ys = _apply(x.index_select(1, t.s_src), t.s_groups, act)
    if t.spec.num_gates == 0:
        return ys
    g = _apply(x.index_select(1, t.g_src), t.g_groups, act)
    yd = x.index_select(1, t.d_src) * g.index_select(1, t.d_gate)
    return torch.cat([ys, yd], dim=1)


def backward(x: torch.Tensor, dy: torch.Tensor, t: GateTables) -> torch.Tensor:
    """``dx = J(x)ᵀ dy``."""
    S = t.spec.num_scalars
    dxs = dy[:, :S] * _apply(x.index_select(1, t.s_src), t.s_groups, act_d1)
    xg = x.index_select(1, t.g_src)
    g = _apply(xg, t.g_groups, act)
    dg = _apply(xg, t.g_groups, act_d1)
    dyd = dy[:, S:]
    xd = x.index_select(1, t.d_src)
    dxd = dyd * g.index_select(1, t.d_gate)
    dxg = dg * _seg_sum(dyd * xd, t)
    return _scatter_in(t, x, dxs, dxg, dxd)


def double_backward(x: torch.Tensor, dy: torch.Tensor, v: torch.Tensor, t: GateTables):
    """Gradients of ``<backward(x, dy), v>`` with respect to ``x`` and ``dy``, in torch ops."""
    S = t.spec.num_scalars
    xs = x.index_select(1, t.s_src)
    vs = v.index_select(1, t.s_src)
    gdy_s = vs * _apply(xs, t.s_groups, act_d1)
    gx_s = vs * dy[:, :S] * _apply(xs, t.s_groups, act_d2)
    if t.spec.num_gates == 0:
        return _scatter_in(t, x, gx_s, x[:, :0], x[:, :0]), gdy_s
    xg = x.index_select(1, t.g_src)
    vg = v.index_select(1, t.g_src)
    g = _apply(xg, t.g_groups, act)
    dg = _apply(xg, t.g_groups, act_d1)
    ddg = _apply(xg, t.g_groups, act_d2)
    xd = x.index_select(1, t.d_src)
    vd = v.index_select(1, t.d_src)
    dyd = dy[:, S:]
    dgvg = (dg * vg).index_select(1, t.d_gate)
    gdy_d = vd * g.index_select(1, t.d_gate) + xd * dgvg
    gx_d = dgvg * dyd
    gx_g = ddg * vg * _seg_sum(dyd * xd, t) + dg * _seg_sum(vd * dyd, t)
    return _scatter_in(t, x, gx_s, gx_g, gx_d), torch.cat([gdy_s, gdy_d], dim=1)
