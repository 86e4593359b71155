"""TrimmedMean: coordinate-wise trimmed mean of the rows (needs the explicit Jacobian)."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .._validation import check_integer
from ._aggregator_bases import Aggregator
from ._attributes import Checked
from ._spec import Paper, aggregator_spec


@aggregator_spec(
    name="trimmed_mean",
    summary="coordinate-wise trimmed mean",
    papers=(
        Paper(
            "Yin et al.",
            "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
            "ICML",
            2018,
        ),
    ),
    needs_jacobian=True,
    example_kwargs=lambda m: {"trim_number": max(0, min(1, (m - 1) // 2))},
)
class TrimmedMean(Aggregator):
    r"""For every coordinate, drops the ``trim_number`` largest and smallest entries of the column
    and averages the rest (Yin et al., *Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates*, ICML 2018).

    It is not a function of :math:`J J^\top`, so it forces the explicit-Jacobian engine.

    Args:
        trim_number: How many values to drop at each end of every column; needs
            ``m > 2 * trim_number``.
    """

    trim_number = Checked("TrimmedMean", partial(check_integer, minimum=0))

    def __init__(self, trim_number: int = 1) -> None:
        super().__init__()
        self.trim_number = trim_number

    def forward(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        if m <= 2 * self.trim_number:
            raise ValueError(
                f"TrimmedMean(trim_number={self.trim_number}) needs more than {2 * self.trim_number} rows, "
                f"got {m}. Use a larger batch or a smaller trim_number."
            )
        sorted_columns = torch.sort(matrix, dim=0).values
        return sorted_columns[self.trim_number : m - self.trim_number].mean(dim=0)

    def __repr__(self) -> str:
        return f"TrimmedMean(trim_number={self.trim_number})"

    def __str__(self) -> str:
        return f"TM{self.trim_number}"
