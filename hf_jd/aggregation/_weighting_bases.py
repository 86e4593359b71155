"""Weightings: maps from a Gramian ``G = J Jᵀ`` (``[m, m]``) to a weight vector ``w`` (``[m]``).

Splitting an aggregator into a weighting of the Gramian followed by ``Jᵀ w`` is what lets the
Gramian engine and the distributed path compute the update without ever holding ``J``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import torch
from torch import Tensor, nn

# What a weighting reads: a Gramian for most, a Jacobian for a few (TorchJD's ``Weighting[PSDMatrix]``
# and ``Weighting[Matrix]``); the parameter is for type checkers only.
_T = TypeVar("_T", contravariant=True, bound=Tensor)


class Weighting(nn.Module, ABC, Generic[_T]):
    r"""Maps a Gramian :math:`G = J J^\top \in \mathbb{R}^{m \times m}` to weights :math:`w \in \mathbb{R}^m`.

    Generic like TorchJD's: ``Weighting[Tensor]`` annotations are accepted (``Weighting[X]`` is
    ``Weighting`` at run time).

    The aggregated update is then :math:`J^\top w`. Subclasses implement :meth:`forward`; calling the
    module validates the Gramian first.
    """

    def __call__(self, gramian: Tensor) -> Tensor:
        check_gramian(gramian)
        return super().__call__(gramian)

    @abstractmethod
    def forward(self, gramian: Tensor) -> Tensor:
        """Return the weights (shape ``[m]``) for the Gramian ``gramian`` (shape ``[m, m]``)."""

    @property
    def required_rows(self) -> int | None:
        """The number of objectives this weighting is built for (e.g. the length of a preference vector),
        or ``None`` when it takes any number. Lets a trainer refuse a batch size that cannot fit up front.

        Weightings that hold a ``pref_vector`` tensor are sized by it; others override this property."""
        pref_vector = getattr(self, "pref_vector", None)
        return pref_vector.numel() if isinstance(pref_vector, Tensor) else None

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


def check_gramian(gramian: Tensor) -> None:
    """Raise a ``ValueError`` unless ``gramian`` is a square 2-D tensor."""
    if not isinstance(gramian, Tensor):
        raise TypeError(f"Expected the Gramian to be a torch.Tensor, got {type(gramian).__name__}.")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"Expected a square Gramian of shape [m, m], got shape {tuple(gramian.shape)}. "
            "A Gramian is J @ J.T where J has one row per objective."
        )


def check_finite_gramian(gramian: Tensor) -> None:
    """Raise a clear ``ValueError`` when the Gramian holds NaN or inf values."""
    if not bool(torch.isfinite(gramian).all()):
        raise ValueError(
            "The Gramian J @ J.T contains NaN or inf values, so no dual-cone projection can be "
            "computed. This usually means a loss or a gradient overflowed: check the losses for "
            "NaN/inf, lower the learning rate, or use bf16 instead of fp16."
        )
