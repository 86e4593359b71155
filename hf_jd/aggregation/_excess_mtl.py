r"""ExcessMTL: robust multi-task learning with excess risks (needs the explicit Jacobian).

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, *Robust Multi-Task Learning with Excess Risks*,
ICML 2024 (arXiv:2402.02009, Equations 6–9 and Algorithm 1).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._aggregator_bases import WeightedAggregator, check_matrix
from ._stateful import cpu64, read_state
from ._validation import check_positive_number


class ExcessMTL(WeightedAggregator):
    r"""ExcessMTL (He et al., *Robust Multi-Task Learning with Excess Risks*, ICML 2024,
    arXiv:2402.02009).

    Weights the objectives by their estimated *excess* risk (distance to their own optimum) rather
    than their loss, so that objectives with a large irreducible noise do not dominate. The excess
    risk of objective :math:`i` is estimated to second order with an AdaGrad-like diagonal Hessian
    accumulated over the calls:

    .. math:: H_i \leftarrow H_i + g_i \odot g_i, \qquad
              e_i = g_i^\top \mathrm{diag}\big(\sqrt{H_i + \epsilon}\big)^{-1} g_i ,

    normalised by its value at the first call, :math:`r_i = e_i / e_i^{(1)}` (0 where
    :math:`e_i^{(1)} = 0`), and the weights take an exponentiated-gradient (mirror ascent) step on the
    simplex, :math:`w \leftarrow w \odot \exp(\eta\, r) / \sum_j w_j \exp(\eta r_j)`, kept as
    log-weights so that no exponential overflows. The first call only records :math:`e^{(1)}` and
    uses :math:`w = \mathbf 1/m` (the mean); later calls use the updated weights, and
    :math:`A(J) = J^\top w` (the weights sum to 1, as in the paper; LibMTL scales them to sum to
    :math:`m`). :math:`e` reads every coordinate of :math:`J`: ExcessMTL needs the explicit Jacobian.

    Stateful: the accumulated squares :math:`H` (``m × n``, on the Jacobian's device and dtype), the
    log-weights and :math:`e^{(1)}` are part of :meth:`state_dict` and cleared by :meth:`reset`; they
    restart with a warning when the shape of the Jacobian changes.

    Args:
        robust_step_size: Step size :math:`\eta > 0` of the weights (default ``1e-2``).
        eps: :math:`\epsilon > 0` under the square root (default ``1e-7``, the authors' code).
    """

    def __init__(self, robust_step_size: float = 1e-2, eps: float = 1e-7) -> None:
        super().__init__()
        self.robust_step_size = check_positive_number("ExcessMTL", "robust_step_size", robust_step_size)
        self.eps = check_positive_number("ExcessMTL", "eps", eps)
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated squared gradients, the weights and the first excess risks."""
        self.grad_sum: Tensor | None = None
        self.log_weights: Tensor | None = None
        self.initial_excess: Tensor | None = None

    def weights(self, matrix: Tensor) -> Tensor:
        check_matrix(matrix)
        J = matrix.detach()
        if not bool(J.isfinite().all()):
            raise ValueError("ExcessMTL: the Jacobian contains NaN or inf values.")
        m = J.shape[0]
        if self.grad_sum is None or self.log_weights is None or self.grad_sum.shape != J.shape:
            if self.grad_sum is not None:
                warnings.warn(
                    f"ExcessMTL: the Jacobian's shape changed from {tuple(self.grad_sum.shape)} to "
                    f"{tuple(J.shape)}; its statistics and weights restart.",
                    stacklevel=2,
                )
            self.grad_sum, self.initial_excess = J.new_zeros(J.shape), None
            self.log_weights = torch.zeros(m, dtype=torch.float64)
        self.grad_sum = self.grad_sum.to(dtype=J.dtype, device=J.device) + J * J
        excess = (J * J / torch.sqrt(self.grad_sum + self.eps)).sum(dim=1)
        excess = excess.to(device="cpu", dtype=torch.float64)
        if self.initial_excess is None:
            self.initial_excess = excess
        else:
            initial = self.initial_excess
            ratio = torch.where(initial > 0, excess / torch.where(initial > 0, initial, 1.0), 0.0)
            log_weights = self.log_weights + self.robust_step_size * ratio
            self.log_weights = log_weights - torch.logsumexp(log_weights, dim=0)
        weights = torch.softmax(self.log_weights, dim=0)
        return weights.to(dtype=J.dtype, device=J.device)

    def get_extra_state(self) -> dict[str, Any]:
        grad_sum = None if self.grad_sum is None else self.grad_sum.detach().clone()
        return {
            "grad_sum": grad_sum,
            "log_weights": cpu64(self.log_weights),
            "initial_excess": cpu64(self.initial_excess),
        }

    def set_extra_state(self, state: Any) -> None:
        optional = (Tensor, type(None))
        state = read_state(
            "ExcessMTL", state, {"grad_sum": optional, "log_weights": optional, "initial_excess": optional}
        )
        self.grad_sum = None if state["grad_sum"] is None else state["grad_sum"].detach().clone()
        self.log_weights, self.initial_excess = cpu64(state["log_weights"]), cpu64(state["initial_excess"])

    def __repr__(self) -> str:
        return f"ExcessMTL(robust_step_size={self.robust_step_size}, eps={self.eps})"
