"""Cheap cross-rank consistency check of the parameters (debug option and tests)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ._collectives import all_gather_flat, rank, world_size


def parameter_checksum(params: Iterable[Tensor]) -> Tensor:
    """A float64 vector of two checksums per parameter: the plain sum and a position-weighted sum."""
    sums = []
    for param in params:
        flat = param.detach().reshape(-1).double()
        positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        sums.append(torch.stack([flat.sum(), (flat * positions.reciprocal()).sum()]))
    return torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)


def check_rank_consistency(params: Iterable[Tensor], step: int | None = None) -> None:
    """Raise ``RuntimeError`` on every rank when the parameters differ across ranks."""
    if world_size() == 1:
        return
    local = parameter_checksum(params)
    gathered = all_gather_flat(local, [local.numel()] * world_size())
    for other, checksum in enumerate(gathered):
        if not torch.equal(checksum, gathered[0]):
            where = f" after step {step}" if step is not None else ""
            raise RuntimeError(
                f"Parameters diverged across ranks{where}: rank {other} differs from rank 0 "
                f"(seen from rank {rank()}). The JD update must be synchronised on every rank."
            )
