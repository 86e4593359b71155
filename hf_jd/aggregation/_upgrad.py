r"""UPGrad: Unconflicting Projection of Gradients.

Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232 (2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Delegated, pref_str
from ._dual_cone_weighting import DualConeWeighting
from ._spec import Paper, aggregator_spec


class UPGradWeighting(DualConeWeighting):
    r"""Weights of :class:`UPGrad`.

    With :math:`\hat G = G / \mathrm{tr}(G) + \varepsilon I` and preference weights :math:`p`
    (default :math:`1/m`), each row :math:`i` is projected onto the dual cone of all rows:

    .. math:: v_i = \arg\min_v v^\top \hat G v \quad\text{s.t.}\quad v \succeq p_i e_i,
              \qquad w = \sum_i v_i .

    Then :math:`J^\top w = \sum_i \pi_J(p_i g_i)` and :math:`J J^\top w \succeq 0`: the update
    conflicts with no objective.

    Args:
        pref_vector: Preference weights ``p`` (one per objective); ``None`` for ``1/m``.
        norm_eps: Below this trace the Gramian is treated as zero.
        reg_eps: Ridge added to the normalised Gramian so the QP is strictly convex.
        solver: Dual-cone solver name (``"auto"`` picks the fastest exact one, ``"quadprog"`` is the
            reference).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    def forward(self, gramian: Tensor) -> Tensor:
        return self.project(torch.diag(self.preference(gramian)), gramian).sum(dim=0)


@aggregator_spec(
    name="upgrad",
    summary="projects each row onto the dual cone of all rows, sums; non-conflicting",
    papers=(
        Paper("Quinton & Rey", "Jacobian Descent for Multi-Objective Optimization", "", 2024, "2406.16232"),
    ),
)
class UPGrad(GramianWeightedAggregator):
    r"""Projects each row of :math:`J` onto the dual cone of all rows and sums the projections
    (weighted by the preference vector): :math:`A(J) = \sum_i \pi_J(p_i\, g_i)`.

    Non-conflicting (:math:`J A(J) \succeq 0`), linear under scaling (:math:`c \mapsto A(\mathrm{diag}(c) J)`
    is linear on :math:`c \in \mathbb{R}^m_{>0}`) and weighted (Quinton & Rey, arXiv:2406.16232, Section 5):
    the recommended aggregator for Jacobian descent. Linear under scaling implies positive homogeneity,
    :math:`A(cJ) = c\,A(J)` for :math:`c > 0`. Both hold up to the ``reg_eps`` regularisation, for
    Jacobians above ``norm_eps``. Arguments as in :class:`UPGradWeighting`; each is an attribute of the
    aggregator too, read and assigned on its weighting (so checked again).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: UPGradWeighting
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
            UPGradWeighting(
                pref_vector, norm_eps=norm_eps, reg_eps=reg_eps, solver=solver, projector=projector
            )
        )

    def __repr__(self) -> str:
        return f"UPGrad({self.gramian_weighting.arguments_repr()})"

    def __str__(self) -> str:
        return pref_str("UPGrad", self.pref_vector)
