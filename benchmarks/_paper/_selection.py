"""The learning-rate protocol of Quinton & Rey (arXiv:2406.16232, Section 5 and Appendix): for each aggregator,
train once per rate of a log-spaced grid, keep the rate with the smallest area under the training-loss curve,
then train every seed at that rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def log_grid(low: float, high: float, points: int) -> list[float]:
    """``points`` learning rates evenly spaced in log scale from ``low`` to ``high`` (both included)."""
    if points == 1:
        return [float(math.sqrt(low * high))]
    return [float(value) for value in np.geomspace(low, high, points)]


def area_under_curve(curve: Sequence[float]) -> float:
    r"""Normalised area under a per-epoch loss curve ``L_0, …, L_E`` (trapezoids, epoch width 1, divided by E):

    .. math:: \mathrm{AUC} = \frac{1}{E} \sum_{e=1}^{E} \frac{L_{e-1} + L_e}{2}

    i.e. the mean loss level over training; ``inf`` when any value is not finite (a diverged run).
    """
    values = np.asarray(curve, dtype=float)
    if len(values) < 2 or not np.all(np.isfinite(values)):
        return math.inf
    return float(((values[:-1] + values[1:]) / 2).mean())


def select_learning_rate(areas: Mapping[float, float]) -> tuple[float, bool]:
    """The rate of smallest area (ties: the smaller rate) and whether it lies on the edge of the grid.

    A rate on the edge means the grid may not contain the best rate: the report flags it. Raises when every
    run diverged.
    """
    finite = {rate: area for rate, area in areas.items() if math.isfinite(area)}
    if not finite:
        raise ValueError(f"every learning rate of the grid diverged: {sorted(areas)}")
    best = min(sorted(finite), key=lambda rate: finite[rate])
    rates = sorted(areas)
    return best, len(rates) > 1 and best in (rates[0], rates[-1])
