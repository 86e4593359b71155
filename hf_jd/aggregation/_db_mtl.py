r"""DB-MTL: dual-balancing multi-task learning (needs the explicit Jacobian).

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, *Dual-Balancing for Multi-Task Learning*,
arXiv:2308.12029 (2023); the authors' implementation is LibMTL's ``DB_MTL``.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor

from .._validation import check_non_negative_number, check_number_in
from ._aggregator_bases import Aggregator, check_finite_jacobian
from ._attributes import Checked
from ._spec import Paper, aggregator_spec
from ._stateful import LossAware, check_loss_count, counter, jacobian_tensor, warn_shape_restart

# Added to the losses before the logarithm (log L_i has gradient g_i / (L_i + eps)), as in LibMTL.
_LOG_EPS = 1e-8


@aggregator_spec(
    name="db_mtl",
    summary="DB-MTL: EMA of the (log-loss) gradients, each rescaled to the largest norm",
    papers=(Paper("Lin et al.", "Dual-Balancing for Multi-Task Learning", "", 2023, "2308.12029"),),
    needs_jacobian=True,
    loss_aware=True,
    state="EMA of the rows, counter",
)
class DBMTL(LossAware, Aggregator):
    r"""Dual-Balancing Multi-Task Learning (Lin et al., *Dual-Balancing for Multi-Task Learning*,
    arXiv:2308.12029).

    **Loss-scale balancing** trains on :math:`\log L_i` instead of :math:`L_i`, whose gradient is
    :math:`g_i / L_i`. **Gradient-magnitude balancing** keeps an exponential moving average of these
    gradients and rescales every averaged row to the largest norm:

    .. math:: \hat g_i \leftarrow \beta_t \hat g_i + (1 - \beta_t)\, \nabla \log L_i, \qquad
              \beta_t = \beta / t^{\sigma}, \qquad
              A(J) = \sum_i \frac{\max_j \|\hat g_j\|}{\|\hat g_i\|}\, \hat g_i

    (:math:`t` counts the calls from 1, :math:`\hat g = 0` at first; a zero row :math:`\hat g_i`
    contributes nothing — LibMTL divides by :math:`\|\hat g_i\| + 10^{-8}` instead, which stops
    balancing rows smaller than that). The moving average lives in parameter space, so the update is
    not a combination of the current rows: DB-MTL needs the explicit Jacobian.

    **Loss values.** :math:`\nabla \log L_i = g_i / (L_i + 10^{-8})` needs the losses. Give them with
    :meth:`set_losses` before a call; they are used by that call only. Without them the rows are
    used as they are (:math:`L_i` taken as 1): only the gradient-magnitude balancing runs. ``JDTrainer``
    calls :meth:`set_losses` before every step with the losses of the rows it weights (identical on
    every rank), so in the Trainer DB-MTL balances the gradients of :math:`\log L_i`, as in the paper.

    Stateful: the call counter and the averaged rows (an ``m × n`` tensor, on the device and in the
    dtype of the Jacobian) are part of :meth:`state_dict` and cleared by :meth:`reset`; they restart
    with a warning when the shape of the Jacobian changes.

    Args:
        beta: Averaging coefficient :math:`\beta \in [0, 1]` (default ``0.9``).
        beta_sigma: Decay exponent :math:`\sigma \ge 0` of :math:`\beta_t` (default ``0.5``).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    beta = Checked("DBMTL", partial(check_number_in, low=0.0, high=1.0))
    beta_sigma = Checked("DBMTL", check_non_negative_number)
    step = counter()  # calls since the averages started
    buffer = jacobian_tensor()  # the averaged (log-loss) gradients, m x n

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma

    def forward(self, matrix: Tensor) -> Tensor:
        J = matrix.detach()
        check_finite_jacobian("DBMTL", J)
        losses, self._losses = self._losses, None
        if J.shape[0] == 0:  # no objective: the zero update, and the averages are kept
            return matrix.new_zeros(matrix.shape[1])
        if losses is not None:
            check_loss_count("DBMTL", losses, J.shape[0])
            J = J / (losses + _LOG_EPS).to(dtype=J.dtype, device=J.device)[:, None]
        if self.buffer is None or self.buffer.shape != J.shape:
            if self.buffer is not None:
                warn_shape_restart(
                    "DBMTL", self.buffer.shape, J.shape, "averaged gradients restart from zero"
                )
            self.step, self.buffer = 0, J.new_zeros(J.shape)
        self.step += 1
        beta_t = self.beta / self.step**self.beta_sigma
        buffer = self.buffer.to(dtype=J.dtype, device=J.device)
        self.buffer = J + beta_t * (buffer - J)
        norms = self.buffer.norm(dim=1)
        positive = norms > 0
        scales = norms.max() / norms.where(positive, 1.0)
        return scales.where(positive, 0.0) @ self.buffer

    def __repr__(self) -> str:
        return f"DBMTL(beta={self.beta}, beta_sigma={self.beta_sigma})"
