"""The MMEA gate network as one kernel forward and one backward: C++ (csrc/gate_net.cpp) for the
fused CPU path of :class:`~mmea_kernels.nn.MMEALinear`, Triton (triton.py) for its fused GPU path:

    h = x0 W_downᵀ + b_down,  z = SiLU(h),  γ = z W_upᵀ + b_up,
    add = γ[:, :A],  gates = φ(γ[:, A:])   (φ = exp, or 1 + γ for phi="residual").

The torch composition (:func:`gate_net_reference`) is six ATen calls, each with its own allocation
and parallel region, on a few hundred KB: at MD sizes and on two threads it cost about as much as
the fused linear it feeds. The kernel runs the whole net per tile of 128 rows in one parallel region.

Autograd: the forward saves ``x0``, the weights and the output ``gates`` (h and z are recomputed in
the backward). With grad mode off (every first-order backward: inference forces, the parameter
update's backward) the backward is one kernel call (``gate_net_bwd``); in a ``create_graph``
backward (force training) it is the explicit formulas below in torch ops, so every higher order is
exact: ``gates`` is a saved *output*, so its dependence on the inputs stays on the graph.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..gate.cpp import CPP_DTYPES, ext_op_status

__all__ = ["gate_net", "gate_net_kernels", "gate_net_reference", "gate_net_cpp_status", "gate_net_status",
           "gate_net_grads", "PHI_CODES"]

PHI_CODES = {"exp": 0, "residual": 1}


@functools.lru_cache(maxsize=None)
def _ext_status() -> Tuple[bool, str]:
    return ext_op_status("gate_net_fwd", "gate-net", "csrc/gate_net.cpp")


def gate_net_cpp_status(x0: torch.Tensor) -> Tuple[bool, str]:
    """(available, reason) of the C++ gate net for inputs like ``x0``."""
    if x0.device.type != "cpu":
        return False, f"the C++ gate net runs on cpu tensors, not {x0.device.type}"
    if x0.dtype not in CPP_DTYPES:
        return False, f"the C++ gate net supports float32 and float64, not {x0.dtype}"
    return _ext_status()


def gate_net_reference(x0, w_down, b_down, w_up, b_up, num_additive: int, phi: str = "exp"):
    """The torch composition (the numerical reference): ``(add [N, A], gates [N, G])``."""
    gamma = F.linear(F.silu(F.linear(x0, w_down, b_down)), w_up, b_up)
    logits = gamma[:, num_additive:]
    return gamma[:, :num_additive], (torch.exp(logits) if phi == "exp" else 1.0 + logits)


def _backward_formulas(x0, w_down, b_down, w_up, gates, dadd, dgates, num_additive, phi):
    """The first-order gradients in torch ops (differentiable: the create_graph backward)."""
    h = F.linear(x0, w_down, b_down)
    s = torch.sigmoid(h)
    z = h * s
    n, G = x0.shape[0], gates.shape[1]
    if dadd is None:
        dadd = x0.new_zeros((n, num_additive))
    if dgates is None:
        dgl = x0.new_zeros((n, G))
    else:
        dgl = dgates * gates if phi == "exp" else dgates
    dgam = torch.cat([dadd, dgl], dim=1)
    dh = (dgam @ w_up) * (s * (1 + h * (1 - s)))
    return dh @ w_down, dh.t() @ x0, dh.sum(0), dgam.t() @ z, dgam.sum(0)


_STATUS: dict = {}  # (backend, device type, dtype, rank) -> (ok, why)


def gate_net_status(backend: str, x0: torch.Tensor, rank: int = 1) -> Tuple[bool, str]:
    """(available, reason) of the ``backend`` ("cpp" or "triton") gate-net kernels for inputs like
    ``x0`` and a net of width ``rank``; cached (what is installed does not change while the process
    runs)."""
    key = (backend, x0.device.type, x0.dtype, rank)
    hit = _STATUS.get(key)
    if hit is None:
        hit = _STATUS[key] = _status(backend, x0, rank)
    return hit


def _status(backend: str, x0: torch.Tensor, rank: int) -> Tuple[bool, str]:
    if backend == "cpp":
        return gate_net_cpp_status(x0)
    if backend != "triton":
        return False, f"no gate-net kernels for backend {backend!r}"
    from ..gate import triton as gate_triton
    ok, why = gate_triton.available(x0.device)
    if not ok:
        return ok, why
    from . import triton as tr
    if x0.dtype not in tr.DTYPES:
        return False, f"the Triton gate net supports float32 and float64, not {x0.dtype}"
    if rank > tr.MAX_RANK:
        return False, f"the Triton gate net supports ranks up to {tr.MAX_RANK}, not {rank}"
    return True, ""


def _cpp_fwd(x0, w_down, b_down, w_up, b_up, num_additive, phi):
    return torch.ops.mmea_kernels_ext.gate_net_fwd.default(x0, w_down, b_down, w_up, b_up, num_additive,
                                                           PHI_CODES[phi])


def _cpp_bwd(x0, w_down, b_down, w_up, gates, dadd, dgates, num_additive, phi, need_x, need_w):
    return torch.ops.mmea_kernels_ext.gate_net_bwd.default(x0, w_down, b_down, w_up, gates, dadd, dgates,
                                                           num_additive, PHI_CODES[phi], need_x, need_w)


def _kernels(backend: str):
    """(forward, backward) kernel functions of ``backend`` (same signatures; no autograd)."""
    if backend == "triton":
        from . import triton as tr
        return tr.triton_gate_net_fwd, tr.triton_gate_net_bwd
    return _cpp_fwd, _cpp_bwd


class _GateNetFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, w_down, b_down, w_up, b_up, num_additive, phi, backend):
        ctx.set_materialize_grads(False)
        ctx.num_additive, ctx.phi, ctx.backend = num_additive, phi, backend
        add, gates = _kernels(backend)[0](x0, w_down, b_down, w_up, b_up, num_additive, phi)
        ctx.save_for_backward(x0, w_down, b_down, w_up, gates)
        return add, gates

    @staticmethod
    def backward(ctx, dadd, dgates):
        x0, w_down, b_down, w_up, gates = ctx.saved_tensors
        grads = gate_net_grads(x0, w_down, b_down, w_up, gates, dadd, dgates, ctx.num_additive, ctx.phi,
                               ctx.backend, ctx.needs_input_grad[:5])
        return grads + (None, None, None)


def gate_net_grads(x0, w_down, b_down, w_up, gates, dadd, dgates, num_additive: int, phi: str, backend: str, need):
    """``(dx0, dW_down, db_down, dW_up, db_up)`` of the gate net for the output gradients ``dadd``,
    ``dgates`` (either may be None; ``gates``: the forward's output), None where ``need`` (five
    flags) says so. With grad mode off (no graph) one kernel call of ``backend``, any row strides
    (``dadd`` may be a column slice of the linear's dy); with it on (create_graph) the
    differentiable formulas."""
    nx, nwd, nbd, nwu, nbu = need
    if (dadd is None and dgates is None) or not any(need):
        return (None,) * 5
    if torch.is_grad_enabled():  # create_graph: differentiable formulas
        grads = _backward_formulas(x0, w_down, b_down, w_up, gates, dadd, dgates, num_additive, phi)
    else:
        grads = _kernels(backend)[1](x0, w_down, b_down, w_up, gates, dadd, dgates, num_additive, phi, nx,
                                     nwd or nbd or nwu or nbu)
    return tuple(g if n else None for g, n in zip(grads, need))


def gate_net(x0: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
             b_up: torch.Tensor, num_additive: int, phi: str = "exp", backend: Optional[str] = None):
    """``(add [N, A], gates [N, G])`` of the MMEA gate network for 2-D ``x0 [N, S]`` (any row stride).

    ``backend``: ``"cpp"`` (the fused C++ kernels, CPU) or ``"triton"`` (the Triton kernels: CUDA, or
    CPU under the interpreter), each raising with the reason when it cannot run; ``"torch"``
    (:func:`gate_net_reference`); or ``None`` (cpp when available, else torch).
    Differentiable to any order in every tensor argument.
    """
    if phi not in PHI_CODES:
        raise ValueError(f"unknown phi {phi!r}; expected one of {tuple(PHI_CODES)}")
    if x0.dim() != 2:
        raise ValueError(f"gate_net: x0 must be 2-D [N, S], got shape {tuple(x0.shape)}")
    if backend not in (None, "cpp", "torch", "triton"):
        raise ValueError(f"gate_net: unknown backend {backend!r}; expected 'cpp', 'triton', 'torch' or None")
    if backend != "torch":
        kernels = backend or "cpp"
        ok, why = gate_net_status(kernels, x0, w_down.shape[0])
        if ok:
            return gate_net_kernels(x0, w_down, b_down, w_up, b_up, num_additive, phi, kernels)
        if backend is not None:
            raise RuntimeError(f"gate_net: the {backend} backend cannot run: {why}")
    return gate_net_reference(x0, w_down, b_down, w_up, b_up, num_additive, phi)


def gate_net_kernels(x0, w_down, b_down, w_up, b_up, num_additive: int, phi: str, backend: str):
    """:func:`gate_net` on the ``backend`` kernels, for a caller that checked the inputs and
    :func:`gate_net_status` already (the adapters' hot path)."""
    if x0.shape[1] > 1 and x0.stride(1) != 1:
        x0 = x0.contiguous()
    if not torch.is_grad_enabled() or not (x0.requires_grad or w_down.requires_grad or b_down.requires_grad
                                            or w_up.requires_grad or b_up.requires_grad):
        # no graph to build (inference, a frozen net on frozen features): the kernel itself, without
        # the autograd node's per-call cost (tens of µs of host time at MD sizes)
        return _kernels(backend)[0](x0, w_down, b_down, w_up, b_up, int(num_additive), phi)
    return _GateNetFn.apply(x0, w_down, b_down, w_up, b_up, int(num_additive), phi, backend)


def _register_fakes() -> None:
    """Shape-only implementations of the C++ gate net for FakeTensor tracing (torch.compile,
    torch.export / make_fx of a scripted-form adapter whose C++ autograd calls these ops)."""
    from ..gate.cpp import register_fakes

    def fwd_fake(x0, w_down, b_down, w_up, b_up, num_additive, phi):
        n = x0.shape[0]
        return x0.new_empty((n, num_additive)), x0.new_empty((n, w_up.shape[0] - num_additive))

    def bwd_fake(x0, w_down, b_down, w_up, gates, dadd, dgates, num_additive, phi, need_x0, need_weights):
        dx0 = x0.new_empty((x0.shape[0] if need_x0 else 0, x0.shape[1]))
        if not need_weights:
            return (dx0,) + tuple(x0.new_empty((0,)) for _ in range(4))
        return (dx0, x0.new_empty(tuple(w_down.shape)), x0.new_empty((w_down.shape[0],)),
                x0.new_empty(tuple(w_up.shape)), x0.new_empty((w_up.shape[0],)))

    register_fakes((("mmea_kernels_ext::gate_net_fwd", fwd_fake), ("mmea_kernels_ext::gate_net_bwd", bwd_fake)))


if _ext_status()[0]:
    _register_fakes()
