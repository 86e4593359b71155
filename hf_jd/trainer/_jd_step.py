r"""The JD update of one micro-batch: Gramian → weights → :math:`s\,J^\top w` in ``.grad``.

With the loss vector :math:`L` of a captured forward, an engine (:mod:`hf_jd.trainer._engines`) and
an aggregator :math:`A`:

* Gramian-weighted aggregators (UPGrad, MGDA, …; Quinton & Rey, arXiv:2406.16232, Section 5):
  :math:`G = J J^\top`, :math:`w = W(G)`, ``.grad += s Jᵀ w``. Over several processes in the global
  scope the rows are the examples of every rank: :math:`G` is the global Gramian and each rank writes
  its own rows' share :math:`J_r^\top w_r`; the backend's synchronisation (DDP: the all-reduce of
  ``synchronise_gradients``; FSDP2: the writer's reduce-scatter) sums them.
* Other aggregators (Krum, trimmed mean, …): ``.grad += s A(J)`` from the explicit Jacobian.

The losses may be objectives over groups of batch rows (``settings.row_objective``, see
:class:`hf_jd.ObjectiveLosses`): ``G``, ``w`` and the self-checked rows are then over the objectives, and
the engine alone reads the row map (the Gramian engine: :math:`G = P G_{\text{rows}} P^\top`,
:math:`J^\top w = J_{\text{rows}}^\top P^\top w`).

Every quantity is checked for finiteness before anything is written: a non-finite Gramian, Jacobian or
weight vector raises :class:`NonFiniteUpdate` (or :class:`GramianOverflow` when the engine can rerun
the micro-batch in float64), and the trainer turns those into a skipped step or a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..aggregation import Aggregator, GramianWeightedAggregator, LossAware
from ..distributed import all_gather_vector, local_slice, reduced
from ..gramian import default_rows
from ._backends import Backend
from ._engines import ExplicitJacobianEngine, GlobalGramianEngine, JDEngine
from ._jacobian_backend import NonFiniteJacobian
from ._loss_vector import objective_maps


class NonFiniteUpdate(Exception):
    """Finite losses but a non-finite Jacobian, Gramian or weights: nothing may reach the parameters."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class GramianOverflow(Exception):
    """The float32 Gramian overflowed on a finite loss vector: rerun the micro-batch in float64."""


@dataclass(frozen=True)
class StepSettings:
    """How the micro-batch's update is formed.

    Attributes:
        per_task: the rows are tasks rather than examples.
        global_scope: several processes and ``jd_scope="global"``: the objectives are those of every rank.
        verify: run the engine's exactness self-check on this micro-batch (engines with ``self_check``).
        gramian_dtype: the dtype to accumulate the Gramian in (``None``: the engine's default).
        keep_gramian: return ``G`` for the logged metrics (formed from ``J`` for non-Gramian aggregators).
        loss_values: this rank's loss values (unscaled), given to aggregators that use them (``set_losses``:
            GradNorm, DB-MTL, IMTL) for the rows of the Gramian they weight.
        row_objective: the losses are objectives over groups of batch rows (:class:`hf_jd.ObjectiveLosses`):
            the objective of each batch row, handed to the engine (``None``: one loss per row, or per task); or,
            ``[n_rows, T]``, the objective of each token when the losses are token segments of rows
            (:meth:`hf_jd.ObjectiveLosses.segments`), handed as ``token_objective``.
    """

    per_task: bool
    global_scope: bool
    verify: bool = False
    gramian_dtype: torch.dtype | None = None
    keep_gramian: bool = False
    loss_values: Tensor | None = None
    row_objective: Tensor | None = None


@dataclass(frozen=True)
class StepResult:
    """The Gramian and weights of the update (``None`` where not formed), for the metrics."""

    gramian: Tensor | None
    weights: Tensor | None


def jd_update(
    engine: JDEngine,
    aggregator: Aggregator,
    losses: Tensor,
    scale: float,
    settings: StepSettings,
    backend: Backend | None = None,
) -> StepResult:
    """Write the JD update ``scale · A(J)`` of ``losses`` into ``.grad``; the engine is released after.

    The weighted update ``scale · Jᵀ w`` is written by ``backend.write_update`` (its engine's writer, or the
    generic backward of ``wᵀL``); without a backend by the engine's own writer, ``engine.accumulate_grad``.
    """
    try:
        return _update(engine, aggregator, losses, scale, settings, backend)
    finally:
        engine.release()


def _update(
    engine: JDEngine,
    aggregator: Aggregator,
    losses: Tensor,
    scale: float,
    settings: StepSettings,
    backend: Backend | None,
) -> StepResult:
    feed_loss_values(aggregator, settings)
    if not isinstance(aggregator, GramianWeightedAggregator):
        if settings.global_scope and not settings.per_task:
            raise ValueError(
                f"{aggregator!r} needs the explicit global Jacobian, which jd_scope='global' never gathers for "
                "per-example objectives. Use jd_scope='local' or a Gramian-weighted aggregator (e.g. 'upgrad')."
            )
        try:
            matrix = _explicit(engine).aggregate(aggregator, losses, scale)
        except NonFiniteJacobian:
            raise NonFiniteUpdate("the Jacobian") from None
        return StepResult(matrix @ matrix.T if settings.keep_gramian else None, None)
    rows: Sequence[int] = default_rows(losses.numel()) if settings.verify and engine.self_check else ()
    can_rerun = not engine.recomputes_overflow and settings.gramian_dtype is None
    if settings.global_scope and not settings.per_task:
        # G is the same on every rank, so every rank takes the same branch (rerun, skip, weights).
        gramian, sizes = _global(engine).global_gramian(
            losses, verify_rows=rows, dtype=settings.gramian_dtype, **objective_maps(settings.row_objective)
        )
        weights = checked_weights(aggregator, gramian, can_rerun=can_rerun)
        _write(backend, engine, losses, weights[local_slice(sizes)], scale, settings.per_task)
        return StepResult(gramian, weights)
    gramian = engine.gramian(
        losses, verify_rows=rows, dtype=settings.gramian_dtype, **objective_maps(settings.row_objective)
    )
    weights = checked_weights(aggregator, gramian, can_rerun=can_rerun)
    _write(backend, engine, losses, weights, scale, settings.per_task)
    return StepResult(gramian, weights)


def _write(
    backend: Backend | None, engine: JDEngine, losses: Tensor, weights: Tensor, scale: float, per_task: bool
) -> None:
    if backend is None:
        engine.accumulate_grad(weights, scale)
    else:
        backend.write_update(engine, losses, weights, scale, per_task=per_task)


def feed_loss_values(aggregator: Aggregator, settings: StepSettings) -> None:
    """Give a loss-aware aggregator the loss values of the rows it weights, identical on every rank.

    The rows are this rank's losses (one process, or ``jd_scope="local"``), the rank-mean task losses
    (per-task global: ``J`` is the mean of the ranks' Jacobians) or every rank's losses in rank order
    (per-example global: the rows of the global Gramian).
    """
    if not isinstance(aggregator, LossAware) or settings.loss_values is None:
        return
    values = settings.loss_values.detach()
    if settings.global_scope and settings.per_task:
        values = reduced(values, "mean")
    elif settings.global_scope:
        values = all_gather_vector(values)
    aggregator.set_losses(values)


def _global(engine: JDEngine) -> GlobalGramianEngine:
    if not isinstance(engine, GlobalGramianEngine):
        raise TypeError(f"The {engine.name} engine cannot form the global Gramian of several processes.")
    return engine


def _explicit(engine: JDEngine) -> ExplicitJacobianEngine:
    if not isinstance(engine, ExplicitJacobianEngine):
        raise TypeError(
            f"This update needs the explicit Jacobian, which the {engine.name} engine never forms; "
            "use jd_engine='jacobian' (jd_engine='auto' chooses it for such settings)."
        )
    return engine


def checked_weights(aggregator: GramianWeightedAggregator, gramian: Tensor, can_rerun: bool) -> Tensor:
    """The aggregator's weights for ``gramian``, after checking that the Gramian and the weights are finite.

    ``diag(G)_i = ‖∇L_i‖²`` is finite exactly when row ``i`` of ``J`` is (and its square did not
    overflow), so a finite Gramian certifies the Jacobian without reading it.
    """
    if not bool(torch.isfinite(gramian).all()):
        if can_rerun:
            raise GramianOverflow()
        bad = torch.nonzero(~torch.isfinite(gramian.diagonal())).flatten().tolist()
        raise NonFiniteUpdate(f"the gradients of rows {bad}" if bad else "the Gramian")
    weights = aggregator.gramian_weighting(gramian)
    if not bool(torch.isfinite(weights).all()):
        raise NonFiniteUpdate(f"the weights of {aggregator!r}")
    return weights
