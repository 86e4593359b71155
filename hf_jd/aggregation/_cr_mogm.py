r"""CR-MOGM: correlation-reduced multi-objective gradient manipulation, wrapped around any weighting.

Zhou, Zhang, Jiang, Zhong, Gu & Zhu, *On the Convergence of Stochastic Multi-Objective Gradient
Manipulation and Beyond*, NeurIPS 2022 (proceedings only; no
arXiv version).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from .._validation import ArgumentTypeError, as_weight_vector, check_number_in
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._registry import aggregator_class, get_aggregator
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, cpu_tensor, warn_restart
from ._weighting_bases import Weighting, check_finite_gramian


def _base_weighting(name: object, kwargs: object) -> Weighting:
    """Build the Gramian weighting of the aggregator registered as ``name``."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"CRMOGM's weighting must be an aggregator name (e.g. 'mgda'), got {name!r}.")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ArgumentTypeError(f"CRMOGM's weighting_kwargs must be a dict or None, got {kwargs!r}.")
    cls = aggregator_class(name)
    if not issubclass(cls, GramianWeightedAggregator) or cls is CRMOGM:
        raise ValueError(
            f"CRMOGM's weighting must name a Gramian-weighted aggregator other than 'cr_mogm' (e.g. 'mgda', "
            f"'upgrad', 'pcgrad', 'cagrad'), got {name!r} ({cls.__name__})."
        )
    aggregator = get_aggregator(name, **(kwargs or {}))
    assert isinstance(aggregator, GramianWeightedAggregator)
    return aggregator.gramian_weighting


class CRMOGMWeighting(Stateful, Weighting):
    r"""Weights of :class:`CRMOGM`: an exponential moving average of another weighting's weights.

    With :math:`\hat\lambda_t = W(G_t)` the weights of the wrapped weighting ``W`` at call :math:`t`,

    .. math:: \lambda_t = \alpha\, \lambda_{t-1} + (1 - \alpha)\, \hat\lambda_t, \qquad d_t = J_t^\top \lambda_t .

    Averaging the weights across steps reduces the correlation between the weights and the
    stochastic gradients they multiply, which biases stochastic MGDA/PCGrad/CAGrad; the paper proves
    convergence of the averaged variants. The first call has no history: :math:`\lambda_1 =
    \hat\lambda_1` (the wrapped method). The wrapped weighting is a sub-module, so a stateful one
    (e.g. ``gradvac``) keeps and saves its own state too. Gramian-only whenever ``W`` is.

    Stateful: :math:`\lambda` is part of :meth:`state_dict`; :meth:`reset` clears it (and resets the
    wrapped weighting when it has a ``reset``); it restarts with a warning when the number of
    objectives changes.

    Args:
        weighting: The wrapped :class:`Weighting`.
        alpha: Averaging coefficient :math:`\alpha \in [0, 1]` (default ``0.9``); ``0`` is the wrapped
            method itself, ``1`` freezes the weights at :math:`\lambda_0`.
        initial_weights: :math:`\lambda_0` (one weight per objective, TorchJD's argument); ``None``
            (default) starts from the wrapped method's first weights, :math:`\lambda_1 = \hat\lambda_1`.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    alpha = Checked("CRMOGM", partial(check_number_in, low=0.0, high=1.0))
    initial_weights = Checked(
        "CRMOGM",
        lambda owner, name, value: (
            None if value is None else as_weight_vector(owner, name, value).to(torch.float64)
        ),
    )
    lambd = cpu_tensor()  # the averaged weights

    def __init__(
        self,
        weighting: Weighting,
        alpha: float = 0.9,
        initial_weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting):
            raise ArgumentTypeError(f"CRMOGMWeighting wraps a Weighting, got {type(weighting).__name__}.")
        self.weighting = weighting
        self.alpha = alpha
        self.initial_weights = initial_weights

    @property
    def accepts_matrix(self) -> bool:
        return self.weighting.accepts_matrix  # a Jacobian when the wrapped weighting takes one (TorchJD)

    @property
    def required_rows(self) -> int | None:
        return self.weighting.required_rows

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        current = self.weighting(gramian).detach().to(device="cpu", dtype=torch.float64)
        if self.lambd is None or self.lambd.numel() != m:
            if self.lambd is not None:
                warn_restart("CRMOGM", self.lambd.numel(), m, "averaged weights")
            if self.initial_weights is None:
                self.lambd = current
            elif self.initial_weights.numel() != m:
                raise ValueError(
                    f"CRMOGM's initial_weights has {self.initial_weights.numel()} entries but there are {m} "
                    "objectives."
                )
            else:
                self.lambd = self.alpha * self.initial_weights + (1.0 - self.alpha) * current
        else:
            self.lambd = self.alpha * self.lambd + (1.0 - self.alpha) * current
        return self.lambd.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"CRMOGMWeighting({self.weighting!r}, alpha={self.alpha})"


@aggregator_spec(
    name="cr_mogm",
    summary="CR-MOGM: moving average of another method's weights (`weighting`, default `mgda`)",
    papers=(
        Paper(
            "Zhou et al.",
            "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond",
            "NeurIPS",
            2022,
        ),
    ),
    state="averaged weights",
)
class CRMOGM(Stateful, GramianWeightedAggregator):
    r"""CR-MOGM (Zhou et al., *On the Convergence of Stochastic Multi-Objective Gradient Manipulation
    and Beyond*, NeurIPS 2022).

    :math:`A(J_t) = J_t^\top \lambda_t` with :math:`\lambda_t = \alpha\lambda_{t-1} + (1-\alpha)
    W(J_t J_t^\top)`: the weights of another method, averaged over the steps (see
    :class:`CRMOGMWeighting`). The wrapped method is chosen by its registry name, ``weighting``
    (default ``"mgda"``, the paper's CR-MGDA; any Gramian-weighted aggregator such as ``"upgrad"``,
    ``"pcgrad"`` or ``"cagrad"``), built with ``weighting_kwargs``. Gramian-only; stateful
    (``state_dict()``/``load_state_dict()``/``reset()``). ``alpha`` defaults to ``0.9``.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: CRMOGMWeighting
    alpha = Delegated[float]()

    def __init__(
        self,
        weighting: str = "mgda",
        alpha: float = 0.9,
        weighting_kwargs: dict | None = None,
        initial_weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        base = _base_weighting(weighting, weighting_kwargs)
        super().__init__(CRMOGMWeighting(base, alpha=alpha, initial_weights=initial_weights))
        self.weighting_name = weighting.strip().lower().replace("-", "_")
        self.weighting_kwargs = dict(weighting_kwargs or {})

    def __repr__(self) -> str:
        extra = f", weighting_kwargs={self.weighting_kwargs!r}" if self.weighting_kwargs else ""
        return f"CRMOGM(weighting={self.weighting_name!r}, alpha={self.gramian_weighting.alpha}{extra})"
