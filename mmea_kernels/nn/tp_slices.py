"""One split instead of many slices in e3nn's generated code (``split_tp_slices``).

e3nn's ``TensorProduct`` and ``Linear`` run code generated as a ``torch.fx`` graph that takes every
irrep block of an input, and every instruction's weights, as its own column slice of a 2-D tensor
(``x[:, a:b]`` / ``x.narrow(-1, a, n)``). The backward of each slice allocates a zero tensor of the
whole input's size, copies the slice's gradient into it, and autograd adds those tensors up: for
SevenNet-0's convolutions, whose weights (one row per edge, 3,136 columns) are cut into one slice per
instruction, the zero-fills alone were about a fifth of a force-training step on CPU (profiler).
``torch.split`` gives the same views, and its backward writes all the gradients into one tensor at
once.

``split_tp_slices(model)`` rewrites, in place, the generated graphs of every e3nn ``TensorProduct``
and ``Linear`` in ``model``: each tensor cut into two or more disjoint column slices is split once,
and the slices become the split's pieces. Values and derivatives of every order are bitwise equal
(the same views; the gradients are the same numbers placed by a concatenation instead of a sum of
zero-padded copies). Parameters, buffers and the state dict are untouched. Graphs already
rewritten are left as they are (a second call changes nothing).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

from torch import fx, nn

_GRAPH_ATTRS = ("_compiled_main_left_right", "_compiled_main_right", "_compiled_main")


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


def split_graph_slices(gm: fx.GraphModule) -> int:
    """Rewrites one generated graph in place; returns how many tensors are now split once."""
    graph = gm.graph
    groups: Dict[fx.Node, List[Tuple[int, int, fx.Node]]] = {}
    for node in graph.nodes:
        found = _column_slice(node)
        if found is not None:
            groups.setdefault(found[0], []).append((found[1], found[2], node))
    count = 0
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


def split_tp_slices(model: nn.Module) -> int:
    """Rewrites the generated graphs of every e3nn ``TensorProduct`` and ``Linear`` in ``model`` (see
    the module docstring); returns the number of modules changed (0: nothing to do, e.g. a model
    without e3nn layers, or one rewritten before)."""
    changed = 0
    for module in model.modules():
        hit = 0
        for attr in _GRAPH_ATTRS:
            gm = module._modules.get(attr)
            if isinstance(gm, fx.GraphModule):
                hit += split_graph_slices(gm)
        changed += hit > 0
    return changed
