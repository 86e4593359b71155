r"""Random: random positive weights drawn afresh at every step.

Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning*, TMLR 2022 (arXiv:2111.10603, Algorithm 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._seeded import SeededGenerator
from ._aggregator_bases import GramianWeightedAggregator
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful
from ._weighting_bases import Weighting


class RandomWeighting(SeededGenerator, Stateful, Weighting):
    r"""Random weights :math:`w = \mathrm{softmax}(z)`, :math:`z \sim \mathcal{N}(0, I_m)`, drawn at
    every call (positive, summing to 1; the Gramian only gives :math:`m`).

    The draws come from a CPU ``torch.Generator`` owned by this module (float64, then cast to the
    Gramian's dtype and device), so they do not depend on, nor disturb, the global random state.
    The generator state is part of :meth:`state_dict` (through ``get_extra_state``), so restoring a
    checkpoint with :meth:`load_state_dict` continues exactly the same random sequence.

    Args:
        seed: Seed of the generator; ``None`` seeds it from a non-deterministic source.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._init_generator("Random", seed)

    @property
    def accepts_matrix(self) -> bool:
        return True  # reads only the number of rows: a Jacobian works as well as a Gramian (TorchJD)

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        z = torch.randn(m, generator=self._generator, dtype=torch.float64)
        return torch.softmax(z, dim=0).to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return "RandomWeighting()" if self.seed is None else f"RandomWeighting(seed={self.seed})"


@aggregator_spec(
    name="random",
    summary="random positive weights, drawn afresh at every step",
    papers=(
        Paper(
            "Lin et al.",
            "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
            "TMLR",
            2022,
            "2111.10603",
        ),
    ),
    state="generator",
    example_kwargs=lambda m: {"seed": 0},
)
class Random(Stateful, GramianWeightedAggregator):
    r"""Random positive combination of the rows: :math:`A(J) = J^\top \mathrm{softmax}(z)`,
    :math:`z \sim \mathcal{N}(0, I_m)` drawn at every call (Lin et al., arXiv:2111.10603).

    Stateful: ``state_dict()`` / ``load_state_dict()`` save and restore the generator, so a resumed
    run draws the same weights as an uninterrupted one. Arguments as in :class:`RandomWeighting`.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(RandomWeighting(seed))

    def __repr__(self) -> str:
        seed = self.gramian_weighting.seed
        return "Random()" if seed is None else f"Random(seed={seed})"
