r"""CAGrad: Conflict-Averse Gradient descent.

Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS 2021
(arXiv:2110.14048, Algorithm 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from quadprog import solve_qp
from torch import Tensor

from .._validation import check_non_negative_number, check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._gramian_utils import normalize_gramian, symmetrize
from ._spec import Paper, aggregator_spec
from ._weighting_bases import Weighting, check_finite_gramian

# Relative ridge added to the trace-normalised Gramian so that quadprog's Cholesky factorisation
# exists for rank-deficient Gramians. It changes the inner objective by at most this much.
_RIDGE = 1e-12
# Relative width of the bracket on the inner scale parameter at which the search stops.
_RHO_RTOL = 1e-13
# Absolute tolerance on f (in units of the trace-normalised norms, which are at most 1).
_F_ATOL = 1e-15
_MAX_STEPS = 200


def _simplex_qp(G: np.ndarray, rho: float, b: np.ndarray) -> np.ndarray:
    r""":math:`\arg\min_{w \in \Delta} \tfrac12 w^\top G w + \rho\, b^\top w` (Goldfarb–Idnani)."""
    m = G.shape[0]
    constraints = np.hstack([np.ones((m, 1)), np.eye(m)])
    bounds = np.concatenate([[1.0], np.zeros(m)])
    w = solve_qp(G, -rho * b, constraints, bounds, 1)[0]
    w = np.clip(w, 0.0, None)
    return w / w.sum()


def _solve_cagrad_dual(G: np.ndarray, b: np.ndarray, s: float, norm_eps: float) -> np.ndarray:
    r"""Solve :math:`\min_{w \in \Delta} b^\top w + s \sqrt{w^\top G w}` (``s > 0``).

    With :math:`\sqrt{q} = \min_{t > 0} q/(2t) + t/2`, the problem is the minimum over ``t`` of
    :math:`h(t) = s t / 2 + \min_{w \in \Delta} b^\top w + s\, w^\top G w / (2t)`, a convex function
    of ``t``. With :math:`\rho = t / s` the inner problem is the simplex QP
    :math:`w(\rho) = \arg\min \tfrac12 w^\top G w + \rho\, b^\top w`, and
    :math:`h'(t) \propto 1 - r(\rho)^2 / t^2` with :math:`r(\rho) = \sqrt{w(\rho)^\top G w(\rho)}`,
    so the solution is the unique root of :math:`f(\rho) = s \rho - r(\rho)`, which changes sign once.
    It is bracketed in ``[norm_eps * 1e-3 / s, 1 / s]`` and refined, on a log scale, by the
    Illinois variant of regula falsi until the bracket is narrower than ``1e-13`` (relative) or
    :math:`|f| \le 10^{-15}`.
    """
    m = G.shape[0]
    G_qp = G + _RIDGE * np.eye(m)

    def f(rho: float) -> tuple[float, np.ndarray]:
        w = _simplex_qp(G_qp, rho, b)
        return s * rho - math.sqrt(max(float(w @ G @ w), 0.0)), w

    # The root t* = s * rho* is the norm of a point of the convex hull: at most max_i ||g_i|| <= 1
    # (trace-normalised Gramian), so f(1/s) >= 0. Below rho_min the root would give
    # ||g_w|| < norm_eps * 1e-3, which the caller treats as zero anyway.
    rho_max, rho_min = 1.0 / s, norm_eps * 1e-3 / s
    f_max, w_max = f(rho_max)
    if f_max <= 0:
        return w_max
    f_min, w_min = f(rho_min)
    if f_min >= 0:
        return w_min
    lo, hi = (rho_min, f_min, w_min), (rho_max, f_max, w_max)
    (a, fa, wa), (c, fc, wc) = lo, hi
    side = 0
    for _ in range(_MAX_STEPS):
        if c - a <= _RHO_RTOL * c or min(-fa, fc) <= _F_ATOL:
            break
        # Illinois step, in log(rho) (the root is found on a log scale), clamped inside the bracket.
        la, lc = math.log(a), math.log(c)
        lr = (la * fc - lc * fa) / (fc - fa) if fc != fa else 0.5 * (la + lc)
        lr = min(max(lr, la + 0.01 * (lc - la)), lc - 0.01 * (lc - la))
        rho = math.exp(lr)
        f_rho, w_rho = f(rho)
        if f_rho == 0:
            return w_rho
        if f_rho < 0:
            a, fa, wa = rho, f_rho, w_rho
            if side == -1:
                fc /= 2
            side = -1
        else:
            c, fc, wc = rho, f_rho, w_rho
            if side == 1:
                fa /= 2
            side = 1
    return wc if fc <= -fa else wa


class CAGradWeighting(Weighting):
    r"""Weights of :class:`CAGrad`.

    With :math:`g_0 = \frac1m \sum_i g_i` the average gradient, CAGrad looks for the update
    :math:`d` in the ball :math:`\|d - g_0\| \le c \|g_0\|` that maximises the worst improvement
    :math:`\min_i g_i^\top d`. Its dual is a problem over the simplex :math:`\Delta_m`,

    .. math:: w^\star = \arg\min_{w \in \Delta_m} g_w^\top g_0 + \sqrt\phi\, \|g_w\|, \qquad
              g_w = J^\top w,\ \sqrt\phi = c \|g_0\|,

    and the update is :math:`d = g_0 + \frac{\sqrt\phi}{\|g_w\|} g_w`, i.e. the weights
    :math:`\frac1m \mathbf 1 + \frac{\sqrt\phi}{\|g_{w^\star}\|} w^\star` (no rescaling by
    :math:`1 + c^2`, as in TorchJD). Everything depends on :math:`G` only:
    :math:`g_w^\top g_0 = w^\top G \mathbf 1 / m` and :math:`\|g_w\|^2 = w^\top G w`.

    The Gramian is first divided by its trace (below ``norm_eps`` it counts as zero), so the
    weights do not depend on the scale of :math:`J`. When :math:`\|g_{w^\star}\|` is below
    ``norm_eps`` (the objectives are about Pareto-stationary) the weights are zero, as in TorchJD;
    with ``c = 0`` they are :math:`\frac1m \mathbf 1` (gradient descent on the mean).

    The dual problem is solved without a conic solver: it is the minimum over a scalar ``t`` of a
    convex function whose evaluation is one simplex QP (quadprog, float64 on the CPU, on the
    normalised Gramian with its round-off negative eigenvalues clipped to zero, plus a
    :math:`10^{-12}` ridge so that rank-deficient Gramians can be factorised); the optimal
    ``t`` is the root of a monotone scalar function, found to a relative precision of
    :math:`10^{-13}` (see :func:`_solve_cagrad_dual`).

    Args:
        c: Radius of the ball around :math:`g_0`, relative to :math:`\|g_0\|` (``c >= 0``). The
            paper uses ``c = 0.4`` on NYUv2/Cityscapes and ``0.5`` as the usual default; ``c = 0``
            is gradient descent on the mean.
        norm_eps: Threshold below which the trace of the Gramian and the normalised norm
            :math:`\|g_w\|` count as zero.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    c = Checked("CAGrad", check_non_negative_number)
    norm_eps = Checked("CAGrad", check_positive_number)

    def __init__(self, c: float = 0.5, norm_eps: float = 1e-4) -> None:
        super().__init__()
        self.c = c
        self.norm_eps = norm_eps

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        G = normalize_gramian(
            symmetrize(gramian.detach().to(device="cpu", dtype=torch.float64)), self.norm_eps
        )
        # Clip the negative eigenvalues left by round-off (a float32 Gramian of rank-deficient rows
        # has some of order eps): the QP needs a positive semi-definite matrix.
        eigenvalues, V = torch.linalg.eigh(G)
        G = ((V * eigenvalues.clamp(min=0)) @ V.T).numpy()
        G = (G + G.T) / 2
        mean = np.full(m, 1.0 / m)
        b = G @ mean  # G 1/m: g_w . g_0 = w . b
        sqrt_phi = self.c * math.sqrt(max(float(mean @ b), 0.0))
        if not bool(np.any(G)):
            weights = np.zeros(m)
        elif sqrt_phi == 0.0:
            weights = mean
        else:
            w = _solve_cagrad_dual(G, b, sqrt_phi, self.norm_eps)
            g_w_norm = math.sqrt(max(float(w @ G @ w), 0.0))
            weights = mean + (sqrt_phi / g_w_norm) * w if g_w_norm >= self.norm_eps else np.zeros(m)
        return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"CAGradWeighting(c={self.c}, norm_eps={self.norm_eps})"


@aggregator_spec(
    name="cagrad",
    summary="conflict-averse GD: the best worst-case step in a ball around the mean",
    papers=(
        Paper(
            "Liu et al.",
            "Conflict-Averse Gradient Descent for Multi-task Learning",
            "NeurIPS",
            2021,
            "2110.14048",
        ),
    ),
)
class CAGrad(GramianWeightedAggregator):
    r"""Conflict-Averse Gradient descent (Liu et al., *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021, arXiv:2110.14048).

    :math:`A(J) = g_0 + \frac{c\|g_0\|}{\|g_{w^\star}\|} g_{w^\star}`, where :math:`g_0` is the mean
    row and :math:`w^\star = \arg\min_{w \in \Delta_m} g_w^\top g_0 + c\|g_0\| \|g_w\|` — the
    maximiser of :math:`\min_i g_i^\top d` over the ball :math:`\|d - g_0\| \le c\|g_0\|`.
    Gramian-only, deterministic, stateless. Hyper-parameters: ``c`` (default ``0.5``; ``0.4`` in the
    paper's scene-understanding experiments) and ``norm_eps`` (``1e-4``). Matches TorchJD's
    ``CAGrad(c, norm_eps)``. Arguments and solver as in :class:`CAGradWeighting`.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    c = Delegated[float]()
    norm_eps = Delegated[float]()

    def __init__(self, c: float = 0.5, norm_eps: float = 1e-4) -> None:
        super().__init__(CAGradWeighting(c=c, norm_eps=norm_eps))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"CAGrad(c={w.c}, norm_eps={w.norm_eps})"

    def __str__(self) -> str:
        return f"CAGrad{self.c}"
