r"""MoCo: multi-objective gradient correction (needs the explicit Jacobian).

Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, *Mitigating Gradient Bias in Multi-objective
Learning: A Provably Convergent Approach*, ICLR 2023 (arXiv:2210.12624, Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_non_negative_number, check_number_in, check_positive_number
from ._aggregator_bases import Aggregator, check_finite_jacobian
from ._attributes import Checked
from ._simplex import project_onto_simplex
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, counter, cpu_tensor, jacobian_tensor, warn_shape_restart


def _positive_rate(owner: str, name: str, value: object) -> float:
    rate = check_number_in(owner, name, value, 0.0, 1.0)
    if rate == 0.0:
        raise ValueError(f"{owner}'s {name} must be > 0 ({name} = 0 never reads the Jacobian), got 0.")
    return rate


@aggregator_spec(
    name="moco",
    summary="MoCo: tracked Jacobian `Y`, projected weight steps, `Yᵀλ`",
    papers=(
        Paper(
            "Fernando et al.",
            "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
            "ICLR",
            2023,
            "2210.12624",
        ),
    ),
    needs_jacobian=True,
    state="`Y`, weights, counter",
)
class MoCo(Stateful, Aggregator):
    r"""MoCo (Fernando et al., *Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach*, ICLR 2023, arXiv:2210.12624).

    Stochastic MGDA is biased because its weights are computed from the same noisy gradients they
    multiply. MoCo tracks the Jacobian with a moving estimate :math:`Y` and moves the weights
    :math:`\lambda \in \Delta_m` by one projected gradient step per call:

    .. math:: Y \leftarrow Y - \beta_t (Y - J), \qquad
              \lambda \leftarrow \Pi_{\Delta_m}\big(\lambda - \gamma_t (Y Y^\top + \rho I)\lambda\big),
              \qquad A(J) = Y^\top \lambda,

    with :math:`\beta_t = \beta / t^{\sigma_\beta}`, :math:`\gamma_t = \gamma / t^{\sigma_\gamma}`
    (:math:`t` counts the calls from 1), :math:`Y = 0` and :math:`\lambda = \mathbf 1/m` at first.
    The update lies in the span of past Jacobians, not of :math:`J`: MoCo needs the explicit Jacobian.
    Deviations, stated: the projection onto the simplex is exact (the paper's :math:`\Pi_{\Delta}`;
    LibMTL uses a softmax instead), the paper's projection of each row of :math:`Y` onto a ball of
    radius :math:`L_i` (an unknown Lipschitz bound) is omitted, and the rows are not rescaled by the
    losses (LibMTL's ``g_i / ‖g_i‖ · L_i``, which is not in the paper). :math:`Y Y^\top` and the
    weights are computed in float64 on the CPU; :math:`Y` stays on the Jacobian's device and dtype.

    Stateful: the call counter, :math:`Y` (``m × n``) and :math:`\lambda` are part of
    :meth:`state_dict` and cleared by :meth:`reset`; they restart with a warning when the shape of
    the Jacobian changes.

    Args:
        beta: Tracking rate :math:`\beta \in (0, 1]` (default ``0.5``).
        beta_sigma: Decay exponent of :math:`\beta_t` (default ``0.5``).
        gamma: Step size :math:`\gamma > 0` of the weights (default ``0.1``).
        gamma_sigma: Decay exponent of :math:`\gamma_t` (default ``0.5``).
        rho: :math:`\ell_2` regularisation :math:`\rho \ge 0` of the weights (default ``0``).

    The defaults are LibMTL's (``MoCo_beta`` … ``MoCo_rho``), from the authors' code.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    beta = Checked("MoCo", _positive_rate)
    beta_sigma = Checked("MoCo", check_non_negative_number)
    gamma = Checked("MoCo", check_positive_number)
    gamma_sigma = Checked("MoCo", check_non_negative_number)
    rho = Checked("MoCo", check_non_negative_number)
    step = counter()  # calls since the tracking started
    y = jacobian_tensor()  # the tracked Jacobian Y, m x n
    lambd = cpu_tensor()  # the weights

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho

    def forward(self, matrix: Tensor) -> Tensor:
        J = matrix.detach()
        check_finite_jacobian("MoCo", J)
        m = J.shape[0]
        if m == 0:  # no objective: the zero update, and the tracked Jacobian is kept
            return matrix.new_zeros(matrix.shape[1])
        if self.y is None or self.lambd is None or self.y.shape != J.shape:
            if self.y is not None:
                warn_shape_restart("MoCo", self.y.shape, J.shape, "tracked Jacobian and weights restart")
            self.step, self.y = 0, J.new_zeros(J.shape)
            self.lambd = torch.full((m,), 1.0 / m, dtype=torch.float64)
        self.step += 1
        beta_t = self.beta / self.step**self.beta_sigma
        gamma_t = self.gamma / self.step**self.gamma_sigma
        y = self.y.to(dtype=J.dtype, device=J.device)
        self.y = y - beta_t * (y - J)
        gram = (self.y @ self.y.T).to(device="cpu", dtype=torch.float64)
        gram = (gram + gram.T) / 2 + self.rho * torch.eye(m, dtype=torch.float64)
        step = self.lambd - gamma_t * (gram @ self.lambd)
        self.lambd = torch.from_numpy(project_onto_simplex(step.numpy()))
        return self.lambd.to(dtype=J.dtype, device=J.device) @ self.y

    def __repr__(self) -> str:
        return (
            f"MoCo(beta={self.beta}, beta_sigma={self.beta_sigma}, gamma={self.gamma}, "
            f"gamma_sigma={self.gamma_sigma}, rho={self.rho})"
        )
