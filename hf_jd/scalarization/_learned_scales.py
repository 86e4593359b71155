r"""Scalarizers with one learned scale per loss: Uncertainty Weighting and IMTL-L."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._base import Scalarizer, check_count, num_objectives


class UncertaintyWeighting(Scalarizer):
    r"""Uncertainty weighting (UW): one learned log-variance :math:`s_i = \log \sigma_i^2` per loss and

    .. math::
        \sum_i \left( \tfrac{1}{2} e^{-s_i} L_i + \tfrac{1}{2} s_i \right),

    the negative log-likelihood of a Gaussian with variance :math:`\sigma_i^2` (up to constants):
    :math:`\partial / \partial s_i = \tfrac{1}{2}(1 - e^{-s_i} L_i)`, so :math:`\sigma_i^2` tracks
    :math:`L_i` and each loss is weighted by :math:`1 / (2\sigma_i^2)`. The paper learns :math:`\log
    \sigma^2` rather than :math:`\sigma` for stability; :math:`s` starts at 0 (uniform weights), which the
    paper reports the result is robust to. TorchJD calls this class ``UW`` (an alias is exported).

    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics*, CVPR 2018, arXiv:1705.07115.

    **Learnable**: ``log_var`` (shape ``[m]``, float32) is an ``nn.Parameter``. Put :meth:`parameters` in
    the optimizer next to the model's (no weight decay), move the module to the model's device, and save
    :meth:`state_dict` with the checkpoint. :meth:`reset` sets :math:`s` back to 0.

    Args:
        shape: The number of objectives ``m`` (or ``[m]``, TorchJD's ``shape``). Required, because the
            parameters must exist before the optimizer is built.
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_objectives("UncertaintyWeighting", shape)))

    def forward(self, losses: Tensor, /) -> Tensor:
        check_count("UncertaintyWeighting", losses, self.log_var.numel(), "log-variances")
        s = self.log_var.to(losses.device)
        return (0.5 * torch.exp(-s) * losses + 0.5 * s).sum()

    def reset(self) -> None:
        with torch.no_grad():
            self.log_var.zero_()

    def __repr__(self) -> str:
        return f"UncertaintyWeighting(shape={self.log_var.numel()})"


UW = UncertaintyWeighting


class IMTLL(Scalarizer):
    r"""IMTL-L, the loss-balance part of Impartial Multi-Task Learning: one learned scale :math:`s_i` per
    loss and

    .. math::
        \sum_i \left( e^{s_i} L_i - s_i \right).

    At the optimum in :math:`s`, :math:`\partial / \partial s_i = e^{s_i} L_i - 1 = 0`, i.e. every scaled
    loss :math:`e^{s_i} L_i` equals 1: the losses are balanced whatever their scale. The :math:`-s_i` term
    keeps :math:`s_i` from going to :math:`-\infty`. Designed for positive losses; :math:`s` starts at 0
    (the plain sum). This is UW with :math:`s \mapsto -s` and a factor 2 (no distribution assumption).
    The gradient part (IMTL-G) is the aggregator :class:`hf_jd.aggregation.IMTLG`.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task Learning*, ICLR 2021
    (OpenReview IMPnRXEWpvr; no arXiv version).

    **Learnable**: ``log_scale`` (shape ``[m]``, float32) is an ``nn.Parameter``; same handling as
    :class:`UncertaintyWeighting`. :meth:`reset` sets :math:`s` back to 0.

    Args:
        shape: The number of objectives ``m`` (or ``[m]``, TorchJD's ``shape``).
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(num_objectives("IMTLL", shape)))

    def forward(self, losses: Tensor, /) -> Tensor:
        check_count("IMTLL", losses, self.log_scale.numel(), "scales")
        s = self.log_scale.to(losses.device)
        return (torch.exp(s) * losses - s).sum()

    def reset(self) -> None:
        with torch.no_grad():
            self.log_scale.zero_()

    def __repr__(self) -> str:
        return f"IMTLL(shape={self.log_scale.numel()})"
