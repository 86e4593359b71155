r"""MGDA: Multiple-Gradient Descent Algorithm (min-norm element of the convex hull of the rows).

Désidéri, *Multiple-gradient descent algorithm (MGDA) for multiobjective optimization*, Comptes
Rendus Mathématique 350 (2012); solved with the Frank–Wolfe procedure of Sener & Koltun,
*Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018 (arXiv:1810.04650, Algorithm 2).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import Tensor

from .._validation import check_integer, check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._weighting_bases import Weighting, check_finite_gramian


class MGDAWeighting(Weighting):
    r"""Weights of :class:`MGDA`: an approximate solution of

    .. math:: \alpha = \arg\min_{\alpha \in \Delta_m} \alpha^\top G \alpha,
              \qquad \Delta_m = \{\alpha \succeq 0,\ \mathbf{1}^\top \alpha = 1\},

    i.e. :math:`J^\top \alpha` is the element of minimal norm of the convex hull of the rows.

    Frank–Wolfe with exact line search, started at :math:`\alpha = \mathbf{1}/m`: at each step the
    vertex :math:`e_t` with :math:`t = \arg\min_i (G\alpha)_i` is chosen and
    :math:`\alpha \leftarrow (1-\gamma)\alpha + \gamma e_t` with the optimal
    :math:`\gamma \in [0, 1]`. It stops when :math:`\gamma <` ``epsilon``, when no descent is left (the
    Frank–Wolfe gap :math:`\alpha^\top G \alpha - (G\alpha)_t` is zero, e.g. for a zero Gramian,
    which keeps :math:`\mathbf{1}/m`), or after ``max_iters`` steps. The iteration runs in float64 on
    the CPU (the problem is ``m × m``).

    Args:
        epsilon: Step size :math:`\gamma` below which the iteration stops (must be positive).
        max_iters: Maximal number of Frank–Wolfe steps (positive integer).
    """

    epsilon = Checked("MGDA", check_positive_number)
    max_iters = Checked("MGDA", partial(check_integer, minimum=1))

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.max_iters = max_iters

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
        G = (G + G.T) / 2
        m = G.shape[0]
        alpha = np.full(m, 1.0 / max(m, 1))
        for _ in range(self.max_iters if m > 1 else 0):
            G_alpha = G @ alpha
            t = int(np.argmin(G_alpha))
            a = G_alpha[t]  # alphaᵀ G e_t
            b = alpha @ G_alpha  # alphaᵀ G alpha
            c = G[t, t]  # e_tᵀ G e_t
            gap = b - a  # Frank–Wolfe duality gap (>= 0 up to round-off)
            curvature = b + c - 2 * a  # ||Jᵀ(e_t - alpha)||²
            if not (gap > 0 and curvature > 0):
                break
            gamma = min(gap / curvature, 1.0)
            alpha *= 1.0 - gamma
            alpha[t] += gamma
            if gamma < self.epsilon:
                break
        return torch.from_numpy(alpha).to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"MGDAWeighting(epsilon={self.epsilon}, max_iters={self.max_iters})"


@aggregator_spec(
    name="mgda",
    summary="min-norm point of the convex hull of the rows, Frank–Wolfe",
    papers=(
        Paper(
            "Désidéri",
            "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
            "Comptes Rendus Mathématique",
            2012,
        ),
        Paper(
            "Sener & Koltun",
            "Multi-Task Learning as Multi-Objective Optimization",
            "NeurIPS",
            2018,
            "1810.04650",
        ),
    ),
)
class MGDA(GramianWeightedAggregator):
    r"""Returns the element of minimal norm of the convex hull of the rows of :math:`J`:
    :math:`A(J) = J^\top \alpha` with :math:`\alpha = \arg\min_{\alpha \in \Delta_m} \|J^\top \alpha\|`.

    At the optimum :math:`J A(J) \succeq \|A(J)\|^2 \mathbf{1} \succeq 0` (non-conflicting), but the
    update vanishes as soon as the objectives are Pareto-stationary and it is dominated by the
    smallest gradients. Désidéri (2012); Sener & Koltun (arXiv:1810.04650). Arguments as in
    :class:`MGDAWeighting`.
    """

    epsilon = Delegated[float]()
    max_iters = Delegated[int]()

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon=epsilon, max_iters=max_iters))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"MGDA(epsilon={w.epsilon}, max_iters={w.max_iters})"
