r"""IMTL-G: the gradient part of Impartial Multi-Task Learning.

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task Learning*, ICLR 2021;
generalised to linearly dependent rows through the pseudo-inverse of the Gramian as in Quinton & Rey,
*Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._spec import Paper, aggregator_spec
from ._weighting_bases import Weighting, check_finite_gramian


class IMTLGWeighting(Weighting):
    r"""Weights of :class:`IMTLG`.

    IMTL-G looks for an update :math:`d = J^\top w`, with :math:`\mathbf{1}^\top w = 1`, whose
    projections on the unit gradients are all equal: :math:`g_i^\top d / \|g_i\| = c` for every
    :math:`i`, i.e. :math:`G w = c\, \delta` with :math:`\delta_i = \|g_i\| = \sqrt{G_{ii}}`. With
    the Moore–Penrose pseudo-inverse, which also covers rank-deficient Gramians,

    .. math:: v = G^{+} \delta, \qquad w = v / (\mathbf{1}^\top v).

    The pseudo-inverse is computed in float64 on the CPU; eigenvalues up to
    :math:`m \, \mathrm{eps} \, \lambda_{\max}` (``eps`` of the Gramian's dtype; ``torch.linalg.pinv``'s
    default tolerance, TorchJD's) count as zero: the round-off left in a rank-deficient Gramian
    (duplicated or collinear rows) is not inverted, and an ill-conditioned but full-rank Gramian
    keeps every eigenvalue. When :math:`\mathbf{1}^\top v` vanishes (zero Gramian) the weights are
    zero.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        G = (G + G.T) / 2
        rtol = m * torch.finfo(gramian.dtype).eps
        delta = G.diagonal().clamp(min=0).sqrt()
        v = torch.linalg.pinv(G, rtol=rtol, hermitian=True) @ delta
        total = v.sum()
        if not bool(total.abs() > m * torch.finfo(torch.float64).eps * v.abs().sum()):
            weights = torch.zeros_like(v)
        else:
            weights = v / total
        return weights.to(dtype=gramian.dtype, device=gramian.device)


@aggregator_spec(
    name="imtl_g",
    summary="impartial MTL, gradient part: equal projections on the unit gradients",
    papers=(Paper("Liu et al.", "Towards Impartial Multi-task Learning", "ICLR", 2021),),
)
class IMTLG(GramianWeightedAggregator):
    r"""Combination of the rows with equal projections on every unit gradient:
    :math:`A(J) = J^\top w` with :math:`w \propto (J J^\top)^{+} \delta`, :math:`\mathbf{1}^\top w = 1`,
    :math:`\delta_i = \|g_i\|` (Liu et al., ICLR 2021; pseudo-inverse form of arXiv:2406.16232).
    See :class:`IMTLGWeighting`.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())

    def __repr__(self) -> str:
        return "IMTLG()"
