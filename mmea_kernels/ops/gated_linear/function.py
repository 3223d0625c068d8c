"""Autograd and public entry point of the fused equivariant linear + MMEA gate: ``y = G ⊙ (Linear_W(x) + bias) + additive``.

``Linear_W`` is an ``e3nn.o3.Linear`` (described by a :class:`~mmea_kernels.linear_spec.LinearSpec`),
``G`` gates every (non-0e block, multiplicity) of the output (per row ``[N, G]`` or shared
``[G]``), and ``bias``/``additive`` are added on the 0e output columns (where there is no gate,
so ``G ⊙ (L + b) = G ⊙ L + b`` there).

Two kernel backends compute the generalised map ``y = G_post ⊙ L_W(G_pre ⊙ x) (+ bias + additive)``,
with optional prologue gates on the input columns, and its weight gradient: ``"triton"``
(triton_kernels.py; CUDA, or CPU under the interpreter) and ``"cpp"`` (cpp_kernels.py: the C++
extension, CPU). The autograd below takes the kernel backend as a parameter and runs the gate ops
(gate_mul, seg_dot) on the same backend. It is closed:

* ``dx = G_pre ⊙ L_W^T(G_post ⊙ dy)``: the same op on ``spec.transposed`` (which reads ``W_i^T``
  from the same flat weight through swapped strides), with the two gate roles swapped;
* ``dG_post = seg_dot_out(dy, L_W(G_pre ⊙ x))`` and ``dG_pre = seg_dot_in(x, L_W^T(G_post ⊙ dy))``;
* ``dW_i = path_weight · Σ_{n,m} (G_pre ⊙ x)[n, u, m] (G_post ⊙ dy)[n, w, m]``: the weight-gradient
  kernel, whose own backward is again the op: ``<C, dW(x, dy)> = <G_post ⊙ L_C(G_pre ⊙ x), dy>``;
* bias / additive gradients: column sums / column selections of ``dy``.

Every piece is autograd-capable, so any order of derivative runs the same kernels.

The pre-gate output ``u = L_W(G_pre ⊙ x)`` needed by ``dG_post``:

* For the public call (no prologue gate) with a gate that needs a gradient (grad mode on,
  ``gates.requires_grad``), on either kernel backend, it is *saved*: :class:`_SavedOutputFn` returns
  ``(y, u)`` from one kernel (cpp ``gated_linear_fwd_u``, triton ``HAS_U``: the epilogue stores ``u``
  next to ``y`` from the same accumulator, no extra GEMM), saves ``u`` as an *output* and drops it
  from the public result. A saved output stays on the graph: in a ``create_graph`` backward the
  unpacked ``u`` has this node as its ``grad_fn``, so ``dG = seg_dot(dy, u)`` routes its own
  gradient back into this node's backward as ``du`` (the gradient of ``u = L_W(x)``), which adds
  ``L_W^T(du)`` to ``dx`` and ``dW(x, du)`` to ``dW``: the backward runs on ``dz = G ⊙ dy + du``
  (with ``du`` absent, ``G ⊙ dy`` stays a prologue gate of the kernels). Every order of derivative
  is therefore exact, force training included. (A tensor kept any other way, e.g. on ``ctx`` or
  detached, would be a constant there and lose its dependence on ``x`` and ``W``.) Memory: one
  ``[N, D_out]`` activation per layer while the gates need a gradient, as the unfused path, which
  saves the base layer's output for its gate.
* Everywhere else (the backward's own calls with prologue gates) it is
  *recomputed* in the backward: one extra launch, only when the gates need a gradient.
  Inference, frozen gates and calls without gates run the forward that writes ``y`` only.

Two costs that matter at MD sizes (a few hundred rows, where per-call overheads are a visible share):

* :func:`~.adapter.split_scalars` gives :class:`~mmea_kernels.nn.MMEALinear` its kernel input and its gate
  net's 0e input as two outputs of one node, so the gate net's ``[N, S]`` input gradient is added
  into the kernel's ``[N, D_in]`` input gradient in place, not through a zero-filled ``[N, D_in]``
  slice gradient and an add pass.
* With grad mode off (inference, and any backward that builds no graph) ``_core`` and ``_seg_dot``
  call the kernels directly instead of going through an autograd node or the custom op's dispatch.

Under ``torch.compile`` the generalised op and the weight gradient are ``torch.library`` custom ops
(``torch.ops.mmea_kernels.gated_linear`` / ``...gated_linear_wgrad``: fake implementations, the same
setup and backward as the autograd functions, the spec passed as its key string), so a compiled
model keeps the fused kernels as single nodes (``mmea_kernels::gated_linear_u`` is the saved-output
form); the backward's own calls are the custom ops too, so every order of derivative traces.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .._utils import decided_once, grad_needed, reference_needed, rows2d, tensor_slots, traced
from ..backends import resolve_backend
from ..gate.function import gate_mul, seg_dot
from ..tables import layout_tables
from ...linear_spec import LinearSpec
from .cpp_kernels import CPP_DTYPES, cpp_built, cpp_forward, cpp_forward_u, cpp_tables, cpp_wgrad
from .reference import gated_linear_reference, validate
from .triton_kernels import tables, triton_forward, triton_forward_u, triton_wgrad

__all__ = ["gated_linear", "gated_linear_prepared", "kernel_backend", "_core"]


# ============================================================================ autograd
def _shared(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.dim() == 1


def _forward_kernel(backend: str):
    return cpp_forward if backend == "cpp" else triton_forward  # looked up per call (tests patch them)


def _forward_u_kernel(backend: str):
    return cpp_forward_u if backend == "cpp" else triton_forward_u


def _wgrad_kernel(backend: str):
    return cpp_wgrad if backend == "cpp" else triton_wgrad


def _tables(spec: LinearSpec, t: torch.Tensor, backend: str):
    return cpp_tables(spec, t.device) if backend == "cpp" else tables(spec, t.device, t.dtype)


# the custom ops take the spec as LinearSpec.key_text (the same in every process, so compiled graphs
# that hold it stay valid); read back once per key
_spec_of_key = functools.lru_cache(maxsize=None)(LinearSpec.from_key_text)


def _spec_of(spec) -> LinearSpec:
    return spec if isinstance(spec, LinearSpec) else _spec_of_key(spec)


# The generalised op and its weight gradient as torch.library custom ops: what torch.compile traces
# (one node each, with fake implementations). Eager calls use the autograd functions below, with
# the same setup and backward (``ctx.spec`` is the LinearSpec; the custom ops carry its key).
@torch.library.custom_op("mmea_kernels::gated_linear", mutates_args=())
def _gated_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
                     additive: Optional[torch.Tensor], key: str, backend: str) -> torch.Tensor:
    return _forward_kernel(backend)(x, weight, bias, g_pre, g_post, additive, _spec_of_key(key))


@_gated_linear_op.register_fake
def _(x, weight, bias, g_pre, g_post, additive, key, backend):
    return x.new_empty((x.shape[0], _spec_of_key(key).dim_out))


@torch.library.custom_op("mmea_kernels::gated_linear_wgrad", mutates_args=())
def _wgrad_op(a: torch.Tensor, b: torch.Tensor, g_pre: Optional[torch.Tensor], g_post: Optional[torch.Tensor],
              key: str, backend: str) -> torch.Tensor:
    return _wgrad_kernel(backend)(a, b, g_pre, g_post, _spec_of_key(key))


@_wgrad_op.register_fake
def _(a, b, g_pre, g_post, key, backend):
    return a.new_empty((_spec_of_key(key).weight_numel,))


def _gated_linear_setup(ctx, inputs, output):
    x, weight, bias, g_pre, g_post, additive, spec, backend = inputs
    ctx.spec, ctx.backend = _spec_of(spec), backend
    ctx.add_shared = _shared(additive)
    ctx.slots = tensor_slots(x, weight, bias, g_pre, g_post, additive)
    ctx.save_for_backward(x, weight, g_pre, g_post)


def _gated_linear_backward(ctx, dy):
    x, weight, g_pre, g_post = ctx.saved_tensors
    spec: LinearSpec = ctx.spec
    be = ctx.backend
    nx, nw, npre, npost = (grad_needed(ctx, i, ctx.slots[i]) for i in (0, 1, 3, 4))
    nb, nadd = ctx.needs_input_grad[2], ctx.needs_input_grad[5]
    dx = dw = db = dpre = dpost = dadd = None
    T = spec.transposed
    if npre:
        v = _core(dy, weight, None, g_post, None, None, T, be)  # L^T(G_post ⊙ dy)
        dpre = _seg_dot(x, v, spec.in_layout, _shared(g_pre), be)
        if nx:
            dx = gate_mul(v, g_pre, spec.in_layout, backend=be)
    elif nx:
        dx = _core(dy, weight, None, g_post, g_pre, None, T, be)
    if npost:
        u = _core(x, weight, None, g_pre, None, None, spec, be)  # pre-gate output, recomputed
        dpost = _seg_dot(dy, u, spec.out_layout, _shared(g_post), be)
    if nw:
        dw = _wgrad(x, dy, g_pre, g_post, spec, be)
    db, dadd = _affine_grads(dy, nb, nadd, ctx.add_shared, spec, be)
    return dx, dw, db, dpre, dpost, dadd, None, None


class _GatedLinearFn(torch.autograd.Function):
    """``y = G_post ⊙ L_W(G_pre ⊙ x) + bias + additive`` (x, gates, additive 2-D or shared 1-D), on the
    kernels of ``backend`` ("triton" or "cpp")."""

    @staticmethod
    def forward(ctx, x, weight, bias, g_pre, g_post, additive, spec, backend):
        _gated_linear_setup(ctx, (x, weight, bias, g_pre, g_post, additive, spec, backend), None)
        return _forward_kernel(backend)(x, weight, bias, g_pre, g_post, additive, spec)

    backward = staticmethod(_gated_linear_backward)


@torch.library.custom_op("mmea_kernels::gated_linear_u", mutates_args=())
def _gated_linear_u_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], g_post: torch.Tensor,
                       additive: Optional[torch.Tensor], key: str, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward_u_kernel(backend)(x, weight, bias, None, g_post, additive, _spec_of_key(key))


@_gated_linear_u_op.register_fake
def _(x, weight, bias, g_post, additive, key, backend):
    d = _spec_of_key(key).dim_out
    return x.new_empty((x.shape[0], d)), x.new_empty((x.shape[0], d))


def _saved_output_setup(ctx, inputs, output):
    x, weight, bias, g_post, additive, spec, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.backend = _spec_of(spec), backend
    ctx.add_shared = _shared(additive)
    ctx.slots = tensor_slots(x, weight, bias, g_post, additive)
    ctx.save_for_backward(x, weight, g_post, output[1])


def _saved_output_backward(ctx, dy, du):
    x, weight, g_post, u = ctx.saved_tensors
    need = tuple(grad_needed(ctx, i, ctx.slots[i]) for i in (0, 1, 3)) + (ctx.needs_input_grad[2],
                                                                          ctx.needs_input_grad[4])
    dx, dw, db, dpost, dadd = saved_output_grads(x, weight, g_post, u, dy, du, need, ctx.add_shared, ctx.spec,
                                                 ctx.backend)
    return dx, dw, db, dpost, dadd, None, None


def saved_output_grads(x, weight, g_post, u, dy, du, need, add_shared: bool, spec: LinearSpec, be: str):
    """``(dx, dW, dbias, dG, dadditive)`` of ``y = G ⊙ u + bias + additive``, ``u = L_W(x)`` (saved),
    for the output gradients ``dy`` and ``du`` (either may be None; ``du`` comes from a create_graph
    backward that used ``u``: the output ``u`` then gets ``dz = G ⊙ dy + du``). ``need``: (x, W, G,
    bias, additive) flags; None where not needed. Differentiable when grad mode is on."""
    nx, nw, npost, nb, nadd = need
    dx = dw = dpost = db = dadd = None
    T = spec.transposed
    dz = du  # None: G ⊙ dy is applied inside the kernels (prologue gate), never materialised
    if du is not None and dy is not None:
        dz = gate_mul(dy, g_post, spec.out_layout, backend=be) + du
    if nx and dz is not None:
        dx = _core(dz, weight, None, None, None, None, T, be)
    elif nx and dy is not None:
        dx = _core(dy, weight, None, g_post, None, None, T, be)
    if npost and dy is not None:
        dpost = _seg_dot(dy, u, spec.out_layout, _shared(g_post), be)  # the saved u: no recompute
    if nw and dz is not None:
        dw = _wgrad(x, dz, None, None, spec, be)
    elif nw and dy is not None:
        dw = _wgrad(x, dy, None, g_post, spec, be)
    if dy is not None:
        db, dadd = _affine_grads(dy, nb, nadd, add_shared, spec, be)
    return dx, dw, db, dpost, dadd


class _SavedOutputFn(torch.autograd.Function):
    """The top-level call with a gate that needs a gradient (cpp or triton kernels): returns ``(y, u)``
    with ``y = G ⊙ u + bias + additive`` and the pre-gate output ``u = L_W(x)`` (no bias), which one
    forward kernel writes and this node saves for ``dG = seg_dot(dy, u)`` (see the module docstring).
    Traced, the custom op ``mmea_kernels::gated_linear_u`` with the same setup and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, g_post, additive, spec, backend):
        y, u = _forward_u_kernel(backend)(x, weight, bias, None, g_post, additive, spec)
        _saved_output_setup(ctx, (x, weight, bias, g_post, additive, spec, backend), (y, u))
        return y, u

    backward = staticmethod(_saved_output_backward)


_gated_linear_u_op.register_autograd(_saved_output_backward, setup_context=_saved_output_setup)


def _affine_grads(dy, nb, nadd, add_shared, spec, be):
    """Gradients of the bias (column sums of dy) and of the additive (its 0e columns of dy)."""
    db = dadd = None
    if nb:
        db = _columns(dy, spec.bias_columns, spec.bias_span, lambda: _tables(spec, dy, be).bias_columns).sum(0)
    if nadd:
        lay = spec.out_layout
        dadd = _columns(dy, lay.scalar_columns, lay.scalar_span, lambda: _tables(spec, dy, be).scalar_columns)
        if add_shared:
            dadd = dadd.sum(0)
    return db, dadd


def _columns(dy, cols, span, table):
    """``dy[:, cols]``: a column slice (a view, no gather pass) when ``cols`` are one range (``span``,
    cached on the spec), else a gather with the index tensor of the cached tables (built in the
    trace when traced)."""
    if span:
        return dy.narrow(1, *span)
    idx = torch.tensor(cols, dtype=torch.long, device=dy.device) if traced(dy) else table()
    return dy.index_select(1, idx)


def _wgrad_setup(ctx, inputs, output):
    a, b, g_pre, g_post, spec, backend = inputs
    ctx.spec, ctx.backend = _spec_of(spec), backend
    ctx.slots = tensor_slots(a, b, g_pre, g_post)
    ctx.save_for_backward(a, b, g_pre, g_post)


def _wgrad_backward(ctx, c):
    # <c, dW(a, b)> = <G_post ⊙ L_c(G_pre ⊙ a), b>: every gradient is the op with weight c
    a, b, g_pre, g_post = ctx.saved_tensors
    spec: LinearSpec = ctx.spec
    be = ctx.backend
    na, nb, npre, npost = (grad_needed(ctx, i, ctx.slots[i]) for i in range(4))
    da, dpre = _wgrad_side(b, a, c, g_post, g_pre, spec.transposed, spec.in_layout, na, npre, be)
    db, dpost = _wgrad_side(a, b, c, g_pre, g_post, spec, spec.out_layout, nb, npost, be)
    return da, db, dpre, dpost, None, None


def _wgrad_side(other, mine, c, g_other, g_mine, op_spec, layout, need_mine, need_gate, be):
    """One operand's share of the weight gradient's backward (the two are mirror images: ``a``'s
    runs the op transposed from ``b``, ``b``'s runs it forward from ``a``): the gradient of ``mine``
    and of its gate ``g_mine``, from the op with weight ``c`` applied to ``other``."""
    if need_gate:
        v = _core(other, c, None, g_other, None, None, op_spec, be)
        dg = _seg_dot(mine, v, layout, _shared(g_mine), be)
        return (gate_mul(v, g_mine, layout, backend=be) if need_mine else None), dg
    if need_mine:
        return _core(other, c, None, g_other, g_mine, None, op_spec, be), None
    return None, None


class _LinearWGradFn(torch.autograd.Function):
    """Flat weight gradient of ``<G_post ⊙ L_W(G_pre ⊙ a), b>``; bilinear in ``(a, b)``."""

    @staticmethod
    def forward(ctx, a, b, g_pre, g_post, spec, backend):
        _wgrad_setup(ctx, (a, b, g_pre, g_post, spec, backend), None)
        return _wgrad_kernel(backend)(a, b, g_pre, g_post, spec)

    backward = staticmethod(_wgrad_backward)


_gated_linear_op.register_autograd(_gated_linear_backward, setup_context=_gated_linear_setup)
_wgrad_op.register_autograd(_wgrad_backward, setup_context=_wgrad_setup)


def _wgrad(a, b, g_pre, g_post, spec, backend):
    """The weight gradient: the custom op when traced, else the kernel (no graph) or the autograd node."""
    if traced(a):
        return torch.ops.mmea_kernels.gated_linear_wgrad(a, b, g_pre, g_post, spec.key_text, backend)
    if not torch.is_grad_enabled():
        return _wgrad_kernel(backend)(a, b, g_pre, g_post, spec)
    return _LinearWGradFn.apply(a, b, g_pre, g_post, spec, backend)


def _core(x, weight, bias, g_pre, g_post, additive, spec, backend="triton"):
    """The generalised op on the kernels of ``backend`` ("triton" or "cpp"); 2-D x, no checks. With
    grad mode off (inference, and every backward that does not build a graph) the kernel is called
    directly: same result, without the autograd node's per-call cost (tens of µs, which matter at
    MD sizes of a few hundred rows). When traced (torch.compile), the custom op."""
    if traced(x):
        return torch.ops.mmea_kernels.gated_linear(x, weight, bias, g_pre, g_post, additive, spec.key_text, backend)
    if not torch.is_grad_enabled():
        return _forward_kernel(backend)(x, weight, bias, g_pre, g_post, additive, spec)
    return _GatedLinearFn.apply(x, weight, bias, g_pre, g_post, additive, spec, backend)


def _top(x, weight, bias, g_post, additive, spec, backend):
    """The public call (no prologue gate): with a gate that needs a gradient, the forward also writes
    the pre-gate output and saves it (:class:`_SavedOutputFn`); otherwise (inference, frozen or no
    gates) the single-output op. Traced (torch.compile), the custom ops of the same two cases."""
    if reference_needed(x, weight, bias, g_post, additive):  # kernels and custom ops would drop tangents
        return gated_linear_reference(x, weight, bias, g_post, additive, spec)
    if g_post is not None and g_post.requires_grad and torch.is_grad_enabled() and spec.out_layout.num_gates > 0:
        if traced(x):
            return torch.ops.mmea_kernels.gated_linear_u(x, weight, bias, g_post, additive, spec.key_text, backend)[0]
        return _SavedOutputFn.apply(x, weight, bias, g_post, additive, spec, backend)[0]
    return _core(x, weight, bias, None, g_post, additive, spec, backend)


def _seg_dot(a, b, layout, shared, backend):
    if layout.num_gates == 0:  # nothing to reduce; keep the shape (and the graph) simple
        return a.new_zeros((layout.num_gates,) if shared else (a.shape[0], 0))
    if not torch.is_grad_enabled() and not traced(a):  # no graph: the backend's kernel, without the op's dispatch
        return resolve_backend(backend, a.device).seg_dot(a.contiguous(), b.contiguous(),
                                                          layout_tables(layout, a.device), bool(shared))
    return seg_dot(a, b, layout, shared=shared, backend=backend)


def gated_linear_prepared(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          gates: Optional[torch.Tensor], additive: Optional[torch.Tensor], spec: LinearSpec,
                          backend: str) -> torch.Tensor:
    """:func:`gated_linear` for a caller that built the operands itself (an adapter's hot path):
    2-D ``x``, gates and additive per row (2-D) or shared (1-D), the kernels ``backend`` ("cpp" or
    "triton") already chosen; skips the shape checks and the backend resolution (tens of µs of host
    time per call). Operands of another dtype or device than ``x`` go through :func:`gated_linear`,
    whose checks name the problem."""
    if weight.dtype != x.dtype or weight.device != x.device or \
            any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in (bias, gates, additive)):
        return gated_linear(x, weight, bias, gates, additive, spec, backend=backend)
    return _top(x, weight, bias, gates, additive, spec, backend)


# ============================================================================ public API
def kernel_backend(backend: Optional[str], x: torch.Tensor) -> Optional[str]:
    """The fused kernels that run for ``x`` under the shared backend selection (``backend=`` /
    ``MMEA_BACKEND`` / auto): "triton" when it picks triton, "cpp" when it picks cpp for a float32 or
    float64 CPU tensor (and the extension has the fused kernels), else None (the reference
    composition)."""
    return _kernel_backend(backend, x.device.type, x.dtype)


@decided_once  # torch.compile: decided once while tracing (env, imports)
def _kernel_backend(backend: Optional[str], device_type: str, dtype: torch.dtype) -> Optional[str]:
    name = resolve_backend(backend, torch.device(device_type)).name
    if name == "triton":
        return "triton"
    if name == "cpp" and device_type == "cpu" and dtype in CPP_DTYPES and cpp_built():
        return "cpp"
    return None


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 gates: Optional[torch.Tensor], additive: Optional[torch.Tensor], spec: LinearSpec,
                 backend: Optional[str] = None) -> torch.Tensor:
    """``y = G ⊙ (Linear_W(x) + bias) + additive`` (additive on the 0e output columns).

    Args:
        x: ``[..., D_in]`` features (``spec.layout``).
        weight: flat ``[spec.weight_numel]`` weight (``o3.Linear.weight``).
        bias: ``[spec.bias_numel]`` or ``None``.
        gates: ``[..., G_out]`` per row, ``[G_out]`` shared, or ``None`` (no gating); one gate per
            (non-0e output block, multiplicity).
        additive: ``[..., S_out]`` per row, ``[S_out]`` shared, or ``None``; one per 0e output column.
        spec: the :class:`LinearSpec` (e.g. ``LinearSpec.from_e3nn(linear, layout)``).
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"cpp"`` (the C++
            extension's fused kernels for float32/float64 CPU tensors; other dtypes and devices run
            the reference composition), ``"torch"`` (the reference composition)
            or ``"auto"``/``None`` (``MMEA_BACKEND``, else triton on CUDA, cpp on CPU when the
            extension is built, torch otherwise).

    All tensors share one dtype and device. Differentiable to any order in every tensor argument.
    """
    validate(x, weight, bias, gates, additive, spec)
    lead = tuple(x.shape[:-1])
    kernels = kernel_backend(backend, x)
    if kernels is None:
        return gated_linear_reference(x, weight, bias, gates, additive, spec)
    x2 = rows2d(x, spec.dim_in)
    N = x2.shape[0]
    g2 = None if gates is None else (gates if gates.dim() == 1 else gates.reshape(N, gates.shape[-1]))
    a2 = None if additive is None else (additive if additive.dim() == 1 else additive.reshape(N, additive.shape[-1]))
    y = _top(x2, weight, bias, g2, a2, spec, kernels)
    return y.reshape(lead + (spec.dim_out,))
