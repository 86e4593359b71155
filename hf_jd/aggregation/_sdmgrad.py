r"""SDMGrad: stochastic direction-oriented multi-objective gradient, as a stateful Gramian weighting.

Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms*, NeurIPS 2023 (arXiv:2305.18409, Algorithm 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .._validation import check_integer, check_non_negative_number, check_number_in, check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Alias, Checked, Delegated
from ._preference import as_pref_vector, pref_weights
from ._simplex import project_onto_simplex
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, cpu_tensor, warn_restart
from ._weighting_bases import Weighting, check_finite_gramian


def _momentum(owner: str, name: str, value: object) -> float:
    momentum = check_number_in(owner, name, value, 0.0, 1.0)
    if momentum == 1.0:
        raise ValueError(f"{owner}'s {name} must be < 1, got 1.0.")
    return momentum


class SDMGradWeighting(Stateful, Weighting):
    r"""Weights of :class:`SDMGrad`.

    SDMGrad looks for the update closest to a combination of the rows while staying near the mean
    gradient :math:`g_0 = J^\top \mathbf 1/m`: with :math:`\lambda \ge 0` the regularisation strength,

    .. math:: w^\star = \arg\min_{w \in \Delta_m} \tfrac12 \|J^\top w + \lambda g_0\|^2
              = \arg\min_{w \in \Delta_m} \tfrac12 w^\top \hat G w + \lambda\, w^\top \hat G \mathbf 1/m,
              \qquad d = \frac{J^\top w^\star + \lambda g_0}{1 + \lambda},

    so the weights are :math:`(w^\star + \lambda \mathbf 1/m) / (1 + \lambda)`. As in the authors'
    code, :math:`\hat G = G / s^2` with :math:`s` the mean row norm :math:`\frac1m \sum_i \sqrt{G_{ii}}`
    (exactly, without their ``1e-8``; a zero Gramian gives zero weights), and :math:`w` is not solved
    exactly but improved by ``niter`` projected gradient steps with heavy-ball momentum (step ``lr``,
    momentum ``momentum``, the momentum restarting at every call), warm-started from the previous
    call's :math:`w` (the state; :math:`\mathbf 1/m` at first). With a small ``lr`` and many steps
    :math:`w` converges to :math:`w^\star`. Everything depends on :math:`G` only; float64, CPU.

    The paper estimates :math:`\hat G` with two independent mini-batches and forms the update with a
    third; an aggregator is given one Jacobian per step, so all three are :math:`J` here.

    Stateful: :math:`w` is part of :meth:`state_dict` and cleared by :meth:`reset`; it restarts at
    :math:`\mathbf 1/m` with a warning when the number of objectives changes.

    Args:
        lamda: Regularisation :math:`\lambda \ge 0` towards the mean gradient (default ``0.3``;
            ``lamda = 0`` is a warm-started MGDA).
        niter: Projected gradient steps per call (default ``20``).
        lr: Step size of these steps (default ``5.0``).
        momentum: Heavy-ball momentum in ``[0, 1)`` (default ``0.5``).
        lambda_, n_iter: TorchJD's names of ``lamda`` and ``niter`` (keyword only; when given, they
            set them).
        pref_vector: Target weights :math:`\tilde w` replacing :math:`\mathbf 1/m` in :math:`g_0 =
            J^\top \tilde w` (keyword only, TorchJD's; ``None`` for :math:`\mathbf 1/m`).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    lamda = Checked("SDMGrad", check_non_negative_number)
    niter = Checked("SDMGrad", partial(check_integer, minimum=1))
    lr = Checked("SDMGrad", check_positive_number)
    momentum = Checked("SDMGrad", _momentum)
    pref_vector = Checked("SDMGrad", lambda owner, name, value: as_pref_vector(value, owner))
    lambda_ = Alias[float]("lamda")
    n_iter = Alias[int]("niter")
    w = cpu_tensor()  # the inner weights, warm start of the next call

    def __init__(
        self,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 5.0,
        momentum: float = 0.5,
        *,
        lambda_: float | None = None,
        n_iter: int | None = None,
        pref_vector: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        if lambda_ is None:
            self.lamda = lamda
        else:
            self.lambda_ = lambda_  # checked under TorchJD's name
        if n_iter is None:
            self.niter = niter
        else:
            self.n_iter = n_iter
        self.lr = lr
        self.momentum = momentum

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        # Not symmetrised: TorchJD passes J_1 J_2^T of two independent batches (double sampling).
        G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
        target = (
            pref_weights(self.pref_vector, gramian).detach().to(device="cpu", dtype=torch.float64).numpy()
        )
        if self.w is None or self.w.numel() != m:
            if self.w is not None:
                warn_restart("SDMGrad", self.w.numel(), m, "inner weights")
            self.w = torch.full((m,), 1.0 / m, dtype=torch.float64)
        scale = float(np.sqrt(np.clip(G.diagonal(), 0.0, None)).mean())
        if scale == 0.0 or not math.isfinite(scale * scale):
            return torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        G = G / scale / scale
        Gg = G @ target
        w = self.w.numpy().copy()
        buffer = np.zeros(m)
        for i in range(self.niter):
            gradient = G @ w + self.lamda * Gg
            buffer = gradient if i == 0 else self.momentum * buffer + gradient
            w = project_onto_simplex(w - self.lr * buffer)
        self.w = torch.from_numpy(w)
        weights = (w + self.lamda * target) / (1.0 + self.lamda)
        return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)

    def arguments_repr(self) -> str:
        """TorchJD's names and order (``lambda_`` is ``lamda``, ``n_iter`` is ``niter``)."""
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return (
            f"lr={self.lr}, momentum={self.momentum}, n_iter={self.niter}, lambda_={self.lamda}, "
            f"pref_vector={pref}"
        )

    def __repr__(self) -> str:
        return f"SDMGradWeighting({self.arguments_repr()})"


@aggregator_spec(
    name="sdmgrad",
    summary="SDMGrad: MGDA regularised towards the mean, warm-started inner loop",
    papers=(
        Paper(
            "Xiao, Ban & Ji",
            "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
            "NeurIPS",
            2023,
            "2305.18409",
        ),
    ),
    state="inner weights",
)
class SDMGrad(Stateful, GramianWeightedAggregator):
    r"""SDMGrad (Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms*, NeurIPS 2023, arXiv:2305.18409).

    :math:`A(J) = \frac{J^\top w + \lambda g_0}{1 + \lambda}` with :math:`g_0` the mean row and
    :math:`w \in \Delta_m` a warm-started approximate minimiser of :math:`\|J^\top w + \lambda g_0\|`
    (see :class:`SDMGradWeighting`). Gramian-only; stateful (the inner weights;
    ``state_dict()``/``load_state_dict()``/``reset()``). Hyper-parameters of the authors' code:
    ``lamda=0.3``, ``niter=20``, ``lr=5.0``, ``momentum=0.5``. Deviation: one Jacobian instead of the
    paper's three independent mini-batch samples.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: SDMGradWeighting
    lamda = Delegated[float]()
    niter = Delegated[int]()
    lr = Delegated[float]()
    momentum = Delegated[float]()
    lambda_ = Delegated[float]()
    n_iter = Delegated[int]()
    pref_vector = Delegated[Tensor | None]()

    def __init__(
        self,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 5.0,
        momentum: float = 0.5,
        *,
        lambda_: float | None = None,
        n_iter: int | None = None,
        pref_vector: Tensor | Sequence[float] | None = None,
    ) -> None:
        weighting = SDMGradWeighting(
            lamda, niter, lr, momentum, lambda_=lambda_, n_iter=n_iter, pref_vector=pref_vector
        )
        super().__init__(weighting)

    def __repr__(self) -> str:
        return f"SDMGrad({self.gramian_weighting.arguments_repr()})"
