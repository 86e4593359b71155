r"""Krum and Multi-Krum: Byzantine-robust selection of the rows, as a weighting of the Gramian.

Blanchard, El Mhamdi, Guerraoui & Stainer, *Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent*, NeurIPS 2017 (Krum, Section 4; Multi-Krum, Section 5).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .._validation import check_integer
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._weighting_bases import Weighting, check_finite_gramian


class KrumWeighting(Weighting):
    r"""Weights of :class:`Krum`: uniform over the selected rows, zero elsewhere.

    The squared distances come from the Gramian,
    :math:`\|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij}`. The score of row :math:`i` is the sum of
    its squared distances to its :math:`k = m - f - 2` nearest other rows (:math:`f` =
    ``n_byzantine``), and the ``n_selected`` rows of smallest score are averaged (Krum for
    ``n_selected = 1``, Multi-Krum otherwise).

    Ties: every row whose score equals the ``n_selected``-th smallest one (up to a relative
    :math:`10^{-12}` of the largest score, i.e. round-off) is selected too and all selected rows are
    averaged, so the result does not depend on the order of the rows (duplicated rows, which always
    tie, give the same average). With :math:`m < f + 3` rows there are no neighbours to score
    (:math:`k \le 0`), every score is 0 and the result is the mean of all rows (TorchJD raises
    instead). The computation runs in float64 on the CPU.

    Args:
        n_byzantine: Number :math:`f \ge 0` of rows that may be adversarial. Krum's guarantee needs
            :math:`m > 2f + 2`.
        n_selected: Number of rows averaged (``1`` = Krum, more = Multi-Krum); at most ``m``.
    """

    n_byzantine = Checked("Krum", partial(check_integer, minimum=0))
    n_selected = Checked("Krum", partial(check_integer, minimum=1))

    def __init__(self, n_byzantine: int = 1, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def _check_rows(self, m: int) -> None:
        if m < self.n_selected:
            raise ValueError(
                f"Krum(n_selected={self.n_selected}) needs at least {self.n_selected} rows, got {m}. "
                "Use a smaller n_selected."
            )

    def _no_objectives(self, stat: Tensor) -> Tensor:
        self._check_rows(0)
        return super()._no_objectives(stat)

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        self._check_rows(m)
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        G = (G + G.T) / 2
        squared_norms = G.diagonal()
        distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * G).clamp(min=0)
        distances.fill_diagonal_(float("inf"))
        k = max(m - self.n_byzantine - 2, 0)
        scores = torch.sort(distances, dim=1).values[:, :k].sum(dim=1)
        threshold = torch.sort(scores).values[self.n_selected - 1]
        tolerance = 1e-12 * float(scores.abs().max()) if k > 0 else 0.0
        selected = scores <= threshold + tolerance
        weights = selected.to(torch.float64) / selected.sum()
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"KrumWeighting(n_byzantine={self.n_byzantine}, n_selected={self.n_selected})"


@aggregator_spec(
    name="krum",
    summary="Krum / Multi-Krum, Byzantine-robust selection of the rows",
    papers=(
        Paper(
            "Blanchard et al.",
            "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
            "NeurIPS",
            2017,
        ),
    ),
    example_kwargs=lambda m: {"n_byzantine": 1 if m > 3 else 0},
)
class Krum(GramianWeightedAggregator):
    r"""Krum / Multi-Krum (Blanchard et al., *Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent*, NeurIPS 2017).

    Averages the ``n_selected`` rows whose summed squared distances to their :math:`m - f - 2`
    nearest neighbours are the smallest, so that up to :math:`f` arbitrary (Byzantine) rows cannot
    drag the update far away. Pairwise distances come from the Gramian: Gramian-only,
    deterministic, stateless. Hyper-parameters: ``n_byzantine`` (:math:`f`; default ``1``, TorchJD
    requires it) and ``n_selected`` (default ``1``, plain Krum), as TorchJD's
    ``Krum(n_byzantine, n_selected)``. Unlike TorchJD, which sums plain distances, the scores sum
    squared distances as in the paper. See :class:`KrumWeighting` for ties and small ``m``.
    """

    n_byzantine = Delegated[int]()
    n_selected = Delegated[int]()

    def __init__(self, n_byzantine: int = 1, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine=n_byzantine, n_selected=n_selected))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"Krum(n_byzantine={w.n_byzantine}, n_selected={w.n_selected})"

    def __str__(self) -> str:
        return f"Krum{self.n_byzantine}-{self.n_selected}"
