r"""Nash-MTL: multi-task learning as a Nash bargaining game, as a stateful weighting of the Gramian.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, *Multi-Task Learning as a Bargaining
Game*, ICML 2022 (arXiv:2202.01017, Algorithm 1).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from .._validation import check_integer, check_non_negative_number
from ._aggregator_bases import GramianWeightedAggregator
from ._alpha_fair import solve_alpha_fair
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, counter, cpu_tensor
from ._weighting_bases import Weighting, check_finite_gramian


class NashMTLWeighting(Stateful, Weighting):
    r"""Weights of :class:`NashMTL`.

    The Nash bargaining solution over the update directions :math:`d = J^\top \alpha` is the
    :math:`\alpha > 0` with

    .. math:: G \alpha = 1 / \alpha \quad (\text{elementwise}), \qquad \text{i.e.} \quad
              \alpha_i\, g_i^\top d = 1 \text{ for every } i,

    (Theorem 5.1 of the paper). The official implementation approximates it with a sequence of
    convex programs (cvxpy + ECOS) and stops at :math:`\|G\alpha - 1/\alpha\| < 10^{-3}`; here the
    system is solved exactly: it is the stationarity condition of the strictly convex
    :math:`\min_{\alpha > 0} \tfrac12 \alpha^\top G \alpha - \sum_i \log \alpha_i`, minimised by a
    damped Newton method in float64 (see :func:`~hf_jd.aggregation._alpha_fair.solve_alpha_fair`)
    until every equation holds to a relative :math:`10^{-12}`, or for at most ``optim_niter``
    steps, warm-started from the previous weights. A :math:`10^{-8}` relative ridge on the diagonal
    of :math:`G` makes the system solvable when the objectives are Pareto-stationary (a
    non-negative combination of the rows vanishes), where the exact system has no solution; zero
    rows get weight 0, a zero Gramian gives zero weights.

    Then, as in the paper's code, when ``max_norm > 0`` and
    :math:`\|J^\top \alpha\| = \sqrt{\alpha^\top G \alpha}` exceeds it, :math:`\alpha` is scaled
    down so that the update has norm ``max_norm`` (this makes the method depend on the scale of
    :math:`J`).

    Stateful: the weights are recomputed at one call in ``update_weights_every`` and reused (then
    re-clipped) in between; the call counter and the last weights are part of :meth:`state_dict`
    and cleared by :meth:`reset`. A change of the number of objectives forces a recomputation.

    Args:
        n_tasks: Expected number of objectives (checked at every call); ``None`` to accept any.
        max_norm: Largest norm of the update; ``0`` disables the clipping (default ``1.0``).
        update_weights_every: Recompute the weights at one call in this many (default ``1``).
        optim_niter: Maximal number of Newton steps per computation (default ``20``).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    max_norm = Checked("NashMTL", check_non_negative_number)
    optim_niter = Checked("NashMTL", partial(check_integer, minimum=1))
    update_weights_every = Checked("NashMTL", partial(check_integer, minimum=1))
    n_tasks = Checked(
        "NashMTL",
        lambda owner, name, value: None if value is None else check_integer(owner, name, value, minimum=1),
    )

    step = counter()  # calls so far
    alpha = cpu_tensor()  # the last computed weights

    def __init__(
        self,
        n_tasks: int | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        if self.n_tasks is not None and m != self.n_tasks:
            raise ValueError(f"NashMTL(n_tasks={self.n_tasks}) got a Gramian of {m} objectives.")
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        G = (G + G.T) / 2
        if self.alpha is None or self.alpha.numel() != m or self.step % self.update_weights_every == 0:
            start = None if self.alpha is None or self.alpha.numel() != m else self.alpha.numpy()
            self.alpha = torch.from_numpy(solve_alpha_fair(G.numpy(), 1.0, self.optim_niter, start))
        self.step += 1
        alpha = self.alpha
        if self.max_norm > 0:
            norm = math.sqrt(max(float(alpha @ G @ alpha), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return (
            f"NashMTLWeighting(n_tasks={self.n_tasks}, max_norm={self.max_norm}, "
            f"update_weights_every={self.update_weights_every}, optim_niter={self.optim_niter})"
        )


@aggregator_spec(
    name="nash_mtl",
    summary="Nash bargaining solution `Gα = 1/α`, solved exactly",
    papers=(Paper("Navon et al.", "Multi-Task Learning as a Bargaining Game", "ICML", 2022, "2202.01017"),),
    state="last weights, counter",
)
class NashMTL(Stateful, GramianWeightedAggregator):
    r"""Nash-MTL (Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022,
    arXiv:2202.01017).

    :math:`A(J) = J^\top \alpha` with :math:`\alpha` the Nash bargaining solution
    :math:`G\alpha = 1/\alpha` — every objective gets the same "utility" :math:`\alpha_i g_i^\top d
    = 1` — solved exactly (see :class:`NashMTLWeighting`), then scaled down so that the update norm
    is at most ``max_norm``. Gramian-only; stateful (weights reused for ``update_weights_every``
    calls; ``state_dict()``/``load_state_dict()``/``reset()``). Hyper-parameters as TorchJD's
    ``NashMTL(n_tasks, max_norm, update_weights_every, optim_niter)`` with the paper's defaults
    ``max_norm=1.0``, ``update_weights_every=1``, ``optim_niter=20``; ``n_tasks`` is optional here.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: NashMTLWeighting
    n_tasks = Delegated[int | None]()
    max_norm = Delegated[float]()
    update_weights_every = Delegated[int]()
    optim_niter = Delegated[int]()

    def __init__(
        self,
        n_tasks: int | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(
            NashMTLWeighting(
                n_tasks=n_tasks,
                max_norm=max_norm,
                update_weights_every=update_weights_every,
                optim_niter=optim_niter,
            )
        )

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return (
            f"NashMTL(n_tasks={w.n_tasks}, max_norm={w.max_norm}, "
            f"update_weights_every={w.update_weights_every}, optim_niter={w.optim_niter})"
        )
