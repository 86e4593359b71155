r"""Example-major layout of an intermediate tensor, read from the autograd graph.

A tensor :math:`x` with :math:`n` elements is *example-major* (for a batch of :math:`B` examples) when,
in its logical (row-major) order, example :math:`i` holds exactly the elements
:math:`[i\,n/B, (i+1)\,n/B)`. Then for the smallest :math:`j` with :math:`\prod_{d<j} x.\text{shape}[d]`
a multiple of :math:`B`, the example of an element is a function of its first :math:`j` indices; in
particular, when :math:`j = 1` the rows of a ``[B·k, ...]`` tensor come in contiguous blocks of
:math:`k`, one block per example — what the row-wise rules need to serve a call whose leading dimension
is :math:`B·k` (Swin's attention output projection, which reads the ``[B·windows, N, C]`` output of
the window attention).

The proof walks the graph from the tensor towards the outputs of calls already known to be
per-example (their leading dimension is the batch, or proven ``B·k`` rows), and propagates one of
three states through each node:

* example-major along dimensions :math:`D = (d_1 < \dots < d_p)`: the joint index of an element along
  :math:`D` (row-major) gives its example, in :math:`B` equal consecutive blocks. An example-major
  tensor is the case :math:`D = (0, \dots, j-1)`; rows in example blocks are :math:`D = (0)`;
* ``FREE``: computed from parameters only (no known per-example input), the same for every example;
* unknown (``None``): anything else — the caller keeps the exact path.

A node with an unknown input is unknown; one whose differentiable inputs are all ``FREE`` is
``FREE``; otherwise the node must be one of the ops below, each of which maps the layout of its
inputs to that of its output exactly:

* views, reshapes, squeezes and unsqueezes of an example-major tensor (they keep the logical order);
* elementwise ops, where every example-major input has the same :math:`D` and the output's sizes
  along :math:`D` (``FREE`` operands broadcast freely);
* ``permute`` / ``transpose`` that keep the order of :math:`D` (fused ``qkv`` heads:
  ``permute(2, 0, 3, 1, 4)`` then ``unbind(0)``), ``expand`` that keeps the sizes along :math:`D`;
* softmax, layer norm, ``split`` / ``slice`` along, and ``select`` / ``unbind`` of, a dimension
  outside :math:`D`; norms, sums and means over dimensions outside :math:`D` (``F.normalize``);
* ``bmm`` of operands with rows in example blocks (row :math:`r` of the output from row :math:`r` of
  each), ``mm`` / ``addmm`` whose first matrix has rows in example blocks and second is ``FREE``.

Inputs that do not require grad (masks, constants) are not in the graph: as everywhere in the
engine, the model is assumed not to mix examples, so row :math:`r` of the result of a row-wise op on
an example-major operand belongs to that operand's example.
"""

from __future__ import annotations

import math
from typing import Literal

from torch.autograd.graph import Node

from ._torch_ops import (
    ACCUMULATE_GRAD,
    ADDMM,
    ALONG_DIM,
    BMM,
    DROP_DIM,
    ELEMENTWISE,
    EXPAND,
    MM,
    NATIVE_LAYER_NORM,
    PERMUTE,
    PERMUTES,
    REDUCE_DIMS,
    TRANSPOSE,
    VIEWS,
    next_functions,
    op_name,
    output_shape,
    saved,
)

#: A node output: ``(node, output_nr)``, as in ``GradientEdge`` and ``Node.next_functions``.
Output = tuple[Node, int]
#: What is known of a tensor: the dimensions whose joint index (row-major, in this order) gives the
#: example, blocks of equal size (example-major along them); ``FREE``; or ``None`` (unknown).
Layout = tuple[int, ...] | Literal["free"] | None
FREE: Literal["free"] = "free"
#: Rows in contiguous blocks, one per example: what a row-wise rule needs.
ROWS: tuple[int, ...] = (0,)


def leading_dims(shape: tuple[int, ...], batch: int) -> int | None:
    """The smallest ``j ≥ 1`` with ``prod(shape[:j])`` a multiple of ``batch`` (``None`` if there is none)."""
    for j in range(1, len(shape) + 1):
        if math.prod(shape[:j]) % batch == 0:
            return j
    return None


def _flat(shape: tuple[int, ...], batch: int) -> Layout:
    """The layout of an example-major (in logical order) tensor of ``shape``."""
    j = leading_dims(shape, batch)
    return tuple(range(j)) if j is not None else None


def _dim(value: object, rank: int) -> int | None:
    """A saved dimension, normalised to ``[0, rank)`` (autograd saves ``-1`` as ``2**64 - 1``)."""
    if not isinstance(value, int):
        return None
    if value >= 2**63:
        value -= 2**64
    return value + rank if value < 0 else value


def permutation(node: Node, rank: int) -> list[int | None] | None:
    """For a ``permute`` / ``transpose`` node of a rank-``rank`` tensor: output dimension ``i`` is input
    dimension ``order[i]``; ``None`` for any other node or unreadable saved dimensions."""
    kind = op_name(node)
    if kind == PERMUTE:
        dims = saved(node, "dims")
        return [_dim(d, rank) for d in dims] if isinstance(dims, tuple) else None
    if kind == TRANSPOSE:
        pair = [_dim(saved(node, name), rank) for name in ("dim0", "dim1")]
        if pair[0] is None or pair[1] is None:
            return None
        order: list[int | None] = list(range(rank))
        order[pair[0]], order[pair[1]] = pair[1], pair[0]
        return order
    return None


def keeps_rows(node: Node) -> bool:
    """Whether ``node`` is a ``permute`` / ``transpose`` that leaves dimension 0 in place."""
    order = permutation(node, len(output_shape(node)))
    return order is not None and bool(order) and order[0] == 0


def _permuted(dims: tuple[int, ...], order: list[int | None]) -> Layout:
    """``dims`` after a permutation (output dimension ``i`` is input dimension ``order[i]``), if their
    order is kept."""
    if None in order:
        return None
    moved = tuple(order.index(d) for d in dims)
    return moved if list(moved) == sorted(moved) else None


def _transfer(
    node: Node, inputs: list[tuple[int, tuple[int, ...], tuple[int, ...]]], out: tuple[int, ...], batch: int
) -> Layout:
    """The layout of ``node``'s output from its example-major inputs ``(position, dims, shape)``."""
    kind = op_name(node)
    if kind in ELEMENTWISE:
        dims = inputs[0][1]
        same = all(
            d == dims and len(shape) == len(out) and all(shape[k] == out[k] for k in d)
            for _, d, shape in inputs
        )
        return dims if same else None
    if kind == BMM:
        return ROWS if all(d == ROWS for _, d, _ in inputs) else None
    if len(inputs) != 1:
        return None
    ((position, dims, shape),) = inputs
    rank = len(shape)
    if kind in VIEWS:  # keep the logical order: only an example-major (prefix) layout survives
        return _flat(out, batch) if dims == tuple(range(len(dims))) else None
    if kind in PERMUTES:
        order = permutation(node, rank)
        return _permuted(dims, order) if order is not None else None
    if kind == EXPAND:
        return dims if len(shape) == len(out) and all(shape[k] == out[k] for k in dims) else None
    if kind in ALONG_DIM:
        dim = _dim(saved(node, "dim"), rank)
        return dims if dim is not None and dim not in dims else None
    if kind in DROP_DIM:
        dim = _dim(saved(node, "dim"), rank)
        if dim is None or dim in dims:
            return None
        return tuple(d - (d > dim) for d in dims)
    if kind in REDUCE_DIMS:
        over = saved(node, "dim")
        reduced = [_dim(d, rank) for d in over] if isinstance(over, tuple) and over else None
        if reduced is None or None in reduced or any(d in dims for d in reduced):
            return None
        if saved(node, "keepdim", False):
            return dims
        return tuple(d - sum(1 for r in reduced if r is not None and r < d) for d in dims)
    if kind == NATIVE_LAYER_NORM:
        normalized = saved(node, "normalized_shape")
        ok = position == 0 and isinstance(normalized, tuple) and all(d < rank - len(normalized) for d in dims)
        return dims if ok else None
    if kind == MM:
        return ROWS if position == 0 and dims == ROWS else None
    if kind == ADDMM:
        return ROWS if position == 1 and dims == ROWS else None
    return None


def infer_layout(start: Output, sources: set[Output], batch: int, memo: dict[Node, Layout]) -> Layout:
    """The layout of ``start``, given ``sources`` with their rows in example blocks (:data:`ROWS`).
    ``memo`` (per node) may be shared between calls with the same ``sources`` and ``batch``. Iterative:
    graphs are deeper than Python's recursion limit. A graph this function cannot read (an autograd
    node without the metadata it expects) is unknown: the caller keeps the exact path."""
    try:
        return _infer_layout(start, sources, batch, memo)
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def _infer_layout(start: Output, sources: set[Output], batch: int, memo: dict[Node, Layout]) -> Layout:
    unset = object()

    def known(output: Output) -> Layout | object:
        if output in sources:
            return ROWS
        if op_name(output[0]) == ACCUMULATE_GRAD:
            return FREE  # a parameter (or another leaf that requires grad)
        return memo.get(output[0], unset)

    stack: list[Output] = [start]
    while stack:
        output = stack[-1]
        if known(output) is not unset:
            stack.pop()
            continue
        node = output[0]
        inputs = [(position, (n, k)) for position, (n, k) in enumerate(next_functions(node)) if n is not None]
        pending = [child for _, child in inputs if known(child) is unset]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        memo[node] = _combine(
            node, [(position, known(child), output_shape(*child)) for position, child in inputs], batch
        )
    found = known(start)
    return None if found is unset else found  # type: ignore[return-value]


def _combine(node: Node, inputs: list[tuple[int, object, tuple[int, ...]]], batch: int) -> Layout:
    if any(layout is None for _, layout, _ in inputs):
        return None
    major = [(position, layout, shape) for position, layout, shape in inputs if isinstance(layout, tuple)]
    if not major:
        return FREE
    return _transfer(node, major, output_shape(node), batch)


__all__ = [
    "FREE",
    "ROWS",
    "Layout",
    "Output",
    "infer_layout",
    "keeps_rows",
    "leading_dims",
    "output_shape",
    "permutation",
]
