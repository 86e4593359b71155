r"""The interface between the JD step and its engines.

An engine turns the loss vector :math:`L \in \mathbb{R}^m` of one captured forward into the Gramian
:math:`G = J J^\top` of its Jacobian :math:`J = \partial L / \partial \theta`, then writes
:math:`s\, J^\top w` into ``.grad`` for the weights :math:`w` the aggregator computed from :math:`G`.
The :math:`m` losses may be objectives over groups of batch rows (a row map ``row_objective``, see
:class:`hf_jd.ObjectiveLosses`) or token segments of rows (a token map ``token_objective``, a packed
batch): :math:`G` and :math:`w` are then still over the :math:`m` objectives.

* :class:`hf_jd.gramian.GramianEngine` forms :math:`G` and :math:`J^\top w` from one backward pass,
  without ever holding :math:`J` (it implements :class:`JDEngine`);
* :class:`~hf_jd.trainer._jacobian_backend.JacobianBackend` holds :math:`J` explicitly, which is exact
  for any loss vector and serves aggregators that need :math:`J` itself and the exact global step over
  several processes (it implements :class:`ExplicitJacobianEngine`).

Both implement :class:`GlobalGramianEngine`: the Gramian of the examples of every rank (several
processes, ``jd_scope="global"``), from which every rank computes the same weights.

:mod:`hf_jd.trainer._jd_step` runs one micro-batch against these protocols; nothing else in the trainer
knows which engine it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .._tensors import written_gradients_are_finite
from ..aggregation import Aggregator

__all__ = ["ExplicitJacobianEngine", "GlobalGramianEngine", "JDEngine", "written_gradients_are_finite"]


@runtime_checkable
class JDEngine(Protocol):
    """What every engine provides for one micro-batch: capture → ``gramian`` → ``accumulate_grad``.

    Attributes:
        name: ``"gramian"`` or ``"jacobian"`` (logging, messages).
        params: the trainable parameters the engine writes ``.grad`` of.
        self_check: the engine rests on an assumption (the per-example structure of the losses) that the
            JD step verifies on its first step and every ``jd_verify_every`` steps (``verify_rows``).
        recomputes_overflow: the engine forms an overflowed float32 Gramian again in float64 by itself;
            otherwise the JD step runs the micro-batch again with ``dtype=torch.float64``.
        synchronises_gradients: :meth:`accumulate_grad` itself leaves ``.grad`` identical to what the
            optimizer of every rank must see (FSDP2: reduce-scattered into the shards on every micro-batch);
            otherwise the backend synchronises once per optimizer step (DDP: ``synchronise_gradients``).
        keeps_graph: the autograd graph of the loss vector is still alive after :meth:`gramian`, so that a
            second backward of ``wᵀL`` can run through it (the generic update path of
            ``hf_jd.trainer._backends``); the Gramian engine frees it in its one backward.
    """

    name: str
    params: list[nn.Parameter]
    self_check: bool
    recomputes_overflow: bool
    synchronises_gradients: bool
    keeps_graph: bool

    def capture(self) -> AbstractContextManager[None]:
        """The forward that produces the loss vector runs inside this block."""
        ...

    def gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> Tensor:
        """``G = J Jᵀ`` (``[m, m]``) of the captured loss vector; writes no ``.grad``.

        ``row_objective`` (``[n_rows]``, see :class:`hf_jd.ObjectiveLosses`): the ``m`` losses are objectives
        over groups of batch rows, row ``r`` belonging to objective ``row_objective[r]``. ``G`` is still the
        ``[m, m]`` Gramian of the ``m`` losses (an engine that differentiates the losses themselves may
        ignore the map; the Gramian engine forms ``P G_rows Pᵀ``), and :meth:`accumulate_grad` takes ``m``
        weights. ``verify_rows`` index the ``m`` losses. ``token_objective`` (``[n_rows, T]``, ``-1`` for a token
        of no objective, see :meth:`hf_jd.ObjectiveLosses.segments`): the ``m`` losses are token segments of
        rows (the sequences of a packed batch); the Gramian engine forms ``P G_tokens Pᵀ``."""
        ...

    def accumulate_grad(self, weights: Tensor, scale: float) -> None:
        """``p.grad += scale · Jᵀ w`` (task-specific parameters: their plain task gradients); frees the capture."""
        ...

    def release(self) -> None:
        """Free everything captured without writing ``.grad``."""
        ...

    def gradients_are_finite(self) -> bool:
        """Whether every gradient this engine wrote is finite, the same answer on every rank (the last check
        before the optimizer step). The default, :func:`written_gradients_are_finite` of ``params``, reads
        the full ``.grad``; FSDP2 reads the local shards and agrees across ranks."""
        ...


@runtime_checkable
class GlobalGramianEngine(JDEngine, Protocol):
    """An engine that forms the exact global per-example Gramian over several processes."""

    def global_gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> tuple[Tensor, list[int]]:
        """The Gramian ``[B, B]`` of the rows of every rank (a collective; the same bits on every rank) and
        each rank's row count. ``verify_rows`` (this rank's rows) are self-checked where the engine has a
        self-check; a failure on any rank raises on every rank. With ``row_objective`` the rows are each
        rank's objectives (an engine that cannot serve row groups globally raises on every rank); likewise
        with ``token_objective``."""
        ...


@runtime_checkable
class ExplicitJacobianEngine(GlobalGramianEngine, Protocol):
    """An engine that holds ``J``: any aggregator, and the exact global step over several processes."""

    def aggregate(self, aggregator: Aggregator, losses: Tensor, scale: float) -> Tensor:
        """Write ``scale · A(J)`` into ``.grad`` for an aggregator that needs ``J``; return ``J``."""
        ...
