r"""PCGrad: Projecting Conflicting Gradients ("gradient surgery"), as weights of the Gramian.

Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020
(arXiv:2001.06782, Algorithm 1).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._spec import Paper, aggregator_spec
from ._weighting_bases import Weighting, check_finite_gramian


class PCGradWeighting(Weighting):
    r"""Weights of :class:`PCGrad`, computed from the Gramian only.

    For every row :math:`g_i`, start from :math:`g_i^{PC} = g_i` and visit the *original* rows
    :math:`g_j`, :math:`j \ne i`, one after the other; whenever they conflict, remove the conflicting
    component:

    .. math:: \text{if } g_i^{PC} \cdot g_j < 0: \quad
              g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2}\, g_j .

    The update is the *sum* :math:`\sum_i g_i^{PC}` (Algorithm 1 of arXiv:2001.06782). Every
    :math:`g_i^{PC}` stays a combination :math:`J^\top c_i` of the rows, and
    :math:`g_i^{PC} \cdot g_j = (G c_i)_j`, so the coefficients :math:`c_i` follow from :math:`G`
    alone and :math:`w = \sum_i c_i`.

    The paper visits the other rows in a random order. Here, to be deterministic and independent of
    the order of the rows, they are visited in increasing order of their cosine similarity with
    :math:`g_i` (most conflicting first, ties broken by index), which is one of the orders the paper
    may draw. With two objectives every order gives the same result. Zero rows are skipped. The
    computation runs in float64 on the CPU (the problem is ``m × m``), vectorised over :math:`i`.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
        G = (G + G.T) / 2
        m = G.shape[0]
        squared_norms = G.diagonal().copy()
        nonzero = squared_norms > 0
        # order[i] lists the rows j by increasing cosine similarity with g_i (up to the factor ||g_i||).
        keys = np.full((m, m), np.inf)
        norms = np.sqrt(squared_norms[nonzero])
        keys[:, nonzero] = G[:, nonzero] / norms
        order = np.argsort(keys, axis=1, kind="stable")
        coefficients = np.eye(m)  # row i: c_i, with g_i^PC = Jᵀ c_i
        rows = np.arange(m)
        for k in range(m):
            j = order[:, k]
            inner = np.einsum("ik,ik->i", G[j], coefficients)  # g_i^PC · g_j for every i
            project = (inner < 0) & (j != rows) & nonzero[j]
            coefficients[rows[project], j[project]] -= inner[project] / squared_norms[j[project]]
        weights = coefficients.sum(axis=0)
        return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)


@aggregator_spec(
    name="pcgrad",
    summary="projecting conflicting gradients",
    papers=(Paper("Yu et al.", "Gradient Surgery for Multi-Task Learning", "NeurIPS", 2020, "2001.06782"),),
)
class PCGrad(GramianWeightedAggregator):
    r"""Sums the rows of :math:`J` after removing from each the components that conflict with the
    other rows: :math:`A(J) = \sum_i g_i^{PC}` (Yu et al., arXiv:2001.06782).

    Deterministic variant: see :class:`PCGradWeighting` for the order in which the rows are
    visited. Unlike :class:`UPGrad`, the result may still conflict with some objectives when
    :math:`m > 2`.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    def __init__(self) -> None:
        super().__init__(PCGradWeighting())

    def __repr__(self) -> str:
        return "PCGrad()"
