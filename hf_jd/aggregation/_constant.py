"""Constant: a fixed, user-given linear combination of the rows."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._validation import as_weight_vector
from ._aggregator_bases import GramianWeightedAggregator
from ._weighting_bases import Weighting


class ConstantWeighting(Weighting):
    r"""Returns the fixed weights :math:`w` given at construction, whatever the Gramian.

    Args:
        weights: One weight per objective, as a 1-D tensor or a list (e.g. parsed from JSON).
    """

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__()
        vector = as_weight_vector("Constant", "weights", weights)
        if not bool((vector != 0).any()):
            raise ValueError("Constant's weights are all zeros, which gives a zero update at every step.")
        self.weights = vector

    @property
    def required_rows(self) -> int | None:
        return self.weights.numel()

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        if self.weights.numel() != m:
            raise ValueError(
                f"Constant has {self.weights.numel()} weights but there are {m} objectives (losses). "
                "Give exactly one weight per loss."
            )
        return self.weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"ConstantWeighting(weights={self.weights.tolist()})"


class Constant(GramianWeightedAggregator):
    r"""Fixed linear combination of the rows: :math:`A(J) = J^\top w` for a constant :math:`w`.

    Useful for hand-tuned static task weights in multi-task learning. Arguments as in
    :class:`ConstantWeighting`.
    """

    gramian_weighting: ConstantWeighting

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__(ConstantWeighting(weights))

    def __repr__(self) -> str:
        return f"Constant(weights={self.gramian_weighting.weights.tolist()})"
