"""Helpers shared by the op families: the optional triton import, interpreter detection, tile
sizes and the CUDA device guard of kernel launches."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

try:  # triton is optional: the package must import without it
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = exc

# Whether @triton.jit kernels were decorated in interpreter mode (fixed when this module is imported).
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"

# CUDA caps grid dimensions 1 and 2 at 65,535 (dimension 0 at 2**31 - 1).
MAX_GRID_DIM0 = 2**31 - 1


_REFUSALS = (ValueError, TypeError, RuntimeError)  # what a decision may raise, re-raised as itself


def decided_once(fn):
    """``torch.compiler.assume_constant_result`` (the call is made once while tracing, its result a
    constant of the graph) for a decision that may refuse its arguments: the refusal comes back as a
    value and is raised by the caller as the same ValueError/TypeError/RuntimeError (raised inside,
    dynamo wrapped it in an InternalTorchDynamoError, which ``except ValueError`` missed)."""
    @torch.compiler.assume_constant_result
    def attempt(*args):
        try:
            return True, fn(*args)
        except _REFUSALS as exc:
            return False, next(i for i, c in enumerate(_REFUSALS) if isinstance(exc, c)), str(exc)

    @functools.wraps(fn)
    def decide(*args):
        out = attempt(*args)
        if out[0]:
            return out[1]
        raise _REFUSALS[out[1]](out[2])

    return decide


def rows2d(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t [..., dim]`` as ``[rows, dim]``; also for ``dim == 0``, where ``reshape(-1, 0)`` is ambiguous
    (TorchScript compiles it: the exported adapters call it)."""
    if dim > 0:
        return t.reshape(-1, dim)
    rows = 1
    for s in t.shape[:-1]:
        rows *= s
    return t.reshape(rows, 0)


def cols32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``, or a contiguous copy where a column offset times its column stride would pass int32
    (the triton kernels offset rows in 64 bits, columns in 32: a transposed [N, D] view of more than
    2**31 elements would be read out of place on a GPU)."""
    if t is not None and t.dim() == 2 and t.shape[1] > 1 and (t.shape[1] - 1) * abs(t.stride(1)) > 2**31 - 1:
        return t.contiguous()
    return t


def pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def interpreting(device: torch.device) -> bool:
    """Whether triton kernels run through the interpreter for tensors on ``device``."""
    return device.type != "cuda" or INTERPRETED_AT_IMPORT


def device_guard(device: torch.device):
    """Launch on ``device`` (not the current CUDA device): triton launches go to the current one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_grid(grid, what: str):
    """``grid`` unchanged, after checking CUDA's limits (a clear error instead of a launch failure)."""
    if grid[0] > MAX_GRID_DIM0 or any(g > 65535 for g in grid[1:]):
        raise RuntimeError(f"{what}: launch grid {tuple(grid)} exceeds CUDA's limits "
                           f"({MAX_GRID_DIM0} x 65535 x 65535); split the input into fewer rows")
    return grid


def tensor_slots(*inputs) -> tuple:
    """For each forward input, its position among the tensor inputs (-1 for None and non-tensors):
    ``ctx.next_functions`` of an autograd.Function has one entry per tensor input only."""
    out, k = [], 0
    for t in inputs:
        if isinstance(t, torch.Tensor):
            out.append(k)
            k += 1
        else:
            out.append(-1)
    return tuple(out)


def grad_needed(ctx, i: int, slot: Optional[int] = None) -> bool:
    """``ctx.needs_input_grad[i]``, narrowed to the backward pass that is running: False when the
    autograd engine will not run the node that receives input ``i``'s gradient (``slot``: its
    position among the tensor inputs, see :func:`tensor_slots`; ``i`` when every input before it
    is a tensor). Forces are ``-dE/dpositions`` taken with trainable adapters: the gates (and a
    trainable weight) then need a gradient in general but not in this pass, and computing it would
    cost a seg_dot (and, in the fused linear, a recomputed linear or a weight-gradient kernel) per
    layer. Inside a pass traced by torch.compile, or where the engine cannot be asked, it counts
    as needed."""
    return grads_needed(ctx, (i,), {i: i if slot is None else slot})[0]


def grads_needed(ctx, inputs, slots) -> tuple:
    """:func:`grad_needed` for each input index in ``inputs`` (``slots[i]``: input ``i``'s position
    among the tensor inputs, see :func:`tensor_slots`), reading ``ctx.next_functions`` (a fresh
    tuple per access) once for all of them instead of once per input."""
    needs = ctx.needs_input_grad
    if not any(needs[i] for i in inputs):
        return (False,) * len(inputs)
    if torch.compiler.is_compiling():
        return tuple(bool(needs[i]) for i in inputs)
    try:
        nf = ctx.next_functions
    except AttributeError:  # not inside an engine-run backward
        return tuple(bool(needs[i]) for i in inputs)
    out = []
    for i in inputs:
        need = bool(needs[i])
        if need:
            try:
                node = nf[slots[i]][0]
                need = node is None or bool(torch._C._will_engine_execute_node(node))
            except (IndexError, RuntimeError):  # e.g. the leaf an autograd.grad() call asks for
                need = True
        out.append(need)
    return tuple(out)


from torch._subclasses.fake_tensor import is_fake as _is_fake  # noqa: E402  (per-call import costs µs)


def forward_mode(*ts) -> bool:
    """Whether any of ``ts`` (tensors or None) carries a forward-mode tangent or is wrapped by a
    torch.func transform (``jvp``, ``jacfwd``, ``grad``, ``jacrev``, ``vmap``): the compiled kernels
    have no forward-mode formula and would drop the tangent, so callers run the differentiable torch
    reference instead."""
    if not transform_active():
        return False
    for t in ts:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def transform_active() -> bool:
    """Whether a forward-AD dual level or a torch.func transform is active (0.1 µs; tensors with
    tangents or transform wrappers exist only then)."""
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


def reference_needed(*ts) -> bool:
    """Whether the differentiable torch reference must run instead of a kernel or custom op: a
    forward-AD level or torch.func transform is active and a tensor carries its tangent or wrapper
    (:func:`forward_mode`) or the call is traced: under torch.compile the custom ops gave a zero
    tangent inside ``torch.func.jvp`` (no forward-mode formula) and ``jacrev`` refused them."""
    if torch.compiler.is_compiling():  # the dual level is a guarded global; the functorch stack is read once
        return torch.autograd.forward_ad._current_level >= 0 or _functorch_active_traced()  # (a graph break broke jacrev)
    if not transform_active():
        return False
    t0 = next((t for t in ts if t is not None), None)
    return (t0 is not None and traced(t0)) or forward_mode(*ts)


_functorch_active_traced = torch.compiler.assume_constant_result(
    lambda: torch._C._functorch.maybe_current_level() is not None)


def traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is being traced (torch.compile, or fake tensors of another tracer): there only
    the ``torch.library`` custom ops can run; eager code calls their kernels directly."""
    if torch.compiler.is_compiling():
        return True
    if type(t) is torch.Tensor and not torch._is_functional_tensor(t) \
            and not torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False  # a plain tensor, wrapping nothing: not fake (is_fake's own checks cost ~10 µs)
    return _is_fake(t)


def eager_function(name: str, setup, kernel, backward):
    """A plain ``torch.autograd.Function`` computing ``kernel(*inputs)`` with a custom op's
    ``setup_context`` and backward (``ctx.eager`` is True there, so the backward can call the eager
    forms; a custom op's own setup sets it False). Eager calls skip the custom op's dispatch, which
    costs ~0.1 ms of host time per call."""
    def forward(ctx, *inputs):
        setup(ctx, inputs, None)
        ctx.eager = True
        return kernel(*inputs)
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})
