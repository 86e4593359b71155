r"""The explicit-Jacobian backend of a JD training step.

It computes :math:`J_p = \partial L / \partial p` for every trainable parameter with
:func:`hf_jd.autojac.jac` (rows back-propagated in parallel, or one by one), then either

* for a Gramian-weighted aggregator: :math:`G = \sum_p J_p J_p^\top` (never concatenating the
  :math:`J_p`), weights :math:`w`, and :math:`p.\mathrm{grad} \mathrel{+}= s\, J_p^\top w`;
* for any other aggregator: the concatenated :math:`J`, :math:`A(J)`, split back per parameter.

Rows are back-propagated in parallel (one batched backward, ``vmap`` over the backward pass) unless
``parallel_chunk_size=1``. Some backward functions cannot run under ``vmap`` (an in-place add of the
incoming gradient into a buffer of their own, as TRL's fused LM head does; ``.item()`` in a backward):
until a batched backward of several rows has once succeeded, it runs on a retained graph, so that on
such a failure the same rows are computed again one by one (exact, slower); the engine then keeps
``parallel_chunk_size=1`` for the rest of the run, with one warning.

In per-task mode, parameters reached by the loss of a single task (task-specific heads) get that
task's plain gradient and are left out of :math:`G`; which parameters are shared is decided by
:mod:`hf_jd.autojac._shared_params`, the definition the Gramian engine uses too.

It implements :class:`~hf_jd.trainer._engines.ExplicitJacobianEngine`: every method takes the loss
vector and computes the Jacobian from it (once per captured forward).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._tensors import accumulation_dtype, add_to_grad, gramian_of_blocks
from ..aggregation import Aggregator
from ..autojac import BatchedBackwardError, is_shared_by_value, jac, reached_by_graph, shared_by_graph
from ..distributed import (
    ShardedTaskJacobian,
    all_reduce_tensors_,
    any_across_ranks,
    global_gramian,
    on_any_rank,
)
from ._engines import written_gradients_are_finite

logger = logging.getLogger(__name__)


class JacobianBackend:
    """The explicit-Jacobian engine (see :class:`~hf_jd.trainer._engines.ExplicitJacobianEngine`).

    Args:
        model: the (unwrapped) module whose trainable parameters are trained.
        per_task: the rows are tasks (shared parameters decided by the shared-parameter contract)
            rather than examples (every parameter is shared).
        parallel_chunk_size: rows back-propagated per batched backward (``1``: one by one).
        average_over_ranks: per-task global scope with several processes: the task losses are the mean
            over ranks, so ``J = mean_r J_r``. For a Gramian-weighted aggregator ``J`` is reduce-scattered
            by column shards (:class:`~hf_jd.distributed.ShardedTaskJacobian`: each rank holds ``1/N`` of
            it, ``G`` and ``Jᵀw`` are assembled from the shards); an aggregator that needs the whole ``J``
            all-reduces it.
        keep_graph: back-propagate the rows with ``retain_graph=True``, so that the graph of the losses is
            still alive once the weights are known (the generic update path of ``hf_jd.trainer._backends``:
            a second backward of ``wᵀL``). Exact; the graph then lives until that backward, as in a stock step.
    """

    name = "jacobian"
    self_check = False  # exact for any loss vector: nothing to verify
    recomputes_overflow = True  # an overflowed float32 Gramian is formed again in float64 from J
    synchronises_gradients = False  # .grad holds this rank's update: the backend synchronises the ranks

    def __init__(
        self,
        model: nn.Module,
        per_task: bool,
        parallel_chunk_size: int | None = None,
        average_over_ranks: bool = False,
        keep_graph: bool = False,
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.per_task = per_task
        self.parallel_chunk_size = parallel_chunk_size
        self.average_over_ranks = average_over_ranks
        #: the graph of the losses survives the Jacobian (``retain_graph``): a second backward of ``wᵀL`` may
        #: follow (the generic update path); it is freed with the losses, after that backward.
        self.keeps_graph = keep_graph
        self._losses: Tensor | None = None
        self._jacobians: list[Tensor] | None = None
        self._shared: list[bool] = []
        self._by_graph: list[bool] | None = None
        #: Per parameter, whether the losses reach it (on any rank when ``J`` is averaged over ranks).
        self._reached: list[bool] = []
        self._sharded: ShardedTaskJacobian | None = None
        #: a batched backward of several rows succeeded once on this model (``vmap`` serves its backward)
        self._batched_proven = parallel_chunk_size == 1

    @contextmanager
    def capture(self) -> Iterator[None]:
        self.release()
        yield

    def compute(self, losses: Tensor) -> list[Tensor]:
        """The per-parameter Jacobians ``[m, *p.shape]`` of ``losses`` (computed once per loss vector)."""
        if self._jacobians is not None and self._losses is losses:
            return self._jacobians
        by_graph = shared_by_graph(losses, self.params) if self.per_task else None
        reached = reached_by_graph(losses, self.params)
        if self.average_over_ranks:
            reached = on_any_rank(reached, losses.device)
        jacobians = self._jacobian_rows(losses)
        self._by_graph = by_graph
        if not self.per_task:
            self._shared = [True] * len(self.params)
        elif by_graph is not None:
            self._shared = by_graph
        else:
            self._shared = [is_shared_by_value(J) for J in jacobians]
        self._losses, self._jacobians, self._reached = losses, jacobians, reached
        return jacobians

    def _jacobian_rows(self, losses: Tensor) -> list[Tensor]:
        """``jac`` of the losses; batched rows that ``vmap`` cannot serve are computed again one by one.

        Until a batched backward has succeeded once, it runs with ``retain_graph=True``: a failure in the
        middle of the backward would otherwise have freed part of the graph, and the rows could not be
        computed again. The graph is then freed with the losses, at the end of the step."""
        chunk = self.parallel_chunk_size
        batched = losses.numel() > 1 and chunk != 1
        if not batched or self._batched_proven:
            return list(jac(losses, self.params, retain_graph=self.keeps_graph, parallel_chunk_size=chunk))
        try:
            rows = list(jac(losses, self.params, retain_graph=True, parallel_chunk_size=chunk))
        except BatchedBackwardError as error:
            self.parallel_chunk_size, self._batched_proven = 1, True
            message = (
                "hf_jd: the batched backward of the explicit-Jacobian engine (vmap) failed on this model "
                f"({error.__cause__!r}); its Jacobian rows are computed one by one from now on (exact, slower). "
                "Set jd_parallel_chunk_size=1 to skip the batched attempt."
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return list(jac(losses, self.params, retain_graph=self.keeps_graph, parallel_chunk_size=1))
        self._batched_proven = True
        return rows

    @property
    def jacobians(self) -> list[Tensor]:
        """The per-parameter Jacobians ``[m, *p.shape]`` of the last :meth:`compute`."""
        return self._require()

    @property
    def gramian_dtype(self) -> torch.dtype:
        return accumulation_dtype(*(p.dtype for p in self.params))

    def shared_rows(self) -> list[Tensor]:
        """The Jacobian blocks (``[m, numel]``) of the shared parameters (all of them per example)."""
        return [J.reshape(J.shape[0], -1) for J, shared in zip(self._require(), self._shared) if shared]

    def gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> Tensor:
        """:math:`G = \\sum_p J_p J_p^\\top` over the shared parameters (float32 at least).

        ``verify_rows`` is accepted for the engine interface and ignored: ``J`` is computed row by row
        by autograd, so there is nothing to verify. So is ``row_objective``: the rows of ``J`` are the
        losses themselves (``K`` objectives over groups of batch rows, :class:`hf_jd.ObjectiveLosses`),
        whatever rows each of them reads, so ``J`` is exact without the map; so is ``token_objective``
        (token segments of rows, :meth:`hf_jd.ObjectiveLosses.segments`).

        When float32 products of a finite Jacobian overflow (losses or gradients beyond ~1e19), the Gramian
        is formed again in float64, where it is finite; a non-finite Jacobian gives a non-finite Gramian,
        which the caller reports.
        """
        del verify_rows, row_objective, token_objective
        self.compute(losses)
        dtype = dtype or self.gramian_dtype
        if self.average_over_ranks:
            return self._sharded_gramian(dtype)
        rows = self.shared_rows()
        if not rows:
            m = self._require()[0].shape[0]
            return torch.zeros(m, m, dtype=dtype, device=self.params[0].device)
        gramian = gramian_of_blocks(rows, dtype)
        if dtype != torch.float64 and not bool(torch.isfinite(gramian).all()) and self.is_finite():
            gramian = gramian_of_blocks(rows, torch.float64)
        return gramian

    def _sharded_gramian(self, dtype: torch.dtype) -> Tensor:
        """Per-task global: ``G`` of the rank-mean ``J`` from this rank's column shard (collectives)."""
        sharded = ShardedTaskJacobian(self._require(), self._by_graph)
        self._sharded = sharded
        gramian = sharded.gramian(dtype)
        if dtype != torch.float64 and not bool(torch.isfinite(gramian).all()) and sharded.is_finite():
            gramian = sharded.gramian(torch.float64)
        return gramian

    def global_gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> tuple[Tensor, list[int]]:
        """The Gramian of the rows of every rank (collective), formed again in float64 on overflow.

        The global Gramian is identical on every rank, so every rank enters the overflow branch; whether
        the Jacobian itself is finite is decided across ranks, so every rank takes the same path.
        ``verify_rows`` is ignored (``J`` is exact by construction), and so is ``row_objective``: the rows
        are every rank's losses (its objectives), in rank order; so is ``token_objective``.
        """
        del verify_rows, row_objective, token_objective
        self.compute(losses)
        gramian, sizes = global_gramian(self.shared_rows(), dtype or self.gramian_dtype)
        if not bool(torch.isfinite(gramian).all()) and not any_across_ranks(
            not self.is_finite(), gramian.device
        ):
            gramian, sizes = global_gramian(self.shared_rows(), torch.float64)
        return gramian, sizes

    def gradients_are_finite(self) -> bool:
        """Whether every ``.grad`` of ``params`` is finite (after the ranks were synchronised: the same on all)."""
        return written_gradients_are_finite(self.params)

    def is_finite(self) -> bool:
        """Whether every entry of the Jacobian is finite."""
        return all(bool(torch.isfinite(J).all()) for J in self._require())

    def accumulate_grad(self, weights: Tensor, scale: float) -> None:
        """``p.grad += scale * J_pᵀ w`` for shared parameters, ``scale * Σ_k J_p[k]`` for the others."""
        if self._sharded is not None:
            self._sharded.accumulate_grad(self.params, weights, scale, self._reached)
            self.release()
            return
        for param, J, shared, reached in zip(self.params, self._require(), self._shared, self._reached):
            if reached:  # an unreached parameter keeps .grad = None, as after loss.backward()
                update = torch.tensordot(weights.to(J.dtype), J, dims=1) if shared else J.sum(dim=0)
                add_to_grad(param, update.mul_(scale))
        self.release()

    def aggregate(self, aggregator: Aggregator, losses: Tensor, scale: float) -> Tensor:
        """Write ``scale * A(J)`` for an aggregator that needs the explicit Jacobian; return ``J``.

        Raises :class:`NonFiniteJacobian` (nothing written) when ``J`` holds inf/NaN.
        """
        self.compute(losses)
        if self.average_over_ranks:
            all_reduce_tensors_(self._require(), op="mean")
            if self.per_task and self._by_graph is None:
                self._shared = [is_shared_by_value(J) for J in self._require()]
        if not self.is_finite():
            self.release()
            raise NonFiniteJacobian()
        jacobians = self._require()
        matrix = torch.cat(self.shared_rows(), dim=1)
        update = aggregator(matrix)
        offset = 0
        for param, J, shared, reached in zip(self.params, jacobians, self._shared, self._reached):
            if shared:
                numel = param.numel()
                if reached:
                    add_to_grad(param, update[offset : offset + numel].view_as(param) * scale)
                offset += numel
            elif reached:
                add_to_grad(param, J.sum(dim=0) * scale)
        self.release()
        return matrix

    def release(self) -> None:
        self._losses = None
        self._jacobians = None
        self._sharded = None

    def _require(self) -> list[Tensor]:
        if self._jacobians is None:
            raise RuntimeError("JacobianBackend.compute(losses) must run before using the Jacobian.")
        return self._jacobians


class NonFiniteJacobian(ArithmeticError):
    """The explicit Jacobian holds inf/NaN although the losses are finite; nothing was written."""
