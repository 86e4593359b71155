r"""Random loss weighting (RLW): random positive weights drawn afresh at every call."""

from __future__ import annotations

import torch
from torch import Tensor

from .._seeded import SeededGenerator
from ._base import Scalarizer


class Random(SeededGenerator, Scalarizer):
    r"""Random loss weighting: :math:`\sum_i \lambda_i L_i` with :math:`\lambda = \mathrm{softmax}(z)`,
    :math:`z \sim \mathcal{N}(0, I_m)` drawn at every call (positive weights summing to 1).

    This is RLW with the paper's default distribution (standard normal logits through a softmax,
    Algorithm 2): Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning*, TMLR 2022, arXiv:2111.10603.

    The draws come from a CPU ``torch.Generator`` owned by this module (float64, then cast to the losses'
    device and dtype), so they neither depend on nor disturb the global random state. Its state is the
    module's extra state: :meth:`state_dict` / :meth:`load_state_dict` save and restore it, so a resumed
    run draws the same weights as an uninterrupted one; :meth:`reset` re-seeds it.

    Args:
        seed: Seed of the generator; ``None`` seeds it from a non-deterministic source. Under several
            processes, give every rank the same seed so that all ranks draw the same weights.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._init_generator("Random", seed)

    def draw_weights(self, m: int) -> Tensor:
        """Draw the next weight vector (float64, CPU), advancing the generator."""
        z = torch.randn(m, generator=self._generator, dtype=torch.float64)
        return torch.softmax(z, dim=0)

    def forward(self, losses: Tensor, /) -> Tensor:
        weights = self.draw_weights(losses.numel()).to(device=losses.device, dtype=losses.dtype)
        return (weights * losses).sum()

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"
