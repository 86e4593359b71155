r"""Geometric loss strategy (GLS): the geometric mean of the losses."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Scalarizer


class GeometricMean(Scalarizer):
    r"""The geometric mean :math:`\left(\prod_{i=1}^m L_i\right)^{1/m} = \exp\left(\frac{1}{m}\sum_i \log L_i\right)`.

    Its gradient is :math:`\frac{G}{m} \sum_i \nabla L_i / L_i` (:math:`G` the geometric mean): each loss
    is weighted by its inverse, so no loss dominates because of its scale. Computed in log space (in at
    least float32, then cast to the losses' dtype), so a product of many small losses does not underflow.
    No hyper-parameters.

    Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream Feature Aggregation and Geometric
    Loss Strategy for Multi-Task Learning*, CVPR Workshops 2019, arXiv:1904.08492.

    Raises:
        ValueError: a loss is zero or negative (the geometric mean's gradient is undefined at 0).
    """

    def forward(self, losses: Tensor, /) -> Tensor:
        if bool((losses <= 0).any()):
            bad = (losses <= 0).nonzero().flatten().tolist()
            raise ValueError(
                f"GeometricMean needs strictly positive losses, but the losses at positions {bad} are <= 0 "
                f"({losses.detach()[losses <= 0].tolist()}); its gradient (G / (m L_i)) is undefined there. "
                "Use another scalarizer for losses that can reach 0 or go negative."
            )
        work = losses.to(torch.promote_types(losses.dtype, torch.float32))
        return torch.exp(torch.log(work).mean()).to(losses.dtype)
