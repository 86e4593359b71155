"""A seeded CPU random generator whose state is checkpointed with the module that owns it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._validation import check_seed


class SeededGenerator:
    """Mixin for an ``nn.Module`` that draws random numbers (``Random``, ``GradDrop``).

    The generator state is the module's ``extra_state``, so :meth:`state_dict` / :meth:`load_state_dict`
    save and restore it (as a uint8 tensor: loadable with ``torch.load(weights_only=True)``), and a
    resumed run draws the same numbers as an uninterrupted one.
    """

    seed: int | None
    _generator: torch.Generator

    def _init_generator(self, owner: str, seed: int | None) -> None:
        self.seed = check_seed(owner, seed)
        self._generator = torch.Generator(device="cpu")
        self.reset()

    def reset(self) -> None:
        """Re-seed the generator with ``seed`` (a fresh non-deterministic seed when ``None``)."""
        if self.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(self.seed)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator_state": self._generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        if not (isinstance(state, dict) and isinstance(state.get("generator_state"), Tensor)):
            raise ValueError(
                f"Invalid state for {type(self).__name__}: expected a dict with a 'generator_state' tensor, as "
                f"produced by its state_dict(), got {type(state).__name__}."
            )
        self._generator.set_state(state["generator_state"].detach().to(device="cpu", dtype=torch.uint8))
