"""Sum: the plain sum of the rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._spec import aggregator_spec
from ._weighting_bases import Weighting


class SumWeighting(Weighting):
    r"""Unit weights :math:`w = \mathbf{1}`; :math:`J^\top w` is the sum of the gradients.

    Reads only the number of rows: it takes a Jacobian as well as a Gramian."""

    @property
    def accepts_matrix(self) -> bool:
        return True  # reads only the number of rows: a Jacobian works as well as a Gramian (TorchJD)

    def forward(self, gramian: Tensor) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


@aggregator_spec(
    name="sum",
    summary="the sum of the rows",
)
class Sum(GramianWeightedAggregator):
    r"""Sums the rows of :math:`J`: :math:`A(J) = J^\top \mathbf{1}`.

    With per-example losses this is the gradient of the summed loss (``m`` times :class:`Mean`).
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())

    def __repr__(self) -> str:
        return "Sum()"
