r"""JD diagnostics computed from the Gramian, the weights and the losses of a step.

All of them only need :math:`G = J J^\top` (``[m, m]``), so they cost nothing compared to the step
and are only computed on logging steps:

* ``jd/weight_min``, ``jd/weight_max``: range of the aggregation weights :math:`w` (times ``m``, so
  that the mean gives 1);
* ``jd/conflict_fraction``: fraction of pairs :math:`i<j` with :math:`g_i \cdot g_j < 0`;
* ``jd/min_cosine``: :math:`\min_{i<j} G_{ij} / \sqrt{G_{ii} G_{jj}}`;
* ``jd/update_norm`` :math:`\|J^\top w\| = \sqrt{w^\top G w}`, ``jd/mean_grad_norm``
  :math:`\|\frac1m J^\top \mathbf 1\|`, and their ratio ``jd/update_to_mean_grad_norm``;
* ``jd/max_loss``: the largest loss of the vector;
* per task (``jd_objectives="per_task"``), ``jd/task_loss/<name>`` and ``jd/task_weight/<name>`` (the
  task's weight times ``k``), with the names the model gave its task losses (``task_<i>`` for a tuple).

With ``jd_gramian="representation"`` the Gramian is :math:`G^z` of the task gradients at the shared
representation, so the cosines and norms above are those of the representation gradients, not of the
parameter gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def step_metrics(
    gramian: Tensor,
    weights: Tensor | None,
    losses: Tensor,
    grad_scale: float = 1.0,
    task_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Return the JD metrics of one micro-batch. ``grad_scale`` undoes fp16 loss scaling of ``G``;
    ``task_names`` (one per loss) adds the per-task losses and weights."""
    G = gramian.detach().double() / (grad_scale**2)
    m = G.shape[0]
    metrics: dict[str, float] = {"jd/max_loss": float(losses.detach().max())}
    norms = G.diagonal().clamp(min=0).sqrt()
    if m > 1:
        i, j = torch.triu_indices(m, m, offset=1, device=G.device)
        off_diagonal = G[i, j]
        metrics["jd/conflict_fraction"] = float((off_diagonal < 0).double().mean())
        valid = (norms[i] > 0) & (norms[j] > 0)
        if bool(valid.any()):
            cosines = off_diagonal[valid] / (norms[i][valid] * norms[j][valid])
            metrics["jd/min_cosine"] = float(cosines.min().clamp(-1.0, 1.0))
    ones = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
    mean_norm = math.sqrt(max(float(ones @ G @ ones), 0.0))
    metrics["jd/mean_grad_norm"] = mean_norm
    if weights is not None:
        w = weights.detach().double().to(G.device)
        update_norm = math.sqrt(max(float(w @ G @ w), 0.0))
        metrics["jd/weight_min"] = float(w.min()) * m
        metrics["jd/weight_max"] = float(w.max()) * m
        metrics["jd/update_norm"] = update_norm
        if mean_norm > 0:
            metrics["jd/update_to_mean_grad_norm"] = update_norm / mean_norm
    if task_names is not None:
        metrics.update(task_metrics(task_names, losses, weights))
    return metrics


def task_metrics(task_names: Sequence[str], losses: Tensor, weights: Tensor | None) -> dict[str, float]:
    """``jd/task_loss/<name>`` for each task, and ``jd/task_weight/<name>`` (weight times ``k``)."""
    if len(task_names) != losses.numel():
        raise ValueError(
            f"{len(task_names)} task names for {losses.numel()} task losses: {list(task_names)}."
        )
    values = losses.detach().double().cpu().tolist()
    metrics = {f"jd/task_loss/{name}": value for name, value in zip(task_names, values)}
    if weights is not None:
        scaled = (weights.detach().double().cpu() * len(task_names)).tolist()
        metrics.update({f"jd/task_weight/{name}": value for name, value in zip(task_names, scaled)})
    return metrics


_REDUCTIONS = {"jd/weight_min": min, "jd/min_cosine": min, "jd/weight_max": max, "jd/max_loss": max}


class MetricsAccumulator:
    """Combines the metrics of the micro-batches of one optimizer step (min/max or mean)."""

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._values.setdefault(key, []).append(value)

    def pop(self) -> dict[str, float]:
        combined = {
            key: _REDUCTIONS.get(key, lambda values: sum(values) / len(values))(values)
            for key, values in self._values.items()
        }
        self._values = {}
        return {key: round(value, 6) for key, value in combined.items()}

    def __bool__(self) -> bool:
        return bool(self._values)
