"""Autograd-graph checks: every use of a trainable parameter must lie inside a captured call.

A parameter's gradient is exact only if every graph node that consumes it (the nodes with an edge
to its ``AccumulateGrad``) sits inside the region of a captured call of a module owning it (the
nodes between the call's output edges and its input edges). A parameter read *outside* its owner's
call (DeBERTa's ``rel_embeddings.weight``, a weight passed to ``F.linear`` by a parent module) is
"uncovered" and goes to the batched-autograd fallback instead of being silently missed.
Reentrant activation checkpointing hides the inner graph in a ``CheckpointFunctionBackward`` node
and cannot be differentiated with ``torch.autograd.grad``; it is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.autograd.graph import Node

from ._torch_ops import LEAF_ATTRIBUTE, REENTRANT_CHECKPOINT
from ._use import Call


def parameter_consumers(root: Node, param_ids: set[int]) -> tuple[dict[int, set[Node]], bool]:
    """Map each reached parameter id to the nodes consuming it; also whether a reentrant checkpoint was seen."""
    consumers: dict[int, set[Node]] = {}
    reentrant = False
    stack = [root]
    seen = {root}
    while stack:  # the whole graph, every step: attributes read inline (see _torch_ops.LEAF_ATTRIBUTE)
        node = stack.pop()
        if type(node).__name__ == REENTRANT_CHECKPOINT:
            reentrant = True
        for next_node, _ in node.next_functions:
            if next_node is None:
                continue
            variable = getattr(next_node, LEAF_ATTRIBUTE, None)
            if variable is not None:
                if id(variable) in param_ids:
                    consumers.setdefault(id(variable), set()).add(node)
                continue
            if next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return consumers, reentrant


def call_region(call: Call) -> set[Node]:
    """Graph nodes between a captured call's output edges and its input edges."""
    stops = set(call.in_nodes)
    region: set[Node] = set()
    stack = [edge.node for edge in call.edges if edge.node not in stops]
    region.update(stack)
    while stack:
        node = stack.pop()
        for next_node, _ in node.next_functions:
            if next_node is None or next_node in region or next_node in stops:
                continue
            if getattr(next_node, LEAF_ATTRIBUTE, None) is not None:
                continue
            region.add(next_node)
            stack.append(next_node)
    return region


def uncovered_parameters(
    losses: Tensor, calls: Iterable[Call], params: Sequence[Tensor]
) -> tuple[set[int], bool]:
    """Ids of parameters consumed outside every captured call of their owners; reentrant-checkpoint flag."""
    if losses.grad_fn is None:
        return set(), False
    consumers, reentrant = parameter_consumers(losses.grad_fn, {id(p) for p in params})
    regions: dict[int, set[Node]] = {}
    for call in calls:
        region = None
        for param in call.rule.params.values():
            if id(param) in consumers:
                if region is None:
                    region = call_region(call)
                regions.setdefault(id(param), set()).update(region)
    uncovered = {pid for pid, nodes in consumers.items() if not nodes <= regions.get(pid, set())}
    return uncovered, reentrant
