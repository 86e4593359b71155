"""Aggregators: maps from a Jacobian matrix ``J`` (``[m, n]``) to an update vector (``[n]``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from ._weighting_bases import GramianOfMatrix, Weighting


class Aggregator(nn.Module, ABC):
    r"""Maps a Jacobian :math:`J \in \mathbb{R}^{m \times n}` (one row per objective) to a vector
    :math:`A(J) \in \mathbb{R}^n` used as the update direction.

    Aggregators that are not :class:`GramianWeightedAggregator` need the explicit Jacobian: the
    Gramian engine cannot serve them.

    As in TorchJD, the hyper-parameters are attributes: assigning one checks it as the constructor
    does (``aggregator.c = -1`` raises), and an aggregator's are read and assigned on its weighting.
    ``str(aggregator)`` is TorchJD's short name (``UPGrad``, ``CAGrad0.5``, ``TM2``); ``repr`` shows the
    arguments (vectors as lists), evaluable. An empty Jacobian is valid: ``[0, n]`` gives the zero
    vector, ``[m, 0]`` the empty one.
    """

    differentiable: ClassVar[bool] = True
    """``False`` for methods whose weights come from a solver or a state (UPGrad, PCGrad, CAGrad, …):
    autograd would treat them as constants and give a wrong derivative, so, as in TorchJD, the result
    is computed under ``torch.no_grad()`` and does not require grad."""

    def __call__(self, matrix: Tensor) -> Tensor:
        check_matrix(matrix)
        if self.differentiable:
            return super().__call__(matrix)
        with torch.no_grad():
            return super().__call__(matrix)

    @abstractmethod
    def forward(self, matrix: Tensor) -> Tensor:
        """Return the aggregation (shape ``[n]``) of ``matrix`` (shape ``[m, n]``)."""

    @property
    def required_rows(self) -> int | None:
        """The number of objectives (rows) this aggregator is built for, or ``None`` when it takes any."""
        return None

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"

    def __str__(self) -> str:
        """A short name (TorchJD's): the class name, with the main hyper-parameter for some."""
        return self.__class__.__name__


class WeightedAggregator(Aggregator):
    r"""Aggregator of the form :math:`A(J) = J^\top w(J)`: a combination of the rows with weights
    :meth:`weights` computed from the Jacobian (TorchJD's ``WeightedAggregator``).

    ``WeightedAggregator(weighting)`` applies ``weighting`` to the Jacobian itself (as in TorchJD);
    subclasses may instead override :meth:`weights`. Only the subclass
    :class:`GramianWeightedAggregator`, whose weights depend on :math:`J` through :math:`J J^\top`
    alone, can be served by the Gramian engine; other weighted aggregators (e.g. ExcessMTL, whose
    weights read every coordinate of :math:`J`) need the explicit Jacobian.
    """

    def __init__(self, weighting: Weighting | None = None) -> None:
        super().__init__()
        if weighting is not None:
            if not isinstance(weighting, Weighting):
                raise TypeError(f"WeightedAggregator needs a Weighting, got {type(weighting).__name__}.")
            self.weighting = weighting

    def weights(self, matrix: Tensor) -> Tensor:
        """Weights ``w`` (shape ``[m]``) such that the aggregation is ``w @ matrix``."""
        weighting = getattr(self, "weighting", None)
        if not isinstance(weighting, Weighting):
            raise NotImplementedError(
                f"{type(self).__name__} has no weighting: pass one (WeightedAggregator(weighting)) or "
                "override weights()."
            )
        check_matrix(matrix)
        return weighting(matrix)

    def forward(self, matrix: Tensor) -> Tensor:
        return self.weights(matrix) @ matrix


class GramianWeightedAggregator(WeightedAggregator):
    r"""Aggregator of the form :math:`A(J) = J^\top W(J J^\top)` for a :class:`Weighting` ``W``.

    Because it only depends on :math:`J` through its Gramian, the update can be computed from the
    Gramian alone (per-parameter Gramians summed, or the Gramian engine) followed by one weighted
    backward.
    """

    def __init__(self, gramian_weighting: Weighting) -> None:
        super().__init__()
        self.gramian_weighting = gramian_weighting

    @property
    def required_rows(self) -> int | None:
        """Number of objectives the weighting is built for, or ``None`` (see :attr:`Weighting.required_rows`)."""
        return self.gramian_weighting.required_rows

    @property
    def weighting(self) -> Weighting:  # type: ignore[override]
        r"""The weighting of :math:`J` itself, :math:`J \mapsto W(J J^\top)` (TorchJD's ``weighting``):
        :meth:`weights` calls it, so forward hooks registered on it run. Not a child module: the state
        is :attr:`gramian_weighting`'s, saved once."""
        composed = self.__dict__.get("_weighting_of_matrix")
        if not isinstance(composed, GramianOfMatrix) or composed.weighting is not self.gramian_weighting:
            composed = GramianOfMatrix(self.gramian_weighting)
            self.__dict__["_weighting_of_matrix"] = composed
        return composed

    def weights(self, matrix: Tensor) -> Tensor:
        """Weights ``w`` such that the aggregation is ``w @ matrix``."""
        check_matrix(matrix)
        return self.weighting(matrix)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.gramian_weighting!r})"


def check_matrix(matrix: Tensor) -> None:
    """Raise a ``ValueError`` unless ``matrix`` is a 2-D tensor.

    An empty Jacobian is valid, as in TorchJD: with no rows (no objective) the aggregation is the zero
    vector of size ``n``, with no columns it is the empty vector.
    """
    if not isinstance(matrix, Tensor):
        raise TypeError(f"Expected a torch.Tensor, got {type(matrix).__name__}.")
    if matrix.dim() != 2:
        raise ValueError(
            f"Expected a matrix of shape [m, n] (one row per objective), got shape {tuple(matrix.shape)}."
        )


def check_finite_jacobian(owner: str, matrix: Tensor) -> None:
    """Raise a clear ``ValueError`` when the Jacobian given to ``owner`` holds NaN or inf values."""
    if not bool(matrix.isfinite().all()):
        raise ValueError(f"{owner}: the Jacobian contains NaN or inf values.")
