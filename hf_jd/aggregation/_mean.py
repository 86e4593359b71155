"""Mean: the ordinary (empirical-risk) average of the rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._spec import aggregator_spec
from ._weighting_bases import Weighting


class MeanWeighting(Weighting):
    r"""Uniform weights :math:`w = \frac{1}{m}\mathbf{1}`; :math:`J^\top w` is the mean gradient.

    Reads only the number of rows: it takes a Jacobian as well as a Gramian."""

    @property
    def accepts_matrix(self) -> bool:
        return True  # reads only the number of rows: a Jacobian works as well as a Gramian (TorchJD)

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        return torch.full((m,), 1.0 / max(m, 1), dtype=gramian.dtype, device=gramian.device)


@aggregator_spec(
    name="mean",
    summary="the average of the rows (ordinary training)",
)
class Mean(GramianWeightedAggregator):
    r"""Averages the rows of :math:`J`: :math:`A(J) = \frac{1}{m} J^\top \mathbf{1}`.

    With per-example losses this is exactly the gradient of the mean loss (ordinary training).
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())

    def __repr__(self) -> str:
        return "Mean()"
