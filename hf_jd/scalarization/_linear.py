r"""Fixed linear scalarizations: :class:`Mean`, :class:`Sum` and :class:`Constant` weights."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._base import Scalarizer, check_count, float64_vector, same_device


class Mean(Scalarizer):
    r"""The mean of the losses, :math:`\frac{1}{m} \sum_i L_i`: ordinary training on the average loss
    (equal weighting, "EW" in the multi-task literature)."""

    def forward(self, losses: Tensor, /) -> Tensor:
        return losses.mean()


class Sum(Scalarizer):
    r"""The sum of the losses, :math:`\sum_i L_i` (:class:`Mean` times :math:`m`)."""

    def forward(self, losses: Tensor, /) -> Tensor:
        return losses.sum()


class Constant(Scalarizer):
    r"""A fixed weighted sum :math:`\sum_i w_i L_i` with user-given weights :math:`w` (hand-tuned static task
    weights). Stateless: the weights are configuration, not part of :meth:`state_dict`.

    Args:
        weights: One weight per objective, as a 1-D tensor or a list (e.g. parsed from JSON); finite and
            not all zeros. The losses must then have exactly ``len(weights)`` entries.
    """

    weights: Tensor

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__()
        vector = float64_vector("Constant", "weights", weights)
        if not bool((vector != 0).any()):
            raise ValueError("Constant's weights are all zeros, which gives a zero loss at every step.")
        self.register_buffer("weights", vector, persistent=False)

    def forward(self, losses: Tensor, /) -> Tensor:
        check_count("Constant", losses, self.weights.numel(), "weights")
        return (same_device(self.weights, losses) * losses).sum()

    def __repr__(self) -> str:
        return f"Constant(weights={self.weights.tolist()})"
