"""Autograd-graph traversal helpers."""

from __future__ import annotations

from torch import Tensor


def row_roots(vector: Tensor) -> list | None:
    """The autograd nodes of each entry of a vector built by ``torch.stack`` of scalars, else ``None``."""
    node = vector.grad_fn
    if node is None or type(node).__name__ != "StackBackward0":
        return None
    roots = [next_node for next_node, _ in node.next_functions]
    return roots if len(roots) == vector.numel() else None


def reachable_from_node(node) -> set[int]:
    """Ids of the leaf tensors reachable from the autograd node ``node``."""
    leaves: set[int] = set()
    stack = [node]
    seen = set()
    while stack:
        current = stack.pop()
        if current is None or current in seen:
            continue
        seen.add(current)
        variable = getattr(current, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(next_node for next_node, _ in current.next_functions)
    return leaves
