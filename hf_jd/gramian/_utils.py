"""Small numerical helpers shared by the per-module rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LinearStrategy = Literal["auto", "ghost", "materialize"]


@dataclass
class Context:
    """What every rule needs to know about the current step.

    Attributes:
        rows: ``m``, the number of rows: examples, or tasks. When the losses are objectives over groups of
            batch rows (``row_objective``), the rows are the batch rows, not the objectives.
        per_task: whether the rows are tasks (each reads the whole batch) or examples.
        dtype: the accumulation dtype (float32, or float64 when the parameters are float64).
        budget: the largest number of elements a rule may materialise at once for per-row gradients.
        linear_strategy: ``"auto"`` (flop estimate), ``"ghost"`` or ``"materialize"``.
        spare: elements that rules may keep beyond the ``a``, ``b`` they free, to save work in the
            weighted gradient (0 by default: a rule keeps per-row gradients only when that is
            memory-neutral); decreases as rules use it.
    """

    rows: int
    per_task: bool
    dtype: torch.dtype
    budget: int
    linear_strategy: LinearStrategy = "auto"
    spare: int = 0

    def reserve(self, size: int, freed: int) -> bool:
        """Whether a rule may keep ``size`` elements in place of ``freed``; books the difference."""
        extra = max(0, size - freed)
        if size > self.budget or extra > self.spare:
            return False
        self.spare -= extra
        return True


def to_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def row_chunks(n_rows: int, row_elems: int, m: int, budget: int) -> Iterator[tuple[int, int]]:
    """Split ``range(n_rows)`` so that ``m * rows * row_elems`` stays within ``budget`` elements."""
    step = max(1, budget // max(1, m * row_elems))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def full_shape(param: Tensor) -> torch.Size:
    """The parameter's full shape: under DeepSpeed ZeRO-3 the tensor holds an empty partition outside its module's
    forward and backward, and the full shape is its ``ds_shape``."""
    shape = getattr(param, "ds_shape", None)
    return torch.Size(shape) if shape is not None else param.shape


def full_numel(param: Tensor) -> int:
    """The number of elements of :func:`full_shape`."""
    return full_shape(param).numel()
