"""The whole fused MMEA adapter of a linear layer as one autograd node (eager calls that build a
graph: training, and forces, whose ``dE/dx`` runs through the gates).

    x0 = x[:, start:start + count],  (add, G) = gate_net(x0),
    u = L_W(x),  y = G ⊙ u + bias + add.

The same kernels as the three-node composition it replaces (:func:`split_scalars`, the gate net's
node, the saved-output fused linear): one gate-net kernel and one fused-linear kernel forward; in
a backward without a graph the linear's input-gradient kernel, ``seg_dot(dy, u)``, the gate net's
backward kernel, and the gate net's ``[N, count]`` input gradient added into the linear's
``[N, D_in]`` input gradient in place. What it saves is host time: one Python autograd node and
one engine task forward and backward instead of three (at MD sizes of tens of rows, where the
kernels take microseconds, that is most of what the adapter adds).

Autograd stays closed. ``add``, ``G`` and ``u`` are outputs of this node (the caller keeps only
``y``) and are saved as outputs, so in a ``create_graph`` backward (force training) they are on
the graph with this node as their ``grad_fn``: the differentiable backward (the fused linear's and
the gate net's create_graph forms, which use them) routes their gradients back into this node's
backward as ``dadd``, ``dG``, ``du``, which adds them to the gate net's and the linear's gradients.
Every order of derivative is therefore exact (gradgradcheck in float64:
tests/ops/test_adapter_node.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._utils import grads_needed
from ..gate_net.function import _kernels as _gate_net_kernels
from ..gate_net.function import gate_net_grads
from ...linear_spec import LinearSpec
from .function import _forward_kernel, _forward_u_kernel, saved_output_grads

__all__ = ["mmea_adapter_fused", "split_scalars"]


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else (a if b is None else a + b)


_SLOTS, _SLOTS_NO_BIAS = (0, 1, 2, 3, 4, 5, 6), (0, 1, -1, 2, 3, 4, 5)


class _AdapterFn(torch.autograd.Function):
    """``(y, add, G, u)``; see the module docstring. Inputs: ``x [N, D_in]``, the base layer's flat
    weight and bias, the gate net's four tensors, then the constants."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_down, b_down, w_up, b_up, num_additive, phi, start, count, spec, backend):
        ctx.set_materialize_grads(False)
        ctx.consts = (num_additive, phi, start, count, spec, backend)
        ctx.slots = _SLOTS if bias is not None else _SLOTS_NO_BIAS  # positions among the tensor inputs
        add, gates = _gate_net_kernels(backend)[0](_x0(x, start, count), w_down, b_down, w_up, b_up, num_additive,
                                                   phi)
        add_in = add if num_additive > 0 else None
        if gates.shape[1] > 0:
            y, u = _forward_u_kernel(backend)(x, weight, bias, None, gates, add_in, spec)
        else:  # nothing gated (all-0e outputs): no pre-gate output to keep
            y, u = _forward_kernel(backend)(x, weight, bias, None, None, add_in, spec), x.new_empty((x.shape[0], 0))
        ctx.save_for_backward(x, weight, w_down, b_down, w_up, gates, u)
        return y, add, gates, u

    @staticmethod
    def backward(ctx, dy, dadd_out, dgates_out, du):
        x, weight, w_down, b_down, w_up, gates, u = ctx.saved_tensors
        num_additive, phi, start, count, spec, be = ctx.consts
        nx, nw, nwd, nbd, nwu, nbu = grads_needed(ctx, (0, 1, 3, 4, 5, 6), ctx.slots)
        nb = ctx.needs_input_grad[2]
        net_need = (nx, nwd, nbd, nwu, nbu)
        ngate = any(net_need)  # the gates and the additive feed only the gate net's inputs
        need = (nx, nw, ngate, nb, ngate and num_additive > 0)
        dx, dw, db, dgates, dadd = saved_output_grads(x, weight, gates, u, dy, du, need, False, spec, be)
        if ngate:
            dadd = _add(dadd, dadd_out) if num_additive > 0 else None
            dgates = _add(dgates, dgates_out)
            dx0, dwd, dbd, dwu, dbu = gate_net_grads(_x0(x, start, count), w_down, b_down, w_up, gates, dadd,
                                                     dgates, num_additive, phi, be, net_need)
        else:
            dx0 = dwd = dbd = dwu = dbu = None
        if dx0 is not None:
            dx = _join(dx, dx0, start, x.shape)
        return (dx, dw, db, dwd, dbd, dwu, dbu) + (None,) * 6


def _join(dx: Optional[torch.Tensor], dx0: torch.Tensor, start: int, shape) -> torch.Tensor:
    """The gradient of ``x`` from the linear's ``dx`` (a kernel's fresh output, or None) and the gate
    net's ``dx0`` (of columns ``[start, start + count)``): added in place into ``dx``'s columns
    (``N x count`` elements, no zero-filled ``[N, D_in]`` slice gradient), out of place in a
    create_graph backward (the sum stays on the graph)."""
    if dx is None:
        return F.pad(dx0, (start, shape[1] - start - dx0.shape[1]))
    if torch.is_grad_enabled():
        return dx + F.pad(dx0, (start, shape[1] - start - dx0.shape[1]))
    dx.narrow(1, start, dx0.shape[1]).add_(dx0)
    return dx


def _x0(x: torch.Tensor, start: int, count: int) -> torch.Tensor:
    x0 = x.narrow(1, start, count)
    return x0.contiguous() if count > 1 and x0.stride(1) != 1 else x0


def mmea_adapter_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], w_down: torch.Tensor,
                       b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, num_additive: int, phi: str,
                       start: int, count: int, spec: LinearSpec, backend: str) -> torch.Tensor:
    """``y [N, D_out]`` of the fused MMEA adapter on 2-D ``x`` as one autograd node, on the
    ``backend`` kernels ("cpp" or "triton"), for a caller that checked everything already
    (:class:`~mmea_kernels.nn.MMEALinear`'s hot path: the 0e input columns are ``[start, start +
    count)``, all tensors share ``x``'s dtype and device, and the gate-net kernels
    run for them; ``spec`` may have no gated output). Differentiable to any order in every tensor argument."""
    return _AdapterFn.apply(x, weight, bias, w_down, b_down, w_up, b_up, int(num_additive), phi, start, count,
                            spec, backend)[0]


class _SplitScalarsFn(torch.autograd.Function):
    """``x -> (x, x[:, start:start + count])``: the kernel's input and the gate net's 0e input as two
    outputs of one node, so their gradients meet in this node's backward. The gate net's ``[N, count]``
    gradient is added into the kernel's ``[N, D_in]`` input gradient in place, instead of a
    zero-filled ``[N, D_in]`` gradient for the slice plus an add pass over both (what ``narrow``'s
    backward and autograd's accumulation cost). In a ``create_graph`` backward it adds out of place
    (differentiable: the result is a function of both incoming gradients)."""

    @staticmethod
    def forward(ctx, x, start: int, count: int):
        ctx.start, ctx.shape = start, x.shape
        return x.view_as(x), x.narrow(1, start, count)

    @staticmethod
    def backward(ctx, dx, dx0):
        # dx is the kernel's freshly written input gradient (this node's output 0 feeds only the fused
        # linear, possibly through a same-shape view), so the slice can be added in place
        return (dx if dx0 is None else _join(dx, dx0, ctx.start, ctx.shape)), None, None


def split_scalars(x: torch.Tensor, start: int, count: int):
    """``(x, x[:, start:start + count])`` for 2-D ``x``, with one backward that adds the second
    output's gradient into the first's in place (see :class:`_SplitScalarsFn`). For the fused MMEA
    linear: the first output feeds :func:`gated_linear`, the second the gate network."""
    if x.dim() != 2 or not 0 <= start <= start + count <= x.shape[1]:
        raise ValueError(f"split_scalars: columns [{start}, {start + count}) of a 2-D tensor, got shape "
                         f"{tuple(x.shape)}")
    return _SplitScalarsFn.apply(x, start, count)
