"""Constant: a fixed, user-given linear combination of the rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._weighting_bases import Weighting


class ConstantWeighting(Weighting):
    r"""Returns the fixed weights :math:`w` given at construction, whatever the Gramian.

    Args:
        weights: One weight per objective, as a 1-D tensor or a list (e.g. parsed from JSON).
    """

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__()
        try:
            vector = torch.as_tensor(weights, dtype=torch.get_default_dtype()).detach()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"Constant weights must be a 1-D list of numbers, got {weights!r}.") from error
        if vector.dim() != 1 or vector.numel() == 0:
            raise ValueError(
                f"Constant weights must be a non-empty 1-D list of numbers, got shape {tuple(vector.shape)}."
            )
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("Constant weights must contain only finite values.")
        self.weights = vector

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

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__(ConstantWeighting(weights))

    def __repr__(self) -> str:
        return f"Constant(weights={self.gramian_weighting.weights.tolist()})"
