r"""DualProj: projection of the (preference-weighted) mean gradient onto the dual cone.

Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232 (2024); the
projection is the one of Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017, Eq. 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Delegated, pref_str
from ._dual_cone_weighting import DualConeWeighting
from ._spec import Paper, aggregator_spec


class DualProjWeighting(DualConeWeighting):
    r"""Weights of :class:`DualProj`.

    With :math:`\hat G = G / \mathrm{tr}(G) + \varepsilon I` and preference weights :math:`p`
    (default :math:`1/m`), the combination :math:`J^\top p` is projected onto the dual cone
    :math:`\{x : J x \succeq 0\}` in its dual form (arXiv:2406.16232, Proposition 1):

    .. math:: w = \arg\min_v v^\top \hat G v \quad\text{s.t.}\quad v \succeq p .

    Then :math:`J^\top w = \pi_J(J^\top p)` and :math:`J J^\top w \succeq 0` (up to the ridge).

    Args:
        pref_vector: Preference weights ``p`` (one per objective); ``None`` for ``1/m``.
        norm_eps: Below this trace the Gramian is treated as zero.
        reg_eps: Ridge added to the normalised Gramian so the QP is strictly convex.
        solver: Dual-cone solver name (``"auto"`` picks the fastest exact one, ``"quadprog"`` is the
            reference).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    def forward(self, gramian: Tensor) -> Tensor:
        return self.project(self.preference(gramian)[None], gramian)[0]


@aggregator_spec(
    name="dualproj",
    summary="projects the mean onto the dual cone; non-conflicting",
    papers=(
        Paper("Quinton & Rey", "Jacobian Descent for Multi-Objective Optimization", "", 2024, "2406.16232"),
    ),
)
class DualProj(GramianWeightedAggregator):
    r"""Projects the preference-weighted mean of the rows onto the dual cone of the rows:
    :math:`A(J) = \pi_J(J^\top p)`.

    Non-conflicting (:math:`J A(J) \succeq 0`) like :class:`UPGrad`, but it projects one combination
    instead of every row, so it does not weigh the objectives as fairly (arXiv:2406.16232).
    Arguments as in :class:`DualProjWeighting`; each is an attribute of the aggregator too, read and
    assigned on its weighting (so checked again).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: DualProjWeighting
    pref_vector = Delegated[Tensor | None]()
    norm_eps = Delegated[float]()
    reg_eps = Delegated[float]()
    solver = Delegated[str]()
    projector = Delegated[Any]()

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        solver: str = "auto",
        projector: Any = None,
    ) -> None:
        super().__init__(
            DualProjWeighting(
                pref_vector, norm_eps=norm_eps, reg_eps=reg_eps, solver=solver, projector=projector
            )
        )

    def __repr__(self) -> str:
        return f"DualProj({self.gramian_weighting.arguments_repr()})"

    def __str__(self) -> str:
        return pref_str("DualProj", self.pref_vector)
