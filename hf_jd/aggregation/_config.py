r"""ConFIG: Conflict-Free Inverse Gradients, written as a weighting of the Gramian.

Liu, Chen & Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks*,
ICLR 2025 (arXiv:2408.11104, Equation 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Delegated, pref_str
from ._constant import ConstantWeighting
from ._preference import PrefVector
from ._spec import Paper, aggregator_spec
from ._sum import SumWeighting
from ._weighting_bases import Weighting, check_finite_gramian


class ConFIGWeighting(Weighting):
    r"""Weights of :class:`ConFIG`, computed from the Gramian only.

    With the unit rows :math:`u_i = g_i / \|g_i\|` (zero rows stay zero), :math:`U = D^{-1} J`,
    :math:`D = \mathrm{diag}(\|g_i\|)`, and preference weights :math:`p` (default all ones), ConFIG
    takes the direction :math:`g_v = U^{+} p` — the least-norm vector whose projections on the unit
    gradients are :math:`p` — normalises it, :math:`\hat g_v = g_v / \|g_v\|`, and scales it by the
    sum of the projections of the rows on it:

    .. math:: A(J) = \Big(\sum_i g_i^\top \hat g_v\Big)\, \hat g_v .

    Since :math:`U^{+} = U^\top (U U^\top)^{+}`, :math:`g_v = J^\top a` with
    :math:`a = D^{-1} (D^{-1} G D^{-1})^{+} p`; then :math:`\|g_v\|^2 = a^\top G a` and
    :math:`\sum_i g_i^\top g_v = \mathbf 1^\top G a`, so the weights
    :math:`w = \frac{\mathbf 1^\top G a}{a^\top G a}\, a` need only :math:`G`: ConFIG runs with the
    Gramian engine although it is usually written with :math:`J`. The pseudo-inverse is taken in
    float64 on the CPU, on the unit-diagonal matrix :math:`D^{-1} G D^{-1}` (the cosine
    similarities); eigenvalues up to :math:`m \, \mathrm{eps}` times the largest (``eps`` of the
    Gramian's dtype) count as zero, as in :class:`IMTLGWeighting` and :class:`AlignedMTLWeighting`:
    the round-off of a rank-deficient Gramian is not inverted, and an ill-conditioned but full-rank
    one keeps every eigenvalue. The weights are zero when :math:`g_v = 0` (e.g. a zero
    Jacobian).

    Args:
        pref_vector: Preference weights ``p`` (one per objective); ``None`` for all ones (the
            paper's choice). Only its direction matters.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    pref_vector = PrefVector("ConFIG", SumWeighting, ConstantWeighting)

    def __init__(self, pref_vector: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        self.pref_vector = pref_vector

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        G = (G + G.T) / 2
        if self.pref_vector is None:
            p = torch.ones(m, dtype=torch.float64)
        elif self.pref_vector.numel() != m:
            raise ValueError(
                f"ConFIG's preference vector has {self.pref_vector.numel()} entries but there are {m} "
                "objectives (losses). Give one weight per loss, or leave pref_vector unset."
            )
        else:
            p = self.pref_vector.to(torch.float64)
        norms = G.diagonal().clamp(min=0).sqrt()
        nonzero = norms > 0
        inverse_norms = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), 0.0)
        cosines = inverse_norms[:, None] * G * inverse_norms[None, :]
        rtol = m * torch.finfo(gramian.dtype).eps
        a = inverse_norms * (torch.linalg.pinv(cosines, rtol=rtol, hermitian=True) @ p)
        G_a = G @ a
        squared_norm = a @ G_a
        if not bool(squared_norm > 0):
            weights = torch.zeros(m, dtype=torch.float64)
        else:
            weights = (G_a.sum() / squared_norm) * a
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"ConFIGWeighting(pref_vector={pref})"


@aggregator_spec(
    name="config",
    summary="ConFIG: equal projections on the unit gradients, the mean's length",
    papers=(
        Paper(
            "Liu, Chen & Thuerey",
            "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
            "ICLR",
            2025,
            "2408.11104",
        ),
    ),
)
class ConFIG(GramianWeightedAggregator):
    r"""Conflict-Free Inverse Gradients (Liu, Chen & Thuerey, *ConFIG: Towards Conflict-free
    Training of Physics Informed Neural Networks*, ICLR 2025, arXiv:2408.11104).

    :math:`A(J) = (\sum_i g_i^\top \hat g_v)\, \hat g_v` with :math:`\hat g_v` the unit vector along
    :math:`U^+ p`, :math:`U` the matrix of unit rows: when the unit rows are linearly independent,
    the update has the same positive projection on every unit gradient (for ``p = 1``), so it
    conflicts with no objective. Usually written with :math:`J`, but it is a function of the
    Gramian (see :class:`ConFIGWeighting`), so it runs with the Gramian engine. Hyper-parameter:
    ``pref_vector`` (default all ones, as in the paper and TorchJD's ``ConFIG(pref_vector)``).
    Deterministic, stateless.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: ConFIGWeighting
    pref_vector = Delegated[Tensor | None]()

    def __init__(self, pref_vector: Tensor | Sequence[float] | None = None) -> None:
        super().__init__(ConFIGWeighting(pref_vector))

    def __repr__(self) -> str:
        pref = self.gramian_weighting.pref_vector
        return f"ConFIG(pref_vector={None if pref is None else pref.tolist()})"

    def __str__(self) -> str:
        return pref_str("ConFIG", self.pref_vector)
