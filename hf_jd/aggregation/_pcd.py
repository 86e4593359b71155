r"""PCD: primary-constrained descent, a weighting of the Gramian solved with quadprog.

The quadratic program is the projection problem of Gradient Episodic Memory (Lopez-Paz & Ranzato,
*Gradient Episodic Memory for Continual Learning*, NeurIPS 2017, arXiv:1706.08840), with the primary
objective in the role of the current task and the other objectives as the constraints.
"""

from __future__ import annotations

import numpy as np
import torch
from quadprog import solve_qp
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._gramian_utils import normalize_gramian, symmetrize
from ._validation import check_integer, check_positive_number
from ._weighting_bases import Weighting, check_finite_gramian

# Relative ridge on the trace-normalised Gramian of the constraints, so that quadprog can factorise it
# when the other rows are linearly dependent. It moves the solution by at most about this much.
_RIDGE = 1e-12


class PCDWeighting(Weighting):
    r"""Weights of :class:`PCD`.

    With :math:`p` the primary objective and :math:`O` the others, the update is the vector closest to
    the primary gradient that does not increase any other objective to first order:

    .. math:: d = \arg\min_{d} \tfrac12 \|d - g_p\|^2 \quad \text{s.t.} \quad g_i^\top d \ge 0
              \ \ (i \in O).

    Its dual is a non-negative quadratic program on the Gramian,
    :math:`\mu = \arg\min_{\mu \ge 0} \tfrac12 \mu^\top G_{OO} \mu + \mu^\top G_{Op}`, and
    :math:`d = g_p + J_O^\top \mu`: the weights are :math:`1` on :math:`p`, :math:`\mu` on the others.
    It is solved exactly with quadprog (Goldfarb–Idnani) in float64 on the CPU, on the Gramian divided
    by its trace (the weights do not depend on the scale of :math:`J`; below ``norm_eps`` the Gramian
    counts as zero and the weights are :math:`e_p`), with its round-off negative eigenvalues clipped to
    zero and a :math:`10^{-12}` ridge on :math:`G_{OO}`. When :math:`g_p` conflicts with no other row,
    :math:`\mu = 0` and :math:`d = g_p`; :math:`d = 0` is feasible, so there is always a solution.

    Args:
        primary: Index of the primary objective (row of :math:`J`), default ``0``.
        norm_eps: Trace of the Gramian below which the Jacobian counts as zero (default ``1e-12``).
    """

    def __init__(self, primary: int = 0, norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.primary = check_integer("PCD", "primary", primary, minimum=0)
        self.norm_eps = check_positive_number("PCD", "norm_eps", norm_eps)

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        if self.primary >= m:
            raise ValueError(
                f"PCD(primary={self.primary}) got {m} objectives: the primary objective must be one of the "
                f"rows 0..{m - 1}."
            )
        G = normalize_gramian(
            symmetrize(gramian.detach().to(device="cpu", dtype=torch.float64)), self.norm_eps
        )
        eigenvalues, V = torch.linalg.eigh(G)
        G = ((V * eigenvalues.clamp(min=0)) @ V.T).numpy()
        weights = np.zeros(m)
        weights[self.primary] = 1.0
        others = [i for i in range(m) if i != self.primary]
        if others and bool(np.any(G)):
            G_oo = G[np.ix_(others, others)]
            G_op = G[others, self.primary]
            quadratic = (G_oo + G_oo.T) / 2 + _RIDGE * np.eye(len(others))
            mu = solve_qp(quadratic, -G_op, np.eye(len(others)), np.zeros(len(others)), 0)[0]
            weights[others] = np.clip(mu, 0.0, None)
        return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"PCDWeighting(primary={self.primary}, norm_eps={self.norm_eps})"


class PCD(GramianWeightedAggregator):
    r"""Primary-constrained descent: the update closest to the gradient of one primary objective that
    does not increase any other objective to first order,
    :math:`A(J) = \arg\min_d \|d - g_p\|` s.t. :math:`J_O d \succeq 0` (the quadratic program of GEM,
    Lopez-Paz & Ranzato, NeurIPS 2017, arXiv:1706.08840, with the primary objective as the current
    task). Solved exactly with quadprog on the Gramian (see :class:`PCDWeighting`). Gramian-only,
    deterministic, stateless; it depends on which row is primary (``primary``, default ``0``), so it
    is not invariant to the order of the rows — use it with per-task objectives whose order is fixed.
    """

    gramian_weighting: PCDWeighting

    def __init__(self, primary: int = 0, norm_eps: float = 1e-12) -> None:
        super().__init__(PCDWeighting(primary=primary, norm_eps=norm_eps))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"PCD(primary={w.primary}, norm_eps={w.norm_eps})"
