r"""Base class of the per-module rules.

A rule knows, for one module type, how the parameters' per-row gradients follow from the module's
input :math:`a` and gradient-output :math:`b` (Goodfellow, *Efficient per-example gradient
computations*, arXiv:1510.01799, 2015). For a row :math:`i` (an example, or a task) and a parameter
:math:`p` of the module, the rule provides

* ``add_param_rows``: adds the per-row gradients :math:`g_i = \partial L_i / \partial p`, restricted to
  a slice of :math:`p`'s first dimension, into a buffer — so that a parameter used by several modules
  (tied embeddings) or calls (a layer applied twice) is summed across them chunk by chunk before inner
  products are taken;
* ``param_gramian``: :math:`G^{(p)}_{ij} = \langle g_i, g_j \rangle` (by default from row chunks of the
  above; rules override it with cheaper forms such as the ghost product);
* ``param_weighted``: :math:`\sum_i w_i g_i`, without materialising any :math:`g_i` when possible.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ._use import Use
from ._utils import Context, gram, row_chunks


class Rule:
    """Per-module rule; subclasses implement ``add_param_rows`` and ``param_weighted``."""

    name = "rule"
    #: Keep every input of the call (the generic rule re-runs the module); else only the first tensor.
    keep_all_inputs = False
    #: Whether the rule needs the RNG state of the call (to replay dropout when recomputing).
    needs_rng = False

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.module = module
        self.params = params

    @classmethod
    def matches(cls, module: nn.Module) -> bool:  # pragma: no cover - overridden
        return False

    def supports(self, use: Use, ctx: Context) -> bool:
        """Whether this call can be handled exactly by the rule (else its parameters use the fallback)."""
        return True

    def compact(self, use: Use) -> None:
        """Drop what ``param_weighted`` no longer needs once the per-row gradients are cached."""
        if "rows" in use.cache:
            use.inputs = []
            use.grads = [None] * len(use.grads or [])

    def add_param_rows(self, use: Use, ctx: Context, name: str, start: int, stop: int, out: Tensor) -> None:
        """``out += g[:, start:stop]`` for parameter ``name``; ``out`` is ``[m, stop-start, *shape[1:]]``."""
        raise NotImplementedError

    def write_param_rows(self, use: Use, ctx: Context, name: str, start: int, stop: int, out: Tensor) -> bool:
        """Like ``add_param_rows`` but overwriting ``out`` (saves zero-filling); ``False`` if unsupported."""
        return False

    def param_gramian(self, use: Use, ctx: Context, name: str) -> Tensor:
        total = torch.zeros(ctx.rows, ctx.rows, dtype=ctx.dtype, device=self.params[name].device)
        for block in chunked_rows([(self, use, name)], self.params[name], ctx):
            total += gram(block)
        return total

    def param_weighted(self, use: Use, ctx: Context, name: str, weights: Tensor) -> Tensor:
        """:math:`\\sum_i w_i g_i` for parameter ``name``, shaped like the parameter."""
        raise NotImplementedError


def row_shape(param: Tensor) -> tuple[int, tuple[int, ...]]:
    """Number of rows (first dimension; 1 for a scalar) and the shape of one row."""
    if param.dim() == 0:
        return 1, ()
    return param.shape[0], tuple(param.shape[1:])


def chunked_rows(entries: list[tuple[Rule, Use, str]], param: Tensor, ctx: Context) -> Iterator[Tensor]:
    """Per-row gradients of ``param`` summed over ``entries`` (rule, call, name), by chunks of rows.

    Yields ``[m, rows, *row_shape]`` buffers (reused between chunks: consume each before the next).
    """
    n_rows, shape = row_shape(param)
    row_elems = 1
    for size in shape:
        row_elems *= size
    buffer = None
    for start, stop in row_chunks(n_rows, row_elems, ctx.rows, ctx.budget):
        count = ctx.rows * (stop - start) * row_elems
        if buffer is None:
            buffer = torch.empty(count, dtype=ctx.dtype, device=param.device)
        block = buffer[:count].view(ctx.rows, stop - start, *shape)
        written = None
        for k, (rule, use, name) in enumerate(entries):
            if rule.write_param_rows(use, ctx, name, start, stop, block):
                written = k
                break
        if written is None:
            block.zero_()
        for k, (rule, use, name) in enumerate(entries):
            if k != written:
                rule.add_param_rows(use, ctx, name, start, stop, block)
        yield block
