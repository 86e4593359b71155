"""Means, standard errors, and the multi-task Δm% (Maninis, Radosavovic & Kokkinos, CVPR 2019; the definition
of LibMTL, Lin & Zhang, JMLR 2023, and of Navon et al., ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    r"""``(x̄, s / √n)`` with the sample standard deviation ``s`` (ddof 1); the error is ``nan`` for n = 1."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    if array.size == 1:
        return float(array[0]), math.nan
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


def format_mean_se(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """``"x̄ ± se"`` (``scale`` multiplies both, e.g. 100 for percentages); ``"diverged"`` if any value is not finite."""
    if any(not math.isfinite(value) for value in values):
        return "diverged"
    mean, error = mean_and_standard_error(values)
    if math.isnan(error):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {error * scale:.{digits}f}"


def delta_m(
    metrics: Mapping[str, float], single_task: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> float:
    r"""Δm% — the mean relative drop of a multi-task model against the single-task models, in percent:

    .. math:: \Delta m = \frac{100}{K} \sum_{k=1}^{K} (-1)^{\delta_k} \frac{M_k - M_k^{\mathrm{STL}}}{M_k^{\mathrm{STL}}},
              \qquad \delta_k = 1 \text{ if a higher } M_k \text{ is better, else } 0.

    Positive = worse than single-task on average, negative = better (lower is better); one metric per task.
    """
    drops = []
    for task, reference in single_task.items():
        sign = -1.0 if higher_is_better[task] else 1.0
        drops.append(sign * (metrics[task] - reference) / reference)
    return 100.0 * float(np.mean(drops))
