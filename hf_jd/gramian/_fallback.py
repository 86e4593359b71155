"""Batched autograd: per-row gradients with respect to given tensors or gradient edges.

``torch.autograd.grad`` with ``is_grads_batched=True`` back-propagates the ``m`` one-hot rows
``e_i`` at once (``vmap`` over the backward); when some backward formula has no batching rule, an
exact loop over the rows is used instead. It captures gradients at the requested inputs (module
outputs, or parameters' ``AccumulateGrad`` inputs) without running ``AccumulateGrad``: no ``.grad``
is written and DDP's reducer hooks never fire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge


class BatchedBackward:
    """Remembers whether this model's backward can be vmapped (checked once, with the graph retained).

    Rows are back-propagated ``max_rows`` at a time, which bounds the extra memory of the batched
    backward to ``max_rows`` times that of one backward.
    """

    def __init__(self, max_rows: int = 8) -> None:
        self.vmap_ok: bool | None = None
        self.max_rows = max_rows

    def __call__(
        self, outputs: Tensor, inputs: Sequence[Tensor | GradientEdge], rows: Tensor, retain_graph: bool
    ) -> list[Tensor | None]:
        """``[∂(rows[i] · outputs)/∂input for i]`` stacked per input (``None`` where unreached)."""
        if not inputs:
            return []
        m = rows.shape[0]
        if m <= self.max_rows:
            return self._rows(outputs, inputs, rows, retain_graph)
        starts = list(range(0, m, self.max_rows))
        parts = [
            self._rows(
                outputs, inputs, rows[start : start + self.max_rows], retain_graph or start != starts[-1]
            )
            for start in starts
        ]
        counts = [min(self.max_rows, m - start) for start in starts]
        return [_concatenate([part[k] for part in parts], counts) for k in range(len(inputs))]

    def _rows(
        self, outputs: Tensor, inputs: Sequence[Tensor | GradientEdge], rows: Tensor, retain_graph: bool
    ) -> list[Tensor | None]:
        if self.vmap_ok is not False:
            try:
                grads = torch.autograd.grad(
                    outputs,
                    _grad_inputs(inputs),
                    rows,
                    retain_graph=retain_graph or self.vmap_ok is None,
                    is_grads_batched=True,
                    allow_unused=True,
                )
                self.vmap_ok = True
                return list(grads)
            except RuntimeError:
                if self.vmap_ok:  # it worked before: a genuine error
                    raise
                self.vmap_ok = False
        per_row = []
        m = rows.shape[0]
        for i in range(m):
            per_row.append(
                torch.autograd.grad(
                    outputs,
                    _grad_inputs(inputs),
                    rows[i],
                    retain_graph=retain_graph or i + 1 < m,
                    allow_unused=True,
                )
            )
        stacked: list[Tensor | None] = []
        for k in range(len(inputs)):
            column = [row[k] for row in per_row]
            reference = next((g for g in column if g is not None), None)
            if reference is None:
                stacked.append(None)
            else:
                stacked.append(
                    torch.stack([g if g is not None else torch.zeros_like(reference) for g in column])
                )
        return stacked


def _grad_inputs(inputs: Sequence[Tensor | GradientEdge]) -> Sequence[Tensor]:
    """``inputs`` as a list for ``torch.autograd.grad``, which takes tensors and gradient edges mixed
    (its type hints list only sequences of one kind)."""
    return cast("Sequence[Tensor]", list(inputs))


def _concatenate(chunks: list[Tensor | None], counts: list[int]) -> Tensor | None:
    """Concatenate the row chunks of one input (zeros for a chunk where it was unreached)."""
    reference = next((c for c in chunks if c is not None), None)
    if reference is None:
        return None
    return torch.cat(
        [
            c if c is not None else reference.new_zeros((n, *reference.shape[1:]))
            for c, n in zip(chunks, counts)
        ]
    )
