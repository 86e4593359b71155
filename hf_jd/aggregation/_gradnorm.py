r"""GradNorm: gradient normalisation for adaptive loss balancing, as a stateful Gramian weighting.

Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss Balancing
in Deep Multitask Networks*, ICML 2018 (arXiv:1711.02257, Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_non_negative_number, check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._stateful import LossAware, check_loss_count, cpu_tensor, warn_restart
from ._weighting_bases import Weighting, check_finite_gramian


class GradNormWeighting(LossAware, Weighting):
    r"""Weights of :class:`GradNorm`.

    The weights are :math:`w = m\,\mathrm{softmax}(s)` (positive, summing to :math:`m`; LibMTL's
    parametrisation), :math:`s = 0` at first. At every call the update uses the current :math:`w`,
    then :math:`s` takes one gradient step of size ``lr`` on the GradNorm loss

    .. math:: L_{\mathrm{grad}} = \sum_i \big| w_i \|g_i\| - \bar G\, r_i^{\alpha} \big|, \qquad
              \bar G = \tfrac1m \sum_j w_j \|g_j\| \ (\text{held constant}), \qquad
              r_i = \tilde L_i / \tfrac1m \sum_j \tilde L_j,\ \ \tilde L_i = L_i(t) / L_i(0),

    whose gradient is :math:`\partial L_{\mathrm{grad}} / \partial w_i = \mathrm{sign}(w_i \|g_i\| -
    \bar G r_i^\alpha) \|g_i\|` chained through the softmax. The norms :math:`\|g_i\| =
    \sqrt{G_{ii}}` come from the Gramian (the paper takes them on the last shared layer; here on
    every parameter the Jacobian covers).

    **Loss values.** The training rates :math:`r_i` need the losses, which a weighting of the Gramian
    does not see. Give them with :meth:`set_losses` before each call (the first losses given are
    :math:`L(0)`); they are used by the next call only. Without them :math:`r_i = 1`: GradNorm then
    balances the weighted gradient norms :math:`w_i \|g_i\|` only, and ``alpha`` has no effect.
    ``JDTrainer`` calls :meth:`set_losses` before every step with the losses of the rows it weights
    (identical on every rank), so in the Trainer GradNorm is the full method.

    The step is not normalised (as in the paper): it scales with the gradient norms, so ``lr`` has to
    suit their size. Computed in float64 on the CPU.

    Stateful: :math:`s` and :math:`L(0)` are part of :meth:`state_dict`, cleared by :meth:`reset`;
    they restart with a warning when the number of objectives changes.

    Args:
        alpha: Restoring-force exponent :math:`\alpha \ge 0` (default ``1.5``, the paper's NYUv2 value).
        lr: Step size of :math:`s` (default ``0.025``; the paper trains the weights with the network's
            optimiser and gives no separate rate).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    alpha = Checked("GradNorm", check_non_negative_number)
    lr = Checked("GradNorm", check_positive_number)
    logits = cpu_tensor()  # s, the learned logits of the weights
    initial_losses = cpu_tensor()  # L(0), the first losses given

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha = alpha
        self.lr = lr

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        losses, self._losses = self._losses, None
        if losses is not None:
            check_loss_count("GradNorm", losses, m)
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        norms = G.diagonal().clamp(min=0).sqrt()
        if self.logits is None or self.logits.numel() != m:
            if self.logits is not None:
                warn_restart("GradNorm", self.logits.numel(), m, "weights and initial losses")
            self.logits, self.initial_losses = torch.zeros(m, dtype=torch.float64), None
        p = torch.softmax(self.logits, dim=0)
        weights = m * p
        ratios = torch.ones(m, dtype=torch.float64)
        if losses is not None:
            if self.initial_losses is None:
                self.initial_losses = losses.clone()
            initial = self.initial_losses
            relative = torch.where(initial > 0, losses / torch.where(initial > 0, initial, 1.0), 1.0).clamp(
                min=0
            )
            if float(relative.mean()) > 0:
                ratios = relative / relative.mean()
        weighted = weights * norms
        targets = weighted.mean() * ratios**self.alpha
        grad_weights = torch.sign(weighted - targets) * norms
        grad_logits = m * p * (grad_weights - p @ grad_weights)
        self.logits = self.logits - self.lr * grad_logits
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"GradNormWeighting(alpha={self.alpha}, lr={self.lr})"


@aggregator_spec(
    name="gradnorm",
    summary="GradNorm: learned weights equalising `wᵢ‖gᵢ‖`",
    papers=(
        Paper(
            "Chen et al.",
            "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks",
            "ICML",
            2018,
            "1711.02257",
        ),
    ),
    loss_aware=True,
    state="learned weights, initial losses",
)
class GradNorm(LossAware, GramianWeightedAggregator):
    r"""GradNorm (Chen et al., *GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
    Multitask Networks*, ICML 2018, arXiv:1711.02257).

    :math:`A(J) = J^\top w` with weights learned across steps so that the weighted gradient norms
    :math:`w_i \|g_i\|` move towards their mean times :math:`r_i^\alpha` (the relative inverse
    training rate of objective :math:`i`). Gramian-only (it needs :math:`\|g_i\| = \sqrt{G_{ii}}`);
    stateful (``state_dict()``/``load_state_dict()``/``reset()``). The training rates need the loss
    values, given with :meth:`set_losses` (``JDTrainer`` does); without them only the gradient-norm
    balancing runs. See :class:`GradNormWeighting`. Hyper-parameters: ``alpha=1.5``, ``lr=0.025``.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: GradNormWeighting
    alpha = Delegated[float]()
    lr = Delegated[float]()

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(GradNormWeighting(alpha=alpha, lr=lr))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"GradNorm(alpha={w.alpha}, lr={w.lr})"
