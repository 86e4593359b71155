r"""Preference-based multi-objective scalarizations: smooth Tchebycheff, PBI and COSMOS.

Each takes an optional preference vector (``weights``, one entry per objective; uniform when omitted)
and is stateless: the vectors are configuration, moved with the module but not in :meth:`state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import check_non_negative_number, check_positive_number
from ._base import Scalarizer, check_count, optional_vector, preference_vector, same_device

Vector = Tensor | Sequence[float]


class _PreferenceScalarizer(Scalarizer):
    """Holds the optional ``weights`` and ``reference`` vectors and resolves them for a loss vector."""

    weights: Tensor | None
    reference: Tensor | None

    def _set_vectors(self, weights: Vector | None, reference: Vector | None = None) -> None:
        owner = type(self).__name__
        pref = None if weights is None else preference_vector(owner, "weights", weights)
        self.register_buffer("weights", pref, persistent=False)
        self.register_buffer("reference", optional_vector(owner, "reference", reference), persistent=False)
        if pref is not None and self.reference is not None and pref.numel() != self.reference.numel():
            raise ValueError(
                f"{owner}'s weights ({pref.numel()} entries) and reference ({self.reference.numel()}) differ in length."
            )

    def _weights_for(self, losses: Tensor) -> Tensor:
        if self.weights is None:
            return torch.full_like(losses, 1.0 / losses.numel())
        check_count(type(self).__name__, losses, self.weights.numel(), "weights")
        return same_device(self.weights, losses)

    def _shifted(self, losses: Tensor) -> Tensor:
        if self.reference is None:
            return losses
        check_count(type(self).__name__, losses, self.reference.numel(), "a reference point")
        return losses - same_device(self.reference, losses)


class STCH(_PreferenceScalarizer):
    r"""Smooth Tchebycheff scalarization:

    .. math::
        \mu \log \sum_{i=1}^m \exp\left(\frac{\lambda_i (L_i - z^*_i)}{\mu}\right),

    a smooth upper bound of the weighted Tchebycheff (worst-objective) scalarization
    :math:`\max_i \lambda_i (L_i - z^*_i)`, within :math:`\mu \log m` of it. ``torch.logsumexp``
    factors the maximum out, so a small :math:`\mu` does not overflow. Its gradient weights loss :math:`i` by
    :math:`\lambda_i \,\mathrm{softmax}(\lambda (L - z^*) / \mu)_i`: the worst objectives dominate.

    Lin, Zhang, Yang, Liu, Wang & Zhang, *Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization*, ICML 2024, arXiv:2402.19078. The paper studies several :math:`\mu` (e.g. 0.01 to 1) with
    no single best value, hence ``mu`` is required (as in TorchJD). This class implements the
    scalarization itself; the paper's multi-task recipe additionally normalises the losses by a nadir
    point averaged over warm-up epochs, which is not done here.

    Args:
        mu: Smoothing :math:`\mu > 0`; smaller is closer to the maximum.
        weights: Preference :math:`\lambda` (non-negative, not all zero); default uniform :math:`1/m`.
        reference: Ideal point :math:`z^*` subtracted from the losses; default 0.
    """

    def __init__(self, mu: float, weights: Vector | None = None, reference: Vector | None = None) -> None:
        super().__init__()
        self.mu = check_positive_number("STCH", "mu", mu)
        self._set_vectors(weights, reference)

    def forward(self, losses: Tensor, /) -> Tensor:
        y = self._weights_for(losses) * self._shifted(losses)
        return self.mu * torch.logsumexp(y / self.mu, dim=0)  # logsumexp factors the maximum out

    def __repr__(self) -> str:
        return f"STCH(mu={self.mu})"


class PBI(_PreferenceScalarizer):
    r"""Penalty-based boundary intersection: with :math:`\hat w = w / \lVert w \rVert` and
    :math:`f = L - z^*`,

    .. math::
        d_1 = f^\top \hat w, \qquad d_2 = \lVert f - d_1 \hat w \rVert, \qquad d_1 + \theta d_2,

    the progress along the preference direction plus a penalty on the distance from it. At
    :math:`d_2 = 0` the norm is not differentiable; its subgradient 0 is used (no smoothing term, so the
    value is exact). Paper default :math:`\theta = 5`.

    Zhang & Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition*, IEEE
    Transactions on Evolutionary Computation 11(6), 2007 (no arXiv version).

    Args:
        theta: Penalty :math:`\theta \ge 0` (0 gives the projection :math:`d_1` only).
        weights: Preference direction :math:`w` (non-negative, not all zero); default uniform. TorchJD
            requires it; here it may be omitted.
        reference: Ideal point :math:`z^*` (a lower bound of the losses); default 0.
    """

    def __init__(
        self, theta: float = 5.0, weights: Vector | None = None, reference: Vector | None = None
    ) -> None:
        super().__init__()
        self.theta = check_non_negative_number("PBI", "theta", theta)
        self._set_vectors(weights, reference)

    def forward(self, losses: Tensor, /) -> Tensor:
        w = self._weights_for(losses)
        direction = w / torch.linalg.vector_norm(w)
        f = self._shifted(losses)
        d1 = (f * direction).sum()
        d2 = torch.linalg.vector_norm(f - d1 * direction)
        return d1 + self.theta * d2

    def __repr__(self) -> str:
        return f"PBI(theta={self.theta})"


class COSMOS(_PreferenceScalarizer):
    r"""COSMOS: a linear scalarization rewarded for pointing the loss vector along the preference,

    .. math::
        \sum_i r_i L_i - \lambda \frac{r^\top L}{\lVert r \rVert \, \lVert L \rVert}
        = r^\top L - \lambda \cos(r, L).

    Ruchte & Grabocka, *Scalable Pareto Front Approximation for Deep Multi-Objective Learning*, ICDM 2021,
    arXiv:2103.13392. The paper tunes :math:`\lambda` per data set (0.01 to 8), hence ``lambda_`` is
    required (as in TorchJD). The full method also samples :math:`r` from a Dirichlet distribution at
    every step and feeds it to the model as an input, to learn the whole Pareto front in one network;
    that is a modelling choice left to the user: here :math:`r` is fixed.

    Args:
        lambda_: Cosine-similarity coefficient :math:`\lambda \ge 0` (0 gives :math:`r^\top L`).
        weights: Preference :math:`r` (non-negative, not all zero); default uniform :math:`1/m`.

    Raises:
        ValueError: all losses are 0 (the cosine is undefined).
    """

    def __init__(self, lambda_: float, weights: Vector | None = None) -> None:
        super().__init__()
        self.lambda_ = check_non_negative_number("COSMOS", "lambda_", lambda_)
        self._set_vectors(weights)

    def forward(self, losses: Tensor, /) -> Tensor:
        r = self._weights_for(losses)
        norm = torch.linalg.vector_norm(losses)
        if self.lambda_ > 0 and not bool(norm > 0):
            raise ValueError(
                "COSMOS got all-zero losses: the cosine between the preference and the losses is undefined."
            )
        linear = (r * losses).sum()
        if self.lambda_ == 0:
            return linear
        return linear - self.lambda_ * linear / (torch.linalg.vector_norm(r) * norm)

    def __repr__(self) -> str:
        return f"COSMOS(lambda_={self.lambda_})"
