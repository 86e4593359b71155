r"""Base classes of the per-module rules.

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

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic

import torch
from torch import Tensor, nn

from .._tensors import gram
from ._use import CacheT, Use
from ._utils import Context, full_shape, row_chunks


class Rule(ABC, Generic[CacheT]):
    """Per-module rule: per-row gradients, Gramian blocks and weighted gradients from ``(a, b)``.

    One instance serves every call of one module (``self.module``, whose trainable parameters are
    ``self.params``, by name); the state of one call lives in that call's :class:`Use`, and what the
    rule derives from it in ``use.cache``, an instance of the rule's own cache class ``CacheT``.

    Adding a rule for a new module type is one new file: a subclass of :class:`Rule` (or of
    :class:`PerRowRule` when materialising every per-row gradient at once is cheap), registered with
    the :func:`~hf_jd.gramian.register_rule` decorator (``docs/gramian_rules.md``; the built-in rules
    use ``builtin_rule``, and the file is imported by ``hf_jd/gramian/__init__.py``). The subclass
    implements:

    * ``supports(use, ctx)``: whether this call can be handled exactly (e.g. one tensor input of the
      expected rank, one captured output); when ``False`` the module's parameters use the exact
      batched-autograd fallback for this step;
    * ``new_cache()``: an empty instance of its cache dataclass (typed fields, all ``None`` or empty),
      which the rule fills lazily through ``self.cache_of(use)``;
    * ``add_param_rows(use, ctx, name, start, stop, out)``: ``out += g[:, start:stop]`` for the
      parameter ``name``;
    * ``param_weighted(use, ctx, name, weights)``: :math:`\\sum_i w_i g_i`, shaped like the parameter;

    and may override ``matches(module)`` (classmethod: a further condition on the modules the
    registration's selector accepts; check the exact ``forward``, since a subclass that overrides it
    computes something else), ``claims(module)`` (classmethod: the children whose parameters this rule
    serves too, named ``"child.param"`` in ``self.params``; they get no rule and no hook of their own),
    ``param_gramian`` (a cheaper Gramian block than chunks of ``add_param_rows``),
    ``write_param_rows`` (``add_param_rows`` without the zero-filling) and ``compact`` (free ``a``, ``b``
    once the cache holds everything ``param_weighted`` needs). Class attributes: ``name`` (short and
    unique: :meth:`GramianEngine.coverage` reports it), ``keep_all_inputs`` and ``needs_rng`` (below).
    The inputs ``a`` are read from ``use.primary_input`` (or ``use.inputs`` with ``keep_all_inputs``),
    the gradient-outputs ``b`` from ``use.output_grad`` (or ``use.grads``); every per-row tensor has
    ``ctx.rows`` rows and the dtype ``ctx.dtype``, and an input shared by all rows
    (``use.input_shared(ctx)``) has a single row.
    """

    #: Short name of the rule (for messages and debugging).
    name: ClassVar[str] = "rule"
    #: Keep every input of the call (the generic rule re-runs the module); else only the first tensor.
    keep_all_inputs: ClassVar[bool] = False
    #: Whether the rule needs the RNG state of the call (to replay dropout when recomputing).
    needs_rng: ClassVar[bool] = False
    #: Whether row ``r`` of the output depends on row ``r`` of the input only, and the rule reads ``a``, ``b``
    #: as ``[rows, -1, features]``: then a leading dimension of ``B·k`` rows, examples contiguous, is exact.
    row_wise: ClassVar[bool] = False
    #: Whether output token ``t`` depends on input token ``t`` only and the rule reads ``a``, ``b`` as
    #: ``[rows, -1, features]`` (``[rows, -1]`` ids for an embedding): then a call on ``[n_rows, T, ...]`` is
    #: exact read as ``n_rows·T`` rows of one token each — objectives that are token segments of rows
    #: (``GramianEngine.gramian(..., token_objective=...)``, :class:`hf_jd.ObjectiveLosses`).
    token_wise: ClassVar[bool] = False
    #: Whether the rule back-propagates through the graph after the engine's backward (which then keeps it).
    needs_graph: ClassVar[bool] = False
    #: Whether the rule re-runs the module with its parameter values after the forward (the generic and
    #: the attention rules): not under FSDP2, which frees the full parameters after use.
    recomputes: ClassVar[bool] = False

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.module = module
        self.params = params

    # ------------------------------------------------------------------ what every rule implements
    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this rule handles ``module``, among the modules its registration selects (default: all)."""
        return True

    @classmethod
    def claims(cls, module: nn.Module) -> list[nn.Module]:
        """Descendants of ``module`` whose trainable parameters this rule serves too (default: none).

        A module that uses a child's parameters without calling the child (``nn.MultiheadAttention``
        reads ``out_proj.weight`` inside ``F.multi_head_attention_forward``) claims it: the engine then
        gives the rule the child's parameters, named by their path from ``module`` (``"out_proj.weight"``),
        and neither hooks the child nor assigns it (or its descendants) a rule of its own.
        """
        return []

    @abstractmethod
    def supports(self, use: Use[CacheT], ctx: Context) -> bool:
        """Whether this call can be handled exactly by the rule (else its parameters use the fallback)."""

    @abstractmethod
    def new_cache(self) -> CacheT:
        """An empty per-call cache."""

    @abstractmethod
    def add_param_rows(
        self, use: Use[CacheT], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> None:
        """``out += g[:, start:stop]`` for parameter ``name``; ``out`` is ``[m, stop-start, *shape[1:]]``."""

    @abstractmethod
    def param_weighted(self, use: Use[CacheT], ctx: Context, name: str, weights: Tensor) -> Tensor:
        """:math:`\\sum_i w_i g_i` for parameter ``name``, shaped like the parameter."""

    # ------------------------------------------------------------------ optional overrides
    def write_param_rows(
        self, use: Use[CacheT], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> bool:
        """Like ``add_param_rows`` but overwriting ``out`` (saves zero-filling); ``False`` if unsupported."""
        return False

    def param_gramian(self, use: Use[CacheT], ctx: Context, name: str) -> Tensor:
        """:math:`G^{(p)}` (``[m, m]``) of parameter ``name``, by default from row chunks of ``add_param_rows``."""
        total = torch.zeros(ctx.rows, ctx.rows, dtype=ctx.dtype, device=self.params[name].device)
        for block in chunked_rows([(use, name)], self.params[name], ctx):
            total += gram(block)
        return total

    def compact(self, use: Use[CacheT]) -> None:
        """Drop what ``param_weighted`` no longer needs once the Gramian is assembled (default: nothing)."""

    # ------------------------------------------------------------------ helper
    def cache_of(self, use: Use[CacheT]) -> CacheT:
        """The call's cache, created empty on first use."""
        if use.cache is None:
            use.cache = self.new_cache()
        return use.cache


@dataclass
class PerRowCache:
    """Per-row gradients ``[m, *param.shape]`` of every parameter of the call, by name."""

    rows: dict[str, Tensor] | None = None


class PerRowRule(Rule[PerRowCache]):
    """A rule that materialises every parameter's per-row gradients at once, in ``compute_rows``.

    For parameters whose per-row gradients are small (normalisation layers) or only available all at
    once (the generic rule's VJPs): ``add_param_rows``, ``param_gramian`` and ``param_weighted`` all
    read the cached rows, and ``a``, ``b`` are freed once the rows are computed. A subclass implements
    ``matches``, ``supports`` and ``compute_rows``.
    """

    @abstractmethod
    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        """Per-row gradients of every parameter (``[m, *param.shape]``, dtype ``ctx.dtype``), by name."""

    def new_cache(self) -> PerRowCache:
        return PerRowCache()

    def per_row(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        cache = self.cache_of(use)
        if cache.rows is None:
            cache.rows = self.compute_rows(use, ctx)
        return cache.rows

    def compact(self, use: Use[PerRowCache]) -> None:
        if use.cache is not None and use.cache.rows is not None:
            use.drop_inputs_and_grads()

    def add_param_rows(
        self, use: Use[PerRowCache], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> None:
        rows = self.per_row(use, ctx)[name]
        out += rows.reshape(ctx.rows, 1) if rows.dim() == 1 else rows[:, start:stop]

    def param_gramian(self, use: Use[PerRowCache], ctx: Context, name: str) -> Tensor:
        return gram(self.per_row(use, ctx)[name])

    def param_weighted(self, use: Use[PerRowCache], ctx: Context, name: str, weights: Tensor) -> Tensor:
        rows = self.per_row(use, ctx)[name]
        return torch.tensordot(weights.to(rows.dtype), rows, dims=1)


def rows_and_row_shape(param: Tensor) -> tuple[int, tuple[int, ...]]:
    """Number of rows (first dimension; 1 for a scalar) and the shape of one row, of the full parameter
    (:func:`~hf_jd.gramian._utils.full_shape`: not ZeRO-3's empty partition)."""
    shape = full_shape(param)
    if not shape:
        return 1, ()
    return shape[0], tuple(shape[1:])


def chunked_rows(entries: list[tuple[Use[Any], str]], param: Tensor, ctx: Context) -> Iterator[Tensor]:
    """Per-row gradients of ``param`` summed over ``entries`` (call, parameter name), by chunks of rows.

    Yields ``[m, rows, *row]`` buffers (reused between chunks: consume each before the next).
    """
    n_rows, shape = rows_and_row_shape(param)
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
        for k, (use, name) in enumerate(entries):
            if use.rule.write_param_rows(use, ctx, name, start, stop, block):
                written = k
                break
        if written is None:
            block.zero_()
        for k, (use, name) in enumerate(entries):
            if k != written:
                use.rule.add_param_rows(use, ctx, name, start, stop, block)
        yield block
