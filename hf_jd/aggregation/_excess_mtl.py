r"""ExcessMTL: robust multi-task learning with excess risks (needs the explicit Jacobian).

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, *Robust Multi-Task Learning with Excess Risks*,
ICML 2024 (arXiv:2402.02009, Equations 6–9 and Algorithm 1).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from .._validation import check_integer, check_positive_number
from ._aggregator_bases import WeightedAggregator, check_finite_jacobian
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, counter, cpu_tensor, jacobian_tensor, warn_shape_restart
from ._weighting_bases import Weighting


class ExcessMTLWeighting(Stateful, Weighting):
    r"""Weights of :class:`ExcessMTL`, computed from the Jacobian (TorchJD's ``ExcessMTLWeighting``,
    a ``Weighting[Matrix]``: it is called with :math:`J`, not with a Gramian).

    The excess risk of objective :math:`i` is estimated to second order with an AdaGrad-like diagonal
    Hessian accumulated over the calls:

    .. math:: H_i \leftarrow H_i + g_i \odot g_i, \qquad
              e_i = g_i^\top \mathrm{diag}\big(\sqrt{H_i + \epsilon}\big)^{-1} g_i ,

    (Equations 6–7). After ``n_warmup_steps`` calls that only accumulate and return :math:`\mathbf 1/m`,
    the first call sets the baseline :math:`e^{(0)}` — the mean of :math:`e` over the warm-up calls, or,
    without warm-up, the first call's own :math:`e` — and the weights take exponentiated-gradient
    (mirror ascent) steps on the simplex,
    :math:`w \leftarrow w \odot \exp(\eta\, r) / \sum_j w_j \exp(\eta r_j)` (Equation 9), kept as
    log-weights so that no exponential overflows, with :math:`r = e / e^{(0)}` (0 where
    :math:`e^{(0)} = 0`) — except at the first call without warm-up, where :math:`r = e` itself, as in
    the authors' code and TorchJD. The weights start at :math:`\mathbf 1/m` and sum to 1, as in the
    paper (LibMTL scales them to sum to :math:`m`).

    Stateful: the accumulated squares :math:`H` (``m × n``, on the Jacobian's device and dtype), the
    log-weights, :math:`e^{(0)}`, the warm-up sum and the number of calls are part of
    :meth:`state_dict` and cleared by :meth:`reset`; they restart with a warning when the shape of the
    Jacobian changes.

    Args:
        robust_step_size: Step size :math:`\eta > 0` of the weights (default ``1.0``, TorchJD's).
        n_warmup_steps: Calls that only collect statistics (default ``0``; the paper's Appendix C.1
            suggests three epochs).
        eps: :math:`\epsilon > 0` under the square root (keyword only, default ``1e-7``, the authors'
            code).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    robust_step_size = Checked("ExcessMTL", check_positive_number)
    n_warmup_steps = Checked("ExcessMTL", partial(check_integer, minimum=0))
    eps = Checked("ExcessMTL", check_positive_number)
    grad_sum = jacobian_tensor()  # H, the accumulated squared gradients, m x n
    log_weights = cpu_tensor()  # the log-weights
    initial_excess = cpu_tensor()  # the baseline excess risks
    warmup_sum = cpu_tensor()  # the excess risks summed during the warm-up
    n_steps = counter()  # calls since the statistics started

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0, *, eps: float = 1e-7) -> None:
        super().__init__()
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps
        self.eps = eps

    @property
    def accepts_matrix(self) -> bool:
        return True  # it is called with J itself

    def forward(self, matrix: Tensor) -> Tensor:
        J = matrix.detach()
        check_finite_jacobian("ExcessMTL", J)
        m = J.shape[0]
        if self.grad_sum is None or self.log_weights is None or self.grad_sum.shape != J.shape:
            if self.grad_sum is not None:
                warn_shape_restart(
                    "ExcessMTL", self.grad_sum.shape, J.shape, "statistics and weights restart"
                )
            self.grad_sum, self.initial_excess, self.n_steps = J.new_zeros(J.shape), None, 0
            self.log_weights = torch.full((m,), -math.log(m), dtype=torch.float64)
            self.warmup_sum = torch.zeros(m, dtype=torch.float64)
        self.grad_sum = self.grad_sum.to(dtype=J.dtype, device=J.device) + J * J
        excess = (J * J / torch.sqrt(self.grad_sum + self.eps)).sum(dim=1)
        excess = excess.to(device="cpu", dtype=torch.float64)
        self.n_steps += 1
        if self.n_steps <= self.n_warmup_steps:
            assert self.warmup_sum is not None
            self.warmup_sum = self.warmup_sum + excess
        else:
            if self.initial_excess is None and self.n_warmup_steps == 0:
                self.initial_excess, ratio = excess, excess
            else:
                if self.initial_excess is None:
                    assert self.warmup_sum is not None
                    self.initial_excess = self.warmup_sum / self.n_warmup_steps
                initial = self.initial_excess
                ratio = torch.where(initial > 0, excess / torch.where(initial > 0, initial, 1.0), 0.0)
            self.log_weights = torch.log_softmax(self.log_weights + self.robust_step_size * ratio, dim=0)
        return torch.softmax(self.log_weights, dim=0).to(dtype=J.dtype, device=J.device)

    def arguments_repr(self) -> str:
        """TorchJD's arguments, then ``eps`` (hf_jd's) when it is not its default."""
        eps = "" if self.eps == 1e-7 else f", eps={self.eps}"
        return f"robust_step_size={self.robust_step_size}, n_warmup_steps={self.n_warmup_steps}{eps}"

    def __repr__(self) -> str:
        return f"ExcessMTLWeighting({self.arguments_repr()})"


@aggregator_spec(
    name="excess_mtl",
    summary="ExcessMTL: weights by estimated excess risk, exponentiated-gradient steps",
    papers=(Paper("He et al.", "Robust Multi-Task Learning with Excess Risks", "ICML", 2024, "2402.02009"),),
    needs_jacobian=True,
    state="squared-gradient sums, weights",
)
class ExcessMTL(Stateful, WeightedAggregator):
    r"""ExcessMTL (He et al., *Robust Multi-Task Learning with Excess Risks*, ICML 2024,
    arXiv:2402.02009).

    Weights the objectives by their estimated *excess* risk (distance to their own optimum) rather
    than their loss, so that objectives with a large irreducible noise do not dominate:
    :math:`A(J) = J^\top w` with :math:`w` on the simplex, updated by exponentiated-gradient steps on
    the normalised excess risks (see :class:`ExcessMTLWeighting`). The excess risk reads every
    coordinate of :math:`J`: ExcessMTL needs the explicit Jacobian. Stateful
    (``state_dict()``/``load_state_dict()``/``reset()``). Hyper-parameters ``robust_step_size=1.0``,
    ``n_warmup_steps=0``, ``eps=1e-7``.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    weighting: ExcessMTLWeighting
    robust_step_size = Delegated[float]("weighting")
    n_warmup_steps = Delegated[int]("weighting")
    eps = Delegated[float]("weighting")

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0, *, eps: float = 1e-7) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps, eps=eps))

    def __repr__(self) -> str:
        return f"ExcessMTL({self.weighting.arguments_repr()})"
