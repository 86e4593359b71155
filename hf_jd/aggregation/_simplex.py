"""Euclidean projection onto the probability simplex (used by MoCo, MoDo and SDMGrad)."""

from __future__ import annotations

import numpy as np


def project_onto_simplex(v: np.ndarray) -> np.ndarray:
    r""":math:`\arg\min_{w \in \Delta_m} \|w - v\|`, :math:`\Delta_m = \{w \succeq 0, \mathbf 1^\top w = 1\}`.

    Exact, by sorting (Held, Wolfe & Crowder, *Validation of subgradient optimization*, Math.
    Programming 1974; Duchi et al., ICML 2008): :math:`w = \max(v - \theta, 0)` with the threshold
    :math:`\theta` read from the sorted entries. ``v`` is first shifted by its maximum (the
    projection is invariant to adding a constant to every entry), so that entries of size
    :math:`10^{20}` keep the precision of their differences.
    """
    v = np.asarray(v, dtype=np.float64)
    v = v - v.max()
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    k = np.arange(1, v.size + 1)
    rho = int(np.nonzero(u - cumulative / k > 0)[0][-1])
    w = np.maximum(v - cumulative[rho] / (rho + 1), 0.0)
    return w / w.sum()
