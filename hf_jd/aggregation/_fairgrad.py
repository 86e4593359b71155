r"""FairGrad: alpha-fair resource allocation between the tasks, as a weighting of the Gramian.

Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024 (arXiv:2402.15638).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from .._validation import check_integer, check_non_negative_number, check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._alpha_fair import solve_alpha_fair
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._weighting_bases import Weighting, check_finite_gramian


class FairGradWeighting(Weighting):
    r"""Weights of :class:`FairGrad`.

    FairGrad chooses the update :math:`d` that maximises the :math:`\alpha`-fair utility
    :math:`\sum_i \frac{(g_i^\top d)^{1-\alpha}}{1-\alpha}` (:math:`\sum_i \log g_i^\top d` for
    :math:`\alpha = 1`) over a ball. Its optimality conditions with :math:`d = J^\top w` are

    .. math:: G w = w^{-1/\alpha} \quad (\text{elementwise}), \qquad w > 0 .

    :math:`\alpha = 1` is Nash-MTL's bargaining solution, :math:`\alpha \to \infty` approaches the
    max-min fair (MGDA-like) allocation and :math:`\alpha \to 0` the plain sum. The official code
    solves the system with ``scipy.optimize.least_squares``; here it is the stationarity condition
    of a strictly convex problem solved by a damped Newton method in float64 (see
    :func:`~hf_jd.aggregation._alpha_fair.solve_alpha_fair`) until every equation holds to a
    relative :math:`10^{-12}` (where float64 round-off allows), or for at most ``max_iter`` steps.
    A :math:`10^{-8}` relative ridge on the diagonal of :math:`G` makes it solvable for
    Pareto-stationary rows; zero rows get weight 0. When ``max_norm > 0`` the weights are scaled
    down so that :math:`\|J^\top w\| \le` ``max_norm``. Deterministic and stateless.

    Args:
        alpha: Fairness exponent :math:`\alpha > 0` (default ``1.0``; the paper tunes it per
            benchmark, e.g. ``2.0`` on QM9).
        max_norm: Largest norm of the update; ``0`` (default) disables the clipping.
        max_iter: Maximal number of Newton steps (default ``100``).
        max_iters: TorchJD's name (keyword only): when given, it sets ``max_iter``; ``None`` (default)
            keeps ``max_iter``.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    alpha = Checked("FairGrad", check_positive_number)
    max_norm = Checked("FairGrad", check_non_negative_number)
    max_iter = Checked("FairGrad", partial(check_integer, minimum=1))

    def __init__(
        self, alpha: float = 1.0, max_norm: float = 0.0, max_iter: int = 100, *, max_iters: int | None = None
    ) -> None:
        super().__init__()
        if max_iters is not None:
            max_iter = max_iters
        self.alpha = alpha
        self.max_norm = max_norm
        self.max_iter = max_iter

    @property
    def max_iters(self) -> int:
        """TorchJD's name of ``max_iter``; assigning ``None`` restores the default ``100``."""
        return self.max_iter

    @max_iters.setter
    def max_iters(self, value: int | None) -> None:
        self.max_iter = 100 if value is None else value

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        G = (G + G.T) / 2
        weights = torch.from_numpy(solve_alpha_fair(G.numpy(), self.alpha, self.max_iter))
        if self.max_norm > 0:
            norm = math.sqrt(max(float(weights @ G @ weights), 0.0))
            if norm > self.max_norm:
                weights = weights * (self.max_norm / norm)
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"FairGradWeighting(alpha={self.alpha}, max_norm={self.max_norm}, max_iter={self.max_iter})"


@aggregator_spec(
    name="fairgrad",
    summary="α-fair allocation `Gw = w^(-1/α)`",
    papers=(
        Paper("Ban & Ji", "Fair Resource Allocation in Multi-Task Learning", "ICML", 2024, "2402.15638"),
    ),
)
class FairGrad(GramianWeightedAggregator):
    r"""FairGrad (Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024,
    arXiv:2402.15638).

    :math:`A(J) = J^\top w` with :math:`G w = w^{-1/\alpha}`: the update maximising the
    :math:`\alpha`-fair utility of the objectives' improvements :math:`g_i^\top d`. Gramian-only,
    deterministic, stateless. Hyper-parameters: ``alpha`` (default ``1.0``, i.e. Nash-MTL without
    clipping), ``max_norm`` (``0``, off) and ``max_iter`` (``100``; TorchJD's ``max_iters`` sets it). See
    :class:`FairGradWeighting`.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    alpha = Delegated[float]()
    max_norm = Delegated[float]()
    max_iter = Delegated[int]()
    max_iters = Delegated[int]()

    def __init__(
        self, alpha: float = 1.0, max_norm: float = 0.0, max_iter: int = 100, *, max_iters: int | None = None
    ) -> None:
        super().__init__(
            FairGradWeighting(alpha=alpha, max_norm=max_norm, max_iter=max_iter, max_iters=max_iters)
        )

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"FairGrad(alpha={w.alpha}, max_norm={w.max_norm}, max_iter={w.max_iter})"

    def __str__(self) -> str:
        return f"{self.alpha}-FairGrad"
