r"""The KKT certificate of :math:`\min_v \tfrac12 v^\top G v` s.t. :math:`v \succeq u`, and its scale.

The solver works on the equilibrated problem (:func:`equilibrate`) and certifies a row when its
relative residuals (:func:`kkt_residuals`) are within :func:`kkt_tolerance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_EPS = torch.finfo(torch.float64).eps

NOT_PD_MESSAGE = (
    "The Gramian passed to the dual-cone solver is not positive definite. Normalise it and add a "
    "small ridge first (see hf_jd.aggregation._gramian_utils.regularize_gramian)."
)


@dataclass(frozen=True)
class KKTResiduals:
    """Relative KKT residuals per row (each of shape ``[k]``); see :func:`kkt_residuals`."""

    primal: Tensor
    dual: Tensor
    complementarity: Tensor


def kkt_tolerance(m: int) -> float:
    """Relative tolerance of the KKT certificate for ``m`` objectives (float64 arithmetic).

    See :func:`kkt_residuals` for the quantities it bounds.
    """
    return 64.0 * max(m, 16) * _EPS


def kkt_residuals(U: Tensor, gramian: Tensor, V: Tensor) -> KKTResiduals:
    r"""Relative KKT residuals of ``V`` for :math:`\min_v \tfrac12 v^\top G v` s.t. :math:`v \succeq u`.

    The problem is first brought to the scale the certificate uses, which does not change its
    solution: with :math:`D = \mathrm{diag}(G)`, :math:`\tilde G = D^{-1/2} G D^{-1/2}` (unit
    diagonal), :math:`\tilde v = D^{1/2} v / c` and :math:`\tilde u = D^{1/2} u / c`, where
    :math:`c = \|D^{1/2} u\|_\infty` (``1`` for a zero row). With :math:`\lambda = \tilde G \tilde v`,
    :math:`s_v = \max(1, \|\tilde v\|_\infty)` and :math:`s_\lambda = \max(1, \|\tilde v\|_1)` (a bound
    on :math:`\|\lambda\|_\infty`), per row:

    * ``primal``: :math:`\max_j (\tilde u_j - \tilde v_j)_+ / s_v` (feasibility :math:`v \succeq u`);
    * ``dual``: :math:`\max_j (-\lambda_j)_+ / s_\lambda` (:math:`\lambda \succeq 0`);
    * ``complementarity``: :math:`\max_j |\lambda_j|\,|\tilde v_j - \tilde u_j| / (s_\lambda (1 + s_v))`.

    Stationarity :math:`\tilde G \tilde v - \lambda = 0` holds by the definition of :math:`\lambda`.
    All three are ``0`` at the exact solution; the solver certifies a row when all three are at most
    :func:`kkt_tolerance`.
    """
    m = gramian.shape[0]
    G = gramian.detach().to(torch.float64)
    U64 = U.detach().reshape(-1, m).to(device=G.device, dtype=torch.float64)
    V64 = V.detach().reshape(-1, m).to(device=G.device, dtype=torch.float64)
    Gs, Us, sqrt_diag, scale_u = equilibrate(G, U64)
    Vs = V64 * sqrt_diag / scale_u[:, None]
    return residuals(Us, Vs, Vs @ Gs)


def equilibrate(G: Tensor, U: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Symmetrise and equilibrate: :math:`\tilde G = D^{-1/2} G D^{-1/2}`, rows of :math:`D^{1/2} U`
    divided by their largest magnitude. Returns ``(G~, U~, sqrt(diag G), row scales)``."""
    G = (G + G.T) / 2
    diag = G.diagonal()
    if not bool((diag > 0).all()):
        raise ValueError(NOT_PD_MESSAGE)
    sqrt_diag = diag.sqrt()
    G = G / sqrt_diag[:, None] / sqrt_diag[None, :]
    U = U * sqrt_diag
    scale_u = U.abs().amax(dim=1)
    scale_u = torch.where(scale_u > 0, scale_u, torch.ones_like(scale_u))
    return G, U / scale_u[:, None], sqrt_diag, scale_u


def residuals(Us: Tensor, Vs: Tensor, lam: Tensor) -> KKTResiduals:
    """Relative KKT residuals of equilibrated rows (see :func:`kkt_residuals`)."""
    scale_v = Vs.abs().amax(dim=1).clamp(min=1.0)
    scale_lam = Vs.abs().sum(dim=1).clamp(min=1.0)
    gap = Vs - Us
    return KKTResiduals(
        primal=(-gap).clamp(min=0).amax(dim=1) / scale_v,
        dual=(-lam).clamp(min=0).amax(dim=1) / scale_lam,
        complementarity=(lam.abs() * gap.abs()).amax(dim=1) / (scale_lam * (1 + scale_v)),
    )
