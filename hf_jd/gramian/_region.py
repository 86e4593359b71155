r"""Batch-free regions: per-example gradients of parameters that reach the examples only through
tensors computed from parameters alone.

DeBERTa's relative embeddings go through a layer norm and the attention's key and query projections
(called a second time, on the embeddings), are split into heads and *repeated* over the batch, and
only then meet the examples, in a batched matmul with each example's queries. No module call on the
way is per-example, so no rule applies; the parameters would take the batched-autograd fallback,
which back-propagates :math:`m` rows through the whole model.

A tensor is *batch-free* (:data:`hf_jd.gramian._layout.FREE`) when it is computed from parameters
only. Let :math:`R` be the batch-free part of the graph reachable from a parameter :math:`p`, and call
*boundary* each op :math:`z = f(u, x)` where a batch-free :math:`u` meets the examples:

* ``z = u.expand(...)`` or ``z = u.repeat(r, 1, ...)`` whose rows are owned by the examples
  downstream: every consumer of :math:`z` (after ``transpose`` / ``permute`` keeping dimension 0) is a
  ``bmm`` or an elementwise op whose output has its rows in example blocks (:mod:`~hf_jd.gramian._layout`)
  with :math:`z`'s leading dimension;
* ``z = x ± αu`` or ``z = u ⊙ x`` with :math:`u` broadcast over :math:`z`'s leading dimension and
  :math:`z`'s rows in example blocks.

If every path from :math:`p` to the losses either crosses a boundary or enters a per-example call of
a module that owns :math:`p` (whose rule serves that call's contribution), then by the chain rule

.. math:: \frac{\partial L_i}{\partial p}\Big|_R = \sum_{\text{boundaries}}
          \Big(\frac{\partial u}{\partial p}\Big)^{\!\top} \frac{\partial L_i}{\partial u},

and :math:`\partial L_i/\partial u` follows from :math:`\bar z = \partial(\sum_j L_j)/\partial z` of the
engine's single backward: the sum over example :math:`i`'s block of rows of :math:`\bar z` (times
:math:`x` for a product, :math:`\pm\alpha` for a sum), folded back to :math:`u`'s shape — for
``repeat``, the tiles of the block summed. One ``vmap``-ed vector-Jacobian product through :math:`R`
(small: it holds no example) then gives every row at once; the backward keeps the graph for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from ._broadcast import Consumers, Terminal, per_row_cotangent, terminal_at
from ._layout import FREE, ROWS, Layout, Output, keeps_rows
from ._plan import CallDecision, CallKey, Pass, Route
from ._rule import PerRowCache, PerRowRule
from ._torch_ops import (
    ACCUMULATE_GRAD,
    REGION_ROW_WISE,
    REPEAT,
    TERMINALS,
    empty_spec,
    leaf_variable,
    next_functions,
    next_nodes,
    op_name,
    output_count,
    output_shape,
    saved,
)
from ._use import Call, Use
from ._utils import Context, full_shape


@dataclass
class Boundary:
    """Where a batch-free tensor ``u`` (the operand) meets the examples, at ``terminal.node`` (``z``)."""

    terminal: Terminal
    operand: Output
    #: ``repeat``: the number of tiles along dimension 0 (``None`` for the other kinds).
    tiles: int | None = None

    def cotangent(self, grad: Tensor, rows: int) -> Tensor:
        """:math:`\\partial L_i/\\partial u` for every row ``i`` (``[rows, *u.shape]``) from :math:`\\bar z`."""
        if self.tiles is None:
            return per_row_cotangent(self.terminal, grad, rows)
        shape = self.terminal.operand_shape
        return grad.reshape(rows, self.tiles // rows, *shape).sum(dim=1)


def _rows_owned_downstream(consumers: Consumers, z: Node, layout: Callable[[Output], Layout]) -> bool:
    """Every consumer of ``z`` is row-wise with rows in example blocks of ``z``'s leading dimension."""
    lead = output_shape(z)[0]
    pending, found = [(z, 0)], False
    while pending:
        key = pending.pop()
        for node, _ in consumers.get(key, []):
            if keeps_rows(node):  # a permute / transpose that leaves the rows in place
                pending.append((node, 0))
            elif (
                op_name(node) in REGION_ROW_WISE
                and layout((node, 0)) == ROWS
                and output_shape(node)[0] == lead
            ):
                found = True
            else:
                return False
    return found


def _boundary(
    consumers: Consumers, node: Node, position: int, layout: Callable[[Output], Layout], batch: int
) -> Boundary | None:
    child = next_functions(node)[position]
    if child[0] is None:
        return None
    operand: Output = (child[0], child[1])
    shape = output_shape(*operand)
    kind = op_name(node)
    if kind == REPEAT:
        repeats = saved(node, "repeats")
        if not isinstance(repeats, tuple) or len(repeats) != len(shape) or any(r != 1 for r in repeats[1:]):
            return None
        if repeats[0] % batch or not _rows_owned_downstream(consumers, node, layout):
            return None
        return Boundary(Terminal(node, kind, 1.0, None, [], shape), operand, tiles=repeats[0])
    if kind not in TERMINALS:
        return None
    terminal = terminal_at(node, position, [], shape)
    if terminal is None or terminal.lead % batch:
        return None
    return Boundary(terminal, operand) if rows_in_example_blocks(consumers, node, layout) else None


def rows_in_example_blocks(consumers: Consumers, z: Node, layout: Callable[[Output], Layout]) -> bool:
    """Whether the rows of ``z`` (a broadcast point's output) belong to the examples in blocks: ``z``'s
    own layout says so, or ``z`` is batch-free (``u`` expanded, or combined with constants only: Swin's
    bias plus its shifted-window mask) and every consumer reads it row by row into such rows."""
    found = layout((z, 0))
    if found == ROWS:
        return True
    return found == FREE and _rows_owned_downstream(consumers, z, layout)


def _call_nodes(use: Use[Any]) -> set[Node]:
    """The graph nodes of one call: from its outputs back to its inputs (or to leaves)."""
    stop = set(use.call.in_nodes)
    inside: set[Node] = set()
    stack = [edge.node for edge in use.edges]
    while stack:
        node = stack.pop()
        if node in inside or node in stop or op_name(node) == ACCUMULATE_GRAD:
            continue
        inside.add(node)
        stack.extend(next_nodes(node))
    return inside


def find_boundaries(
    consumers: Consumers,
    param: nn.Parameter,
    covered: set[Node],
    layout: Callable[[Output], Layout],
    batch: int,
) -> list[Boundary] | None:
    """The boundaries of ``param``'s batch-free region, or ``None`` if one of its paths to the losses
    neither crosses a boundary nor enters one of the ``covered`` (per-example, owning) calls."""
    boundaries: list[Boundary] = []
    seen: set[Node] = set()
    pending: list[Any] = [("param", id(param))]
    while pending:
        key = pending.pop()
        for node, position in consumers.get(key, []):
            if node in covered:
                continue
            boundary = _boundary(consumers, node, position, layout, batch)
            if boundary is not None:
                boundaries.append(boundary)
            elif layout((node, 0)) == FREE:
                if node not in seen:
                    seen.add(node)
                    pending.extend((node, k) for k in range(output_count(node)))
            else:
                return None
    return boundaries or None


class RegionRule(PerRowRule):
    """Parameters served by their batch-free region: the rows come from the use's remap."""

    name = "region"
    needs_graph = True

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return False  # created by the engine, never chosen for a module

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        return not ctx.per_task

    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        rows = {}
        for (name, param), grad in zip(self.params.items(), use.grads):
            if grad is None:
                grad = torch.zeros((ctx.rows, *full_shape(param)), dtype=ctx.dtype, device=param.device)
            rows[name] = grad.to(ctx.dtype)
        return rows


@dataclass
class RegionBackward:
    """Turns :math:`\\bar z` at every boundary into the per-row gradients of the region's parameters."""

    params: list[nn.Parameter]
    boundaries: list[Boundary]
    rows: int

    def __call__(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        outputs: list[GradientEdge] = []
        cotangents: list[Tensor] = []
        direct: dict[int, Tensor] = {}
        for boundary, grad in zip(self.boundaries, grads):
            if grad is None:
                continue
            rows = boundary.cotangent(grad, self.rows)
            node, index = boundary.operand
            variable = leaf_variable(node)
            if variable is not None:  # the operand is a parameter itself
                before = direct.get(id(variable))
                direct[id(variable)] = rows if before is None else before + rows
            else:
                outputs.append(GradientEdge(node, index))
                cotangents.append(rows)
        result: list[Tensor | None] = [None] * len(self.params)
        if outputs:
            result = _batched_vjp(outputs, self.params, cotangents)
        for k, param in enumerate(self.params):
            extra, found = direct.get(id(param)), result[k]
            if extra is not None:
                result[k] = extra if found is None else found + extra
        self.boundaries = []
        return result


def _batched_vjp(
    outputs: list[GradientEdge], params: list[nn.Parameter], cotangents: list[Tensor]
) -> list[Tensor | None]:
    """Per-row VJPs from ``outputs`` to ``params`` (``vmap``-ed; row by row if the graph refuses ``vmap``)."""
    try:
        found = torch.autograd.grad(
            outputs, params, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return list(found)
    except RuntimeError:
        per_row = [
            torch.autograd.grad(
                outputs, params, [c[i] for c in cotangents], retain_graph=True, allow_unused=True
            )
            for i in range(cotangents[0].shape[0])
        ]
        return [
            None if per_row[0][k] is None else torch.stack([row[k] for row in per_row])  # type: ignore[misc]
            for k in range(len(params))
        ]


def region_use(
    model: nn.Module,
    names: dict[int, str],
    params: list[nn.Parameter],
    boundaries: list[Boundary],
    rows: int,
    key: CallKey,
) -> Use[Any]:
    """A synthetic call whose "outputs" are the boundaries, fed through :class:`RegionBackward`."""
    call = Call(
        rule=RegionRule(model, {names[id(p)]: p for p in params}),
        key=key,
        inputs=[],
        in_spec=empty_spec(),
        in_lead=[],
        primary=None,
        out_lead=[None] * len(boundaries),
        out_index=list(range(len(boundaries))),
        edges=[GradientEdge(b.terminal.node, 0) for b in boundaries],
        expanded=[True] * len(boundaries),
        in_nodes=[],
        versions=[],
        mutated=False,
    )
    return Use(
        call, CallDecision(Route.SYNTHETIC, Pass.REGION, remap=RegionBackward(params, boundaries, rows))
    )


def plan_region(
    consumers: Consumers,
    serving: list[Use[Any]],
    candidates: list[nn.Parameter],
    names: dict[int, str],
    model: nn.Module,
    layout: Callable[[Output], Layout],
    batch: int,
    key: CallKey,
) -> Use[Any] | None:
    """One synthetic call (key ``key``) for the ``candidates`` whose every path qualifies;
    ``serving``: the per-example calls whose rules serve their parameters this step."""
    if not candidates or batch <= 1:
        return None
    wanted = {id(p) for p in candidates}
    owned: dict[int, set[Node]] = {}
    for use in serving:
        if any(id(p) in wanted for p in use.rule.params.values()):
            inside = _call_nodes(use)
            for param in use.rule.params.values():
                owned.setdefault(id(param), set()).update(inside)
    served: list[nn.Parameter] = []
    boundaries: list[Boundary] = []
    for param in candidates:
        found = find_boundaries(consumers, param, owned.get(id(param), set()), layout, batch)
        if found is not None:
            served.append(param)
            boundaries.extend(found)
    if not served:
        return None
    unique: dict[tuple[Node, Output], Boundary] = {}
    for boundary in boundaries:
        unique.setdefault((boundary.terminal.node, boundary.operand), boundary)
    return region_use(model, names, served, list(unique.values()), batch, key)


__all__ = ["RegionRule", "plan_region", "rows_in_example_blocks"]
