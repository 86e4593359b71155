r"""GradVac: Gradient Vaccine, as a stateful weighting of the Gramian.

Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models*, ICLR 2021 (arXiv:2010.05874, Algorithm 1 and Equations 2–3).
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .._validation import check_number_in, check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, cpu_tensor
from ._weighting_bases import Weighting, check_finite_gramian


class GradVacWeighting(Stateful, Weighting):
    r"""Weights of :class:`GradVac`, computed from the Gramian only.

    GradVac keeps, for every ordered pair of objectives :math:`(i, j)`, a target cosine similarity
    :math:`\hat\phi_{ij}` (an exponential moving average of the observed similarities, starting at
    0). For every row :math:`g_i`, start from :math:`g'_i = g_i` and visit the other rows
    :math:`g_j`; with :math:`\phi = \cos(g'_i, g_j)` and :math:`\hat\phi = \hat\phi_{ij}`, when
    :math:`\phi < \hat\phi`,

    .. math:: g'_i \leftarrow g'_i + \frac{\|g'_i\| \big(\hat\phi \sqrt{1 - \phi^2}
              - \phi \sqrt{1 - \hat\phi^2}\big)}{\|g_j\| \sqrt{1 - \hat\phi^2}}\; g_j ,

    which raises the similarity of :math:`g'_i` with :math:`g_j` to the target (Equation 2); then
    :math:`\hat\phi_{ij} \leftarrow (1 - \beta)\hat\phi_{ij} + \beta \phi` (Equation 3). The update
    is :math:`\sum_i g'_i`. With all targets at 0 (the first call) this is exactly PCGrad.

    Every :math:`g'_i` stays a combination :math:`J^\top c_i` of the rows, and all the inner
    products it needs are :math:`c_i^\top G c_i` and :math:`(G c_i)_j`, so the weights
    :math:`w = \sum_i c_i` follow from :math:`G` alone. As in :class:`PCGradWeighting`, the other rows
    are visited in increasing order of their cosine similarity with :math:`g_i` (ties broken by
    index) rather than in a random order, so the result is deterministic and does not depend on the
    order of the rows; with two objectives every order gives the same result. Zero rows are
    skipped (neither modified against nor used to update a target). The denominator
    :math:`\sqrt{1 - \hat\phi^2}` is floored at ``eps``. The computation runs in float64 on the CPU.

    Stateful: the targets (an ``m × m`` float64 tensor) are part of :meth:`state_dict` and cleared by
    :meth:`reset`. If the number of objectives changes, the targets restart from zero with a
    warning (per-example objectives are different examples at every step, so GradVac is meant for
    multi-task learning with a fixed set of tasks).

    Args:
        beta: EMA rate :math:`\beta \in [0, 1]` of the targets (the paper's default ``1e-2``;
            LibMTL uses ``0.5``). ``beta = 0`` keeps every target at 0, i.e. PCGrad.
        eps: Floor of :math:`\sqrt{1 - \hat\phi^2}` (default ``1e-8``).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    beta = Checked("GradVac", partial(check_number_in, low=0.0, high=1.0))
    eps = Checked("GradVac", check_positive_number)
    targets = cpu_tensor(ndim=2)  # the m x m target similarities

    def __init__(self, beta: float = 1e-2, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
        G = (G + G.T) / 2
        m = G.shape[0]
        if self.targets is None or self.targets.shape != (m, m):
            if self.targets is not None:
                warnings.warn(
                    f"GradVac: the number of objectives changed from {self.targets.shape[0]} to {m}; "
                    "its target similarities restart from zero.",
                    stacklevel=2,
                )
            self.targets = torch.zeros(m, m, dtype=torch.float64)
        targets = self.targets.numpy().copy()
        squared_norms = np.clip(G.diagonal(), 0.0, None)
        norms = np.sqrt(squared_norms)
        nonzero = norms > 0
        keys = np.full((m, m), np.inf)
        keys[:, nonzero] = G[:, nonzero] / norms[nonzero]
        order = np.argsort(keys, axis=1, kind="stable")
        weights = np.zeros(m)
        for i in range(m):
            c = np.zeros(m)
            c[i] = 1.0
            if nonzero[i]:
                for j in order[i]:
                    if j == i or not nonzero[j]:
                        continue
                    G_c = G @ c
                    norm_i = math.sqrt(max(float(c @ G_c), 0.0))
                    if norm_i == 0.0:
                        break
                    phi = min(max(float(G_c[j]) / (norm_i * norms[j]), -1.0), 1.0)
                    target = float(targets[i, j])
                    if phi < target:
                        root = max(math.sqrt(max(1.0 - target * target, 0.0)), self.eps)
                        numerator = target * math.sqrt(1.0 - phi * phi) - phi * math.sqrt(
                            max(1.0 - target * target, 0.0)
                        )
                        c[j] += norm_i * numerator / (norms[j] * root)
                    targets[i, j] = (1.0 - self.beta) * target + self.beta * phi
            weights += c
        self.targets = torch.from_numpy(targets)
        return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"GradVacWeighting(beta={self.beta}, eps={self.eps})"


@aggregator_spec(
    name="gradvac",
    summary="Gradient Vaccine: steer pairwise similarities to EMA targets",
    papers=(
        Paper(
            "Wang et al.",
            "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively Multilingual Models",
            "ICLR",
            2021,
            "2010.05874",
        ),
    ),
    state="EMA targets",
)
class GradVac(Stateful, GramianWeightedAggregator):
    r"""Gradient Vaccine (Wang et al., *Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models*, ICLR 2021, arXiv:2010.05874).

    Generalises PCGrad: instead of only removing negative similarity, each row is steered so that
    its cosine similarity with every other row reaches an adaptive target (an exponential moving
    average of past similarities), and the adjusted rows are summed. Gramian-only; stateful (the
    targets are saved by ``state_dict()``, restored by ``load_state_dict()`` and cleared by
    ``reset()``); deterministic (see :class:`GradVacWeighting` for the visiting order). The targets
    are for the whole Jacobian (the paper's "whole model" granularity). Hyper-parameters: ``beta``
    (default ``1e-2``, the paper's) and ``eps`` (``1e-8``).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: GradVacWeighting
    beta = Delegated[float]()
    eps = Delegated[float]()

    def __init__(self, beta: float = 1e-2, eps: float = 1e-8) -> None:
        super().__init__(GradVacWeighting(beta=beta, eps=eps))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"GradVac(beta={w.beta}, eps={w.eps})"
