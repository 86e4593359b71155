"""Weightings: maps from a Gramian ``G = J Jᵀ`` (``[m, m]``) to a weight vector ``w`` (``[m]``).

Splitting an aggregator into a weighting of the Gramian followed by ``Jᵀ w`` is what lets the
Gramian engine and the distributed path compute the update without ever holding ``J``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

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

    differentiable: ClassVar[bool] = True
    """``False`` when the weights come from a solver or a state: computed under ``torch.no_grad()``
    (TorchJD's non-differentiable weightings), see :attr:`Aggregator.differentiable`."""

    def __call__(self, gramian: Tensor) -> Tensor:
        if self.accepts_matrix:
            check_matrix_input(type(self).__name__, gramian)
        else:
            check_gramian(gramian)
        if gramian.shape[0] == 0:
            return self._no_objectives(gramian)
        if self.differentiable:
            return super().__call__(gramian)
        with torch.no_grad():
            return super().__call__(gramian)

    @abstractmethod
    def forward(self, gramian: Tensor) -> Tensor:
        """Return the weights (shape ``[m]``) for the Gramian ``gramian`` (shape ``[m, m]``)."""

    @property
    def accepts_matrix(self) -> bool:
        """Whether this weighting reads only the number of rows of its input, so that it takes any
        ``[m, n]`` matrix (a Jacobian) as well as a Gramian: TorchJD's ``Weighting[Matrix]`` (Mean, Sum,
        Constant, Random) usable in ``WeightedAggregator(weighting)``. Others need a square Gramian."""
        return False

    def _no_objectives(self, stat: Tensor) -> Tensor:
        """Weights for an input with no rows (an empty Jacobian): none, without calling :meth:`forward`
        (so no state changes); a weighting built for some number of objectives refuses it."""
        required = self.required_rows
        if required not in (None, 0):
            raise ValueError(
                f"{type(self).__name__} is built for {required} objectives, but the input has none "
                f"(shape {tuple(stat.shape)})."
            )
        return stat.new_zeros(0)

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


def check_matrix_input(owner: str, matrix: Tensor) -> None:
    """Raise a ``ValueError`` unless ``matrix`` is a 2-D tensor (a Jacobian ``[m, n]`` or a Gramian)."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{owner} expected a torch.Tensor, got {type(matrix).__name__}.")
    if matrix.dim() != 2:
        raise ValueError(
            f"{owner} expected a matrix of shape [m, n] (one row per objective), got shape {tuple(matrix.shape)}."
        )


class GramianOfMatrix(Weighting):
    r"""The weighting of a Jacobian :math:`J` given by a Gramian weighting :math:`W`: :math:`w = W(J J^\top)`.

    TorchJD's ``gramian_weighting << compute_gramian``: the ``weighting`` attribute of a
    :class:`~hf_jd.aggregation.GramianWeightedAggregator`, whose hooks run when the aggregator does.
    Its other attributes are read from :math:`W` (``aggregator.weighting.n_tasks`` is
    ``aggregator.gramian_weighting.n_tasks``), :math:`W` itself is :attr:`weighting`.
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        self.weighting = weighting

    @property
    def accepts_matrix(self) -> bool:
        return True

    @property
    def required_rows(self) -> int | None:
        return self.weighting.required_rows

    def forward(self, matrix: Tensor) -> Tensor:
        return self.weighting(matrix @ matrix.T)

    def _no_objectives(self, stat: Tensor) -> Tensor:
        return self.weighting(stat @ stat.T)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("weighting")
            if inner is None:
                raise
            return getattr(inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weighting!r})"


def check_finite_gramian(gramian: Tensor) -> None:
    """Raise a clear ``ValueError`` when the Gramian holds NaN or inf values."""
    if not bool(torch.isfinite(gramian).all()):
        raise ValueError(
            "The Gramian J @ J.T contains NaN or inf values, so no dual-cone projection can be "
            "computed. This usually means a loss or a gradient overflowed: check the losses for "
            "NaN/inf, lower the learning rate, or use bf16 instead of fp16."
        )
