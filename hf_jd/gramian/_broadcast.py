r"""Broadcast points: per-example gradients of tensors that are broadcast over the batch.

A *batch-free* tensor :math:`u` — a parameter used directly by its owner's ``forward`` (ConvNeXt's
``layer_scale_parameter``, ViT's ``cls_token`` and ``position_embeddings``) or the output of a call
whose leading dimension is not the batch (T5's and MPNet's relative-attention-bias embeddings) —
reaches the examples through an op that broadcasts it over the batch. When every use of :math:`u`
is, after shape-only ops (permute, unsqueeze, view, transpose, squeeze, clone), one of

* ``z = u.expand(B, ...)``:  :math:`\partial L_i/\partial u = \operatorname{sum}(\bar z_i)`,
* ``z = x + \alpha u`` / ``z = x - \alpha u``: :math:`\partial L_i/\partial u = \pm\alpha\operatorname{sum}(\bar z_i)`,
* ``z = u \odot x``: :math:`\partial L_i/\partial u = \operatorname{sum}(\bar z_i \odot x_i)`,

where :math:`\bar z = \partial(\sum_j L_j)/\partial z` comes from the engine's single backward (slice
:math:`i` of it is :math:`\partial L_i/\partial z_i` because :math:`z`'s leading dimension is the batch)
and :math:`\operatorname{sum}` reduces the broadcast dimensions back to :math:`u`'s shape, then the
per-example gradient of :math:`u` is exact: the sum over its uses of these slices, mapped back
through the shape-only ops by their own backward functions. For a parameter this *is* its per-row
gradient; for a call's output it is the per-row gradient-output :math:`b_i` that the call's rule
needs (with its input shared by all rows). This replaces the generic rule's per-example re-run of
the whole owner, and the batched-autograd fallback, by one slice-and-sum per use.

The leading dimension of every :math:`z` must be the batch. As for the captured calls
(:mod:`hf_jd.gramian._batch`), a calibration forward on the first example, with gradients enabled,
tells: each broadcast point must have the same structure there with a leading dimension of 1. Any
other consumer of :math:`u` (a matmul, a gather, ...) leaves it on the exact path.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from ._plan import CallDecision, CallKey, Pass, Route
from ._rule import PerRowCache, PerRowRule
from ._torch_ops import (
    ADD,
    EXPAND,
    INDEX,
    LEAF_ATTRIBUTE,
    MUL,
    SHAPE_OPS,
    SUB,
    TERMINALS,
    WHERE,
    empty_spec,
    next_functions,
    op_name,
    output_shape,
    saved,
)
from ._use import Call, Use
from ._utils import Context, full_shape

#: Where a tensor comes from: ``("param", id(parameter))`` or ``(node, output_nr)``.
Source = Hashable
#: For each source, the graph nodes consuming it and at which of their inputs.
Consumers = dict[Source, list[tuple[Node, int]]]


def consumers_of(roots: Iterable[Node]) -> Consumers:
    """Reverse adjacency of the autograd graph below ``roots`` (parameters keyed by their id)."""
    consumers: Consumers = {}
    stack = list(roots)
    seen = set(stack)
    while stack:  # the whole graph, every step: attributes read inline (see _torch_ops.LEAF_ATTRIBUTE)
        node = stack.pop()
        for position, (next_node, output_nr) in enumerate(node.next_functions):
            if next_node is None:
                continue
            variable = getattr(next_node, LEAF_ATTRIBUTE, None)
            key: Source = ("param", id(variable)) if variable is not None else (next_node, output_nr)
            consumers.setdefault(key, []).append((node, position))
            if variable is None and next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return consumers


@dataclass
class Step:
    """One op between the source and a broadcast point: a shape-only node, a ``where`` selection, or
    an indexing of the source by constant indices (Swin's relative-position bias table)."""

    node: Node
    #: ``where``: the condition (read before the backward frees it) and which branch ``u`` is (0, 1).
    condition: Tensor | None = None
    position: int = 0
    #: Shape of the step's input.
    in_shape: tuple[int, ...] = ()
    #: Indexing ``u[indices]``: the index tensors (read before the backward frees them).
    indices: tuple[Tensor, ...] | None = None

    def backward(self, grad: Tensor) -> Tensor:
        """The step's vector-Jacobian product for one row."""
        if self.indices is not None:
            zeros = torch.zeros(self.in_shape, dtype=grad.dtype, device=grad.device)
            return zeros.index_put_(self.indices, grad, accumulate=True)
        if self.condition is None:
            out = self.node(grad)  # type: ignore[operator]  # shape-only: saves sizes, never tensors
            return out[0] if isinstance(out, tuple) else out
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        kept = (
            torch.where(self.condition, grad, zero)
            if self.position == 0
            else torch.where(self.condition, zero, grad)
        )
        return kept.sum_to_size(self.in_shape)


@dataclass
class Terminal:
    """One broadcast point ``z`` of a batch-free tensor ``u`` reached through ``path`` (shape-only ops)."""

    node: Node
    kind: str
    #: Factor of :math:`\bar z` (``±α`` for add / sub, 1 otherwise).
    factor: float
    #: The other operand of a product (``None`` otherwise).
    other: Tensor | None
    #: Shape-only (or ``where``) steps from the source to ``z``'s operand, in forward order.
    path: list[Step]
    #: Shape of ``u`` after ``path`` (the operand of ``z``).
    operand_shape: tuple[int, ...]

    @property
    def lead(self) -> int:
        return output_shape(self.node)[0] if output_shape(self.node) else 0

    @property
    def signature(self) -> tuple[str, ...]:
        return (self.kind, *(op_name(step.node) for step in self.path))


def terminal_at(node: Node, position: int, path: list[Step], shape: tuple[int, ...]) -> Terminal | None:
    kind = op_name(node)
    z_shape = output_shape(node)
    padded = (1,) * (len(z_shape) - len(shape)) + shape
    if len(padded) != len(z_shape) or not z_shape or padded[0] != 1:
        return None  # u is not broadcast over z's leading dimension
    factor, other = 1.0, None
    if kind == MUL:
        operands = [n for n, _ in next_functions(node)]
        if operands[0] is not None and operands[0] == operands[1]:
            return None  # u * u
        other = saved(node, "other" if position == 0 else "self")
        if not isinstance(other, Tensor):
            return None
    elif kind in (ADD, SUB) and position == 1:
        factor = float(saved(node, "alpha", 1.0)) * (-1.0 if kind == SUB else 1.0)
    elif kind == EXPAND and position != 0:
        return None
    return Terminal(node, kind, factor, other, path, shape)


def resolve(consumers: Consumers, source: Source, shape: tuple[int, ...]) -> list[Terminal] | None:
    """The broadcast points of ``source`` (of shape ``shape``), or ``None`` if a use is not one."""
    found: list[Terminal] = []
    pending: list[tuple[Source, list[Step], tuple[int, ...]]] = [(source, [], shape)]
    while pending:
        key, path, current = pending.pop()
        for node, position in consumers.get(key, []):
            kind = op_name(node)
            if kind in SHAPE_OPS:
                pending.append(((node, 0), [*path, Step(node)], output_shape(node)))
            elif kind == WHERE and output_shape(node) and output_shape(node)[0] == 1:  # still batch-free
                condition = saved(node, "condition")
                if not isinstance(condition, Tensor):
                    return None
                step = Step(node, condition, position, current)
                pending.append(((node, 0), [*path, step], output_shape(node)))
            elif kind == INDEX:
                indices = saved(node, "indices")
                if not isinstance(indices, tuple) or not all(isinstance(i, Tensor) for i in indices):
                    return None  # a slice among the indices: not a plain gather
                step = Step(node, in_shape=current, indices=indices)
                pending.append(((node, 0), [*path, step], output_shape(node)))
            elif kind in TERMINALS:
                terminal = terminal_at(node, position, path, current)
                if terminal is None:
                    return None
                found.append(terminal)
            else:
                return None
    return found


def same_structure(
    main: list[Terminal], probe: list[Terminal] | None, batch: int, in_row_blocks: Callable[[Terminal], bool]
) -> bool:
    """Whether the probe (first example) shows every broadcast point's leading dimension following the
    batch: ``B`` rows (1 on the probe), or ``B·k`` rows in example blocks (``k`` on the probe, and
    ``in_row_blocks`` proves the blocks: :mod:`hf_jd.gramian._layout`)."""
    if batch <= 1:
        return True
    if probe is None or any(t.lead % batch for t in main):
        return False
    if sorted((t.signature, t.lead // batch) for t in main) != sorted((t.signature, t.lead) for t in probe):
        return False
    return all(t.lead == batch or in_row_blocks(t) for t in main)


@dataclass
class Broadcast:
    """The broadcast points of the captured outputs (or parameter) of one source; turns their
    gradients into per-row cotangents of the source."""

    #: Per captured output (one for a parameter): its broadcast points and its shape.
    outputs: list[tuple[list[Terminal], tuple[int, ...]]]
    #: The number of rows (examples).
    rows: int
    edges: list[GradientEdge] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.edges = [GradientEdge(t.node, 0) for terminals, _ in self.outputs for t in terminals]

    def __call__(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """Per-row cotangents ``[m, *shape]`` of each output from the gradients at the broadcast points."""
        flat = iter(grads)
        result: list[Tensor | None] = []
        for terminals, _ in self.outputs:
            total: Tensor | None = None
            for terminal in terminals:
                grad = next(flat)
                if grad is None:
                    continue
                part = per_row_cotangent(terminal, grad, self.rows)
                total = part if total is None else total + part
            result.append(total)
        for terminals, _ in self.outputs:
            for terminal in terminals:
                terminal.other = None  # the activation is no longer needed
                for step in terminal.path:
                    step.condition = None
                    step.indices = None
        return result


def per_row_cotangent(terminal: Terminal, grad: Tensor, m: int) -> Tensor:
    """:math:`\\partial L_i / \\partial` (source) for every row ``i`` of ``m``, from :math:`\\bar z` of one
    broadcast point (``z`` of ``m`` rows, or of ``m·k`` rows in blocks of ``k``, one per row ``i``)."""
    if terminal.other is not None:
        grad = grad * terminal.other
    elif terminal.factor != 1.0:
        grad = grad * terminal.factor
    if grad.shape[0] != m:
        grad = grad.reshape(m, grad.shape[0] // m, *grad.shape[1:]).sum(dim=1)
    shape = terminal.operand_shape
    padded = (1,) * (grad.dim() - len(shape)) + shape
    rows = grad.sum_to_size((m, *padded[1:])).reshape(m, *shape)
    for step in reversed(terminal.path):  # map back to the source, one row at a time
        rows = torch.stack([step.backward(row) for row in rows])
    return rows


class BroadcastParamRule(PerRowRule):
    """A parameter whose every use is a broadcast point: its per-row gradient is the remapped gradient."""

    name = "broadcast"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return False  # created by the engine for parameters, never chosen for a module

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        return not ctx.per_task

    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        ((name, param),) = self.params.items()
        grad = use.grads[0] if use.grads else None
        if grad is None:
            grad = torch.zeros((ctx.rows, *full_shape(param)), dtype=ctx.dtype, device=param.device)
        return {name: grad.to(ctx.dtype)}


def param_use(module: nn.Module, name: str, param: nn.Parameter, plan: Broadcast, key: CallKey) -> Use[Any]:
    """A synthetic call whose single "output" is ``param`` itself, fed through ``plan``."""
    call = Call(
        rule=BroadcastParamRule(module, {name: param}),
        key=key,
        inputs=[],
        in_spec=empty_spec(),
        in_lead=[],
        primary=None,
        out_lead=[None],
        out_index=[0],
        edges=list(plan.edges),
        expanded=[True],
        in_nodes=[],
        versions=[],
        mutated=False,
    )
    return Use(call, CallDecision(Route.SYNTHETIC, Pass.BROADCAST, remap=plan))
