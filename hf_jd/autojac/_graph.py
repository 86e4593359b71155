"""Discovery of the parameters (leaf tensors) that outputs depend on, by walking the autograd graph.

A leaf tensor ``p`` with ``requires_grad=True`` appears in the backward graph as an
``AccumulateGrad`` node whose ``variable`` attribute is ``p``; every other node links to the nodes
of its inputs through ``next_functions``. A breadth-first walk from the outputs' ``grad_fn``
therefore finds every leaf the outputs depend on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from torch import Tensor


def find_leaves(roots: Iterable[Tensor], excluded: Iterable[Tensor] = ()) -> tuple[Tensor, ...]:
    """Leaf tensors requiring grad that ``roots`` depend on, in discovery (breadth-first) order.

    The walk does not go through the tensors of ``excluded``: leaves reachable from ``roots`` only
    through them are not returned (``mtl_backward`` uses this to find the task-specific parameters,
    between a task loss and the shared features). An excluded tensor that is itself a leaf is not
    returned either.

    Args:
        roots: Tensors to start from. A root that is itself a leaf requiring grad is its own leaf.
        excluded: Tensors at which the walk stops.
    """
    excluded = tuple(excluded)
    # Nodes are kept in sets (not their ids) so they stay alive during the walk: an id can be
    # reused once its Python wrapper is garbage-collected.
    excluded_nodes = {t.grad_fn for t in excluded if t.grad_fn is not None}
    excluded_leaves = {id(t) for t in excluded if t.grad_fn is None}

    leaves: dict[int, Tensor] = {}
    start_nodes = []
    for root in roots:
        node = root.grad_fn
        if node is None:
            if root.requires_grad and id(root) not in excluded_leaves:
                leaves.setdefault(id(root), root)
        elif node not in excluded_nodes:
            start_nodes.append(node)
    for leaf in leaves_of_nodes(start_nodes, excluded_nodes, excluded_leaves):
        leaves.setdefault(id(leaf), leaf)
    return tuple(leaves.values())


def leaves_of_nodes(
    nodes: Iterable, excluded_nodes: AbstractSet = frozenset(), excluded_leaves: AbstractSet = frozenset()
) -> list:
    """Leaf tensors reachable from the autograd ``nodes`` (breadth-first, each once)."""
    leaves: dict[int, Tensor] = {}
    visited: set = {node for node in nodes if node is not None}
    queue: deque = deque(visited)
    while queue:
        node = queue.popleft()
        variable = getattr(node, "variable", None)  # only AccumulateGrad nodes have one
        if isinstance(variable, Tensor):
            if id(variable) not in excluded_leaves:
                leaves.setdefault(id(variable), variable)
            continue
        for child, _ in node.next_functions:
            if child is None or child in visited or child in excluded_nodes:
                continue
            visited.add(child)
            queue.append(child)
    return list(leaves.values())
