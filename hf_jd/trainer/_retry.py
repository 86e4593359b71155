"""Re-running one micro-batch exactly: the random-number and gradient state before its first attempt.

When ``jd_engine="auto"`` has to abandon the Gramian engine during a step (a crash in the first
forward, a failed exactness self-check) the micro-batch is run again with the next engine. The rerun
must be the step the new engine would have taken from the start: the same dropout masks (RNG
states restored) and the same ``.grad`` (whatever the failed attempt wrote is undone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class MicroBatchSnapshot:
    """RNG states of every device in use, and the ``.grad`` of the trained parameters (cloned)."""

    cpu_rng: Tensor
    cuda_rng: list[Tensor] | None
    params: Sequence[nn.Parameter]
    grads: list[Tensor | None]

    @classmethod
    def take(cls, params: Sequence[nn.Parameter], grads: bool) -> MicroBatchSnapshot:
        """Snapshot the RNG states, and the gradients too when ``grads`` (an attempt may write them)."""
        cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda_rng = torch.cuda.get_rng_state_all() if cuda_in_use else None
        saved = [None if p.grad is None else p.grad.detach().clone() for p in params] if grads else []
        return cls(torch.get_rng_state(), cuda_rng, params, saved)

    def restore(self) -> None:
        """Back to the snapshot: RNG states, and the gradients when they were saved."""
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.grads:
            for param, grad in zip(self.params, self.grads):
                param.grad = None if grad is None else grad.clone()
