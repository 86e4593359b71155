r"""MoDo: multi-objective gradient with double sampling, as a stateful weighting of the Gramian.

Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance*, NeurIPS 2023 (arXiv:2305.20057, Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_non_negative_number, check_positive_number
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._simplex import project_onto_simplex
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, cpu_tensor, warn_restart
from ._weighting_bases import Weighting, check_finite_gramian


class MoDoWeighting(Stateful, Weighting):
    r"""Weights of :class:`MoDo`.

    MoDo keeps weights :math:`\lambda \in \Delta_m` (the simplex, starting at :math:`\mathbf 1/m`) and
    takes one projected gradient step per call on the MGDA objective
    :math:`\tfrac12 \|J^\top \lambda\|^2 + \tfrac\rho2 \|\lambda\|^2`:

    .. math:: \lambda \leftarrow \Pi_{\Delta_m}\big(\lambda - \gamma\, (J_1 J_2^\top \lambda
              + \rho \lambda)\big), \qquad d = J_3^\top \lambda .

    The paper draws :math:`J_1, J_2, J_3` from three independent mini-batches, so that
    :math:`J_1 J_2^\top \lambda` is an unbiased estimate of :math:`G\lambda`. An aggregator is given
    one Jacobian per step, so here :math:`J_1 = J_2 = J_3 = J` and the step uses :math:`G = J J^\top`
    (the single-sample variant: what the method does with one batch; the double-sampling bias
    correction is lost). Called directly with :math:`J_1 J_2^\top` (square, not symmetric), the
    weighting does the paper's double-sampling step, as TorchJD's ``MoDoWeighting``. With a fixed :math:`J`, ``rho = 0`` and :math:`\gamma < 2 / \lambda_{\max}(G)`
    the iterates converge to MGDA's weights. The step is not normalised: :math:`\gamma` acts on
    :math:`G` as it is, so its useful range depends on the scale of the gradients (as in the paper).
    The projection is exact (sorting), in float64 on the CPU.

    Stateful: :math:`\lambda` is part of :meth:`state_dict`, cleared by :meth:`reset`; it restarts at
    :math:`\mathbf 1/m` with a warning when the number of objectives changes.

    Args:
        gamma: Step size :math:`\gamma > 0` of the weights (default ``1e-3``, LibMTL's ``MoDo_gamma``).
        rho: :math:`\ell_2` regularisation :math:`\rho \ge 0` of the weights (default ``0.1``).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gamma = Checked("MoDo", check_positive_number)
    rho = Checked("MoDo", check_non_negative_number)
    lambd = cpu_tensor()  # the weights

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma
        self.rho = rho

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        # Not symmetrised: TorchJD passes J_1 J_2^T of two independent batches (double sampling).
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        if self.lambd is None or self.lambd.numel() != m:
            if self.lambd is not None:
                warn_restart("MoDo", self.lambd.numel(), m, "weights")
            self.lambd = torch.full((m,), 1.0 / m, dtype=torch.float64)
        step = G @ self.lambd + self.rho * self.lambd
        self.lambd = torch.from_numpy(project_onto_simplex((self.lambd - self.gamma * step).numpy()))
        return self.lambd.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"MoDoWeighting(gamma={self.gamma}, rho={self.rho})"


@aggregator_spec(
    name="modo",
    summary="MoDo: one projected step of MGDA's weights per call",
    papers=(
        Paper(
            "Chen et al.",
            "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance",
            "NeurIPS",
            2023,
            "2305.20057",
        ),
    ),
    state="weights",
)
class MoDo(Stateful, GramianWeightedAggregator):
    r"""MoDo (Chen et al., *Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance*, NeurIPS 2023, arXiv:2305.20057).

    :math:`A(J) = J^\top \lambda` where :math:`\lambda \in \Delta_m` follows one projected gradient
    step :math:`\lambda \leftarrow \Pi_{\Delta_m}(\lambda - \gamma (G + \rho I)\lambda)` per call — a
    single-loop, slowly moving MGDA. Gramian-only; stateful (``state_dict()``/``load_state_dict()``/
    ``reset()``). Deviation: the paper's three independent mini-batch Jacobians are all the one
    Jacobian of the step (see :class:`MoDoWeighting`). Hyper-parameters ``gamma=1e-3``, ``rho=0.1``.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: MoDoWeighting
    gamma = Delegated[float]()
    rho = Delegated[float]()

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__(MoDoWeighting(gamma=gamma, rho=rho))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        return f"MoDo(gamma={w.gamma}, rho={w.rho})"
