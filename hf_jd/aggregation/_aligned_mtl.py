r"""Aligned-MTL: aligning the principal components of the task gradients.

Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component Alignment for Multi-Task
Learning*, CVPR 2023 (arXiv:2305.19000, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated, pref_str
from ._constant import ConstantWeighting
from ._mean import MeanWeighting
from ._preference import PrefVector, pref_weights
from ._spec import Paper, aggregator_spec
from ._weighting_bases import Weighting, check_finite_gramian

_SCALE_MODES = ("min", "median", "rmse")


def _check_scale_mode(owner: str, name: str, value: object) -> str:
    if value not in _SCALE_MODES:
        raise ValueError(f"{owner}'s {name} must be one of {_SCALE_MODES}, got {value!r}.")
    return value  # type: ignore[return-value]


class AlignedMTLWeighting(Weighting):
    r"""Weights of :class:`AlignedMTL`.

    With the eigendecomposition :math:`G = V \Lambda V^\top` restricted to its ``r`` non-zero
    eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_r`, Aligned-MTL makes the gradient system
    orthogonal and equally scaled — :math:`\hat J = B^\top J` with
    :math:`\hat J \hat J^\top = \lambda_\star\, V_r V_r^\top` — through the balance transformation

    .. math:: B = \sqrt{\lambda_\star}\; V_r \Lambda_r^{-1/2} V_r^\top , \qquad w = B\, p ,

    where :math:`p` is the preference vector (default :math:`1/m`) and :math:`\lambda_\star` is the
    smallest retained eigenvalue (``scale_mode="min"``, the paper's default), their median
    (``"median"``) or their mean (``"rmse"``). The update is :math:`J^\top w`.

    The eigendecomposition runs in float64 on the CPU. The retained eigenvalues are those above
    :math:`\lambda_{\max} \cdot m \cdot \mathrm{eps}` (``eps`` of the Gramian's dtype): the rank
    rule of the official implementation (SamsungLabs/MTL, ``ProcrustesSolver``: largest eigenvalue
    times the size times the machine epsilon) and of TorchJD. Below that, an eigenvalue is within the
    round-off of a Gramian stored in that dtype (duplicated or collinear rows); above it, it is kept,
    so an ill-conditioned but full-rank Gramian (condition number :math:`10^5`, common with
    per-example objectives in float32) keeps its smallest eigenvalue as :math:`\lambda_\star`.
    A zero Gramian gives zero weights.

    Args:
        pref_vector: Preference weights ``p`` (one per objective); ``None`` for ``1/m``.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``: which eigenvalue scale
            :math:`\lambda_\star` the aligned gradients get.
    """

    pref_vector = PrefVector("AlignedMTL", MeanWeighting, ConstantWeighting)
    scale_mode = Checked("AlignedMTL", _check_scale_mode)

    def __init__(self, pref_vector: Tensor | Sequence[float] | None = None, scale_mode: str = "min") -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        p = pref_weights(self.pref_vector, gramian).to(device="cpu", dtype=torch.float64)
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        eigenvalues, V = torch.linalg.eigh((G + G.T) / 2)
        largest = eigenvalues.max()
        keep = eigenvalues > largest * len(eigenvalues) * torch.finfo(gramian.dtype).eps
        if not bool(largest > 0) or not bool(keep.any()):
            weights = torch.zeros_like(p)
        else:
            kept, V = eigenvalues[keep], V[:, keep]
            if self.scale_mode == "min":
                scale = kept.min()
            elif self.scale_mode == "median":
                scale = kept.median()
            else:
                scale = kept.mean()
            B = scale.sqrt() * (V / kept.sqrt()) @ V.T
            weights = B @ p
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"AlignedMTLWeighting(pref_vector={pref}, scale_mode={self.scale_mode!r})"


@aggregator_spec(
    name="aligned_mtl",
    summary="Aligned-MTL: balanced principal components",
    papers=(
        Paper(
            "Senushkin et al.",
            "Independent Component Alignment for Multi-Task Learning",
            "CVPR",
            2023,
            "2305.19000",
        ),
    ),
)
class AlignedMTL(GramianWeightedAggregator):
    r"""Aligned-MTL (Senushkin et al., *Independent Component Alignment for Multi-Task Learning*,
    CVPR 2023, arXiv:2305.19000).

    :math:`A(J) = J^\top B p` with the balance transformation
    :math:`B = \sqrt{\lambda_\star} V \Lambda^{-1/2} V^\top` of the Gramian (pseudo-inverse square
    root, rescaled by the smallest non-zero eigenvalue by default): the components of the update
    along the principal directions of the gradients are all equally scaled, which removes the
    dominance of large gradients. Gramian-only, deterministic, stateless. Hyper-parameters:
    ``pref_vector`` (default :math:`1/m`, as TorchJD's ``AlignedMTL(pref_vector)``) and
    ``scale_mode`` (``"min"``, the paper's default). See :class:`AlignedMTLWeighting`.
    """

    gramian_weighting: AlignedMTLWeighting
    pref_vector = Delegated[Tensor | None]()
    scale_mode = Delegated[str]()

    def __init__(self, pref_vector: Tensor | Sequence[float] | None = None, scale_mode: str = "min") -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode=scale_mode))

    def __repr__(self) -> str:
        w = self.gramian_weighting
        pref = None if w.pref_vector is None else w.pref_vector.tolist()
        return f"AlignedMTL(pref_vector={pref}, scale_mode={w.scale_mode!r})"

    def __str__(self) -> str:
        return pref_str("AlignedMTL", self.pref_vector)
