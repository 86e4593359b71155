r"""IMTL: Impartial Multi-Task Learning (IMTL-G with IMTL-L's learned loss scales), on the Gramian.

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task Learning*, ICLR 2021
(OpenReview; no arXiv version). "IMTL" is IMTL-L (loss balance) + IMTL-G (gradient balance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._imtl_g import IMTLGWeighting
from ._spec import Paper, aggregator_spec
from ._stateful import LossAware, check_loss_count, cpu_tensor, warn_restart
from ._weighting_bases import Weighting, check_finite_gramian


class IMTLWeighting(LossAware, Weighting):
    r"""Weights of :class:`IMTL`.

    **IMTL-L** scales loss :math:`i` by :math:`e^{s_i}` and learns :math:`s` by minimising
    :math:`e^{s_i} L_i - s_i`, whose gradient is :math:`e^{s_i} L_i - 1` (at the optimum
    :math:`e^{s_i} = 1/L_i`: every scaled loss equals 1). **IMTL-G** then combines the scaled gradients
    :math:`g'_i = e^{s_i} g_i` as :math:`d = \sum_i \alpha_i g'_i`, :math:`\mathbf 1^\top \alpha = 1`,
    with equal projections on every unit gradient (:class:`IMTLGWeighting`).

    Because the unit gradients do not depend on the scales, :math:`d` is the IMTL-G direction of
    :math:`J` itself, only rescaled: with :math:`v` the IMTL-G weights of :math:`G` and
    :math:`D = \mathrm{diag}(e^{s})`, solving IMTL-G on :math:`D G D` gives :math:`\alpha =
    D^{-1} v / \mathbf 1^\top D^{-1} v`, hence the weights of the rows of :math:`J`

    .. math:: w = D\alpha = \frac{v}{\sum_i v_i e^{-s_i}} .

    (On the shared parameters the loss scales thus only change the length of the update; in the
    paper they also scale the gradients of the task-specific heads, which a Jacobian aggregator does
    not see.) Zero Gramian, or :math:`\sum_i v_i e^{-s_i} = 0`: zero weights.

    **Loss values.** The scale update needs the losses: give them with :meth:`set_losses` before a
    call; after computing the weights with the current :math:`s`, the call takes one gradient step
    :math:`s \leftarrow s - \mathrm{lr}\,(e^{s} \odot L - 1)`. ``JDTrainer`` calls :meth:`set_losses`
    before every step (the losses of the rows it weights, identical on every rank); without them
    :math:`s` stays 0 and IMTL is exactly IMTL-G (``imtl_g``): the IMTL-L part cannot be computed from
    the Jacobian alone. Float64, CPU.

    Stateful: :math:`s` is part of :meth:`state_dict`, cleared by :meth:`reset`; it restarts at 0
    with a warning when the number of objectives changes.

    Args:
        lr: Step size of the log-scales :math:`s` (default ``0.01``; the paper learns them with the
            network's optimiser and gives no separate rate).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    lr = Checked("IMTL", check_positive_number)
    log_scales = cpu_tensor()  # s, the learned log-scales of the losses

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.imtl_g = IMTLGWeighting()

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        losses, self._losses = self._losses, None
        if losses is not None:
            check_loss_count("IMTL", losses, m)
        if self.log_scales is None or self.log_scales.numel() != m:
            if self.log_scales is not None:
                warn_restart("IMTL", self.log_scales.numel(), m, "loss scales")
            self.log_scales = torch.zeros(m, dtype=torch.float64)
        v = self.imtl_g(gramian.detach()).to(device="cpu", dtype=torch.float64)
        inverse_scales = torch.exp(-self.log_scales)
        total = float(v @ inverse_scales)
        magnitude = float(v.abs() @ inverse_scales)
        if abs(total) > m * torch.finfo(torch.float64).eps * magnitude:
            weights = v / total
        else:
            weights = torch.zeros(m, dtype=torch.float64)
        if losses is not None:
            self.log_scales = self.log_scales - self.lr * (torch.exp(self.log_scales) * losses - 1.0)
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"IMTLWeighting(lr={self.lr})"


@aggregator_spec(
    name="imtl",
    summary="IMTL: IMTL-G on IMTL-L's learned loss scales",
    papers=(Paper("Liu et al.", "Towards Impartial Multi-task Learning", "ICLR", 2021),),
    loss_aware=True,
    state="loss scales",
)
class IMTL(LossAware, GramianWeightedAggregator):
    r"""IMTL (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021): IMTL-G's combination
    with equal projections on every unit gradient, applied to the gradients of the losses scaled by
    IMTL-L's learned factors :math:`e^{s_i}`. Gramian-only; stateful (the log-scales;
    ``state_dict()``/``load_state_dict()``/``reset()``).

    **Limitation.** IMTL-L learns its scales from the loss values, which the Jacobian does not
    contain: they are given with :meth:`set_losses` (``JDTrainer`` does, before every step). Without
    them the scales stay at 1 and IMTL equals ``imtl_g``.
    With them, the scales change only the length of the shared update (see :class:`IMTLWeighting`).
    Hyper-parameter: ``lr=0.01``, the step size of the log-scales.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: IMTLWeighting
    lr = Delegated[float]()

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(IMTLWeighting(lr=lr))

    def __repr__(self) -> str:
        return f"IMTL(lr={self.gramian_weighting.lr})"
