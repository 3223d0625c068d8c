"""One split instead of many slices in e3nn's generated code (``split_tp_slices``).

e3nn's ``TensorProduct`` and ``Linear`` run code generated as a ``torch.fx`` graph that takes every
irrep block of an input, and every instruction's weights, as its own column slice of a 2-D tensor
(``x[:, a:b]`` / ``x.narrow(-1, a, n)``). The backward of each slice allocates a zero tensor of the
whole input's size, copies the slice's gradient into it, and autograd adds those tensors up.
``torch.split`` gives the same views, and its backward writes all the gradients into one tensor at
once. The graph's output is the ``torch.cat`` of the instructions' outputs; cat's backward narrows
the gradient once per instruction, and force training differentiates that backward again, so each
of those narrows zero-fills a copy of the whole output: for SevenNet-0's convolutions, 15 per layer
of [edges, 3,136] (about 40 % of the CPU time of a force-training step, profiler, 4 aspirin).
The rewritten cat (:func:`cat_split_backward`) computes the same cat with a backward that splits
the gradient once.

``split_tp_slices(model)`` rewrites, in place, the generated graphs of every e3nn ``TensorProduct``
and ``Linear`` in ``model``: each tensor cut into two or more disjoint column slices is split once,
and the slices become the split's pieces; each cat of two or more tensors becomes
:func:`cat_split_backward` (``cats=False``: not). Values and derivatives of every order are bitwise
equal (the same views; the gradients are the same numbers placed by a concatenation instead of a
sum of zero-padded copies), forward-mode and ``torch.func`` included. TorchScript and
``torch.compile`` run the plain cat. Parameters, buffers and the state dict are untouched. Graphs
already rewritten are left as they are (a second call changes nothing).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn

_GRAPH_ATTRS = ("_compiled_main_left_right", "_compiled_main_right", "_compiled_main")


class _Cat(torch.autograd.Function):
    """``torch.cat(xs, dim)`` whose backward splits the gradient once (``torch.split``). cat's own
    backward narrows it once per input; under ``create_graph`` (force training differentiates that
    backward again) each narrow's backward zero-fills a tensor of the whole output's size: for
    SevenNet-0's convolutions, 15 per layer of [edges, 3,136]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dim: int, *xs):
        return torch.cat(xs, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dim, *xs = inputs
        ctx.dim, ctx.shapes = dim, [x.shape for x in xs]

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.split([s[ctx.dim] for s in ctx.shapes], ctx.dim))

    @staticmethod
    def jvp(ctx, _, *tangents):
        like = next(t for t in tangents if t is not None)
        return torch.cat([like.new_zeros(s) if t is None else t for t, s in zip(tangents, ctx.shapes)], ctx.dim)


@torch.jit.unused
def _cat_fn(tensors: List[torch.Tensor], dim: int) -> torch.Tensor:
    proxy = next((t for t in tensors if isinstance(t, fx.Proxy)), None)
    if proxy is not None:  # symbolic tracing (e3nn unpickles its graphs by tracing their code): one node
        return proxy.tracer.create_proxy("call_function", cat_split_backward, (list(tensors), dim), {})
    # under torch.compile the plain cat (dynamo does not trace a Function with a custom jvp; the
    # compiled backward is generated anyway)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(t.requires_grad for t in tensors):
        return _Cat.apply(dim, *tensors)
    return torch.cat(tensors, dim)


def cat_split_backward(tensors: List[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(tensors, dim)``, the same values and derivatives, with a backward that splits the
    gradient once where a gradient is recorded (:class:`_Cat`); TorchScript compiles the plain cat."""
    if torch.jit.is_scripting():
        return torch.cat(tensors, dim)
    return _cat_fn(tensors, dim)


def _width(node: fx.Node) -> Optional[int]:
    """D when ``node`` is ``reshape(t, -1, D)`` (a 2-D tensor of known width), else None."""
    if node.op == "call_method" and node.target == "reshape" and len(node.args) == 3 and node.args[1] == -1:
        d = node.args[2]
        return d if isinstance(d, int) and d >= 0 else None
    return None


def _column_slice(node: fx.Node) -> Optional[Tuple[fx.Node, int, int]]:
    """(parent, start, stop) when ``node`` is ``parent[:, start:stop]`` or ``parent.narrow(-1 or 1,
    start, length)`` with constant bounds, else None."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        parent, idx = node.args
        if (isinstance(parent, fx.Node) and isinstance(idx, tuple) and len(idx) == 2
                and idx[0] == slice(None, None, None) and isinstance(idx[1], slice)):
            s = idx[1]
            if s.step in (None, 1) and isinstance(s.start, int) and isinstance(s.stop, int):
                return parent, s.start, s.stop
    if node.op == "call_method" and node.target == "narrow" and len(node.args) == 4 and not node.kwargs:
        parent, dim, start, length = node.args
        if isinstance(parent, fx.Node) and dim in (-1, 1) and isinstance(start, int) and isinstance(length, int):
            return parent, start, start + length
    return None


def _pieces(items: List[Tuple[int, int, fx.Node]], width: int) -> Optional[Tuple[List[int], Dict[fx.Node, int]]]:
    """The split sizes covering [0, width) and each slice's piece, when the slices are disjoint,
    non-empty and inside [0, width); else None."""
    items = sorted(items, key=lambda t: (t[0], t[1]))
    sizes: List[int] = []
    index: Dict[fx.Node, int] = {}
    pos = 0
    for start, stop, node in items:
        if start < pos or stop <= start or stop > width:
            return None
        if start > pos:
            sizes.append(start - pos)
        index[node] = len(sizes)
        sizes.append(stop - start)
        pos = stop
    if pos < width:
        sizes.append(width - pos)
    return sizes, index


def _cat_args(node: fx.Node) -> Optional[Tuple[list, int]]:
    """(tensors, dim) when ``node`` is ``torch.cat`` of two or more tensors along a constant dim."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int):
        return None
    return list(tensors), dim


def split_graph_slices(gm: fx.GraphModule, cats: bool = True) -> int:
    """Rewrites one generated graph in place; returns how many tensors are now split once (sliced
    inputs, and with ``cats`` concatenated outputs whose backward now splits their gradient once)."""
    graph = gm.graph
    groups: Dict[fx.Node, List[Tuple[int, int, fx.Node]]] = {}
    count = 0
    for node in graph.nodes:
        found = _column_slice(node)
        if found is not None:
            groups.setdefault(found[0], []).append((found[1], found[2], node))
        cat = _cat_args(node) if cats else None
        if cat is not None:
            node.target, node.args, node.kwargs = cat_split_backward, (cat[0], cat[1]), {}
            count += 1
    for parent, items in groups.items():
        width = _width(parent)
        plan = _pieces(items, width) if width is not None and len(items) > 1 else None
        if plan is None:
            continue
        sizes, index = plan
        with graph.inserting_after(parent):
            split = graph.call_method("split", (parent, sizes), {"dim": -1})
        for node, k in index.items():
            with graph.inserting_before(node):
                piece = graph.call_function(operator.getitem, (split, k))
            node.replace_all_uses_with(piece)
            graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def split_tp_slices(model: nn.Module, cats: bool = True) -> int:
    """Rewrites the generated graphs of every e3nn ``TensorProduct`` and ``Linear`` in ``model`` (see
    the module docstring); returns the number of modules changed (0: nothing to do, e.g. a model
    without e3nn layers, or one rewritten before)."""
    changed = 0
    for module in model.modules():
        hit = 0
        for attr in _GRAPH_ATTRS:
            gm = module._modules[attr] if attr in module._modules else None  # a ScriptModule's has no .get
            if isinstance(gm, fx.GraphModule):
                hit += split_graph_slices(gm, cats)
        changed += hit > 0
    return changed


def plain_cats(model: nn.Module) -> int:
    """Undo the cat rewrite of :func:`split_tp_slices`: every :func:`cat_split_backward` in the
    generated graphs of ``model`` becomes ``torch.cat`` again (the same values; the backward narrows
    per piece again). The splits stay: they are plain torch ops. For files that must load without this
    package (a pickled graph names the functions it calls). Returns the number of graphs changed."""
    changed = 0
    for module in model.modules():
        for attr in _GRAPH_ATTRS:
            gm = module._modules[attr] if attr in module._modules else None  # a ScriptModule's has no .get
            if not isinstance(gm, fx.GraphModule):
                continue
            nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is cat_split_backward]
            for node in nodes:
                node.target = torch.cat
            if nodes:
                gm.recompile()
                changed += 1
    return changed
