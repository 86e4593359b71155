"""The same number of micro-batches on every rank when the batches are uneven (``even_batches=False``).

Every JD step is a collective (the global Gramian, the gradient all-reduce), so a rank that runs one
more micro-batch than the others would wait for them forever. With ``even_batches=False`` Accelerate
gives the ranks *sizes* that may differ (the global Gramian takes each rank's row count) and, when the
number of batches is not a multiple of the number of processes, *counts* that differ by one: the ranks
with one batch more skip that last batch of the epoch (read, so that Accelerate's end-of-epoch
bookkeeping still happens, but not trained on), with one warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..distributed import all_gather_flat, rank, world_size

logger = logging.getLogger(__name__)


class EqualLengthLoader:
    """A prepared train dataloader that yields its first ``length`` batches (every other attribute is the
    wrapped loader's)."""

    def __init__(self, loader: Any, length: int) -> None:
        self.loader = loader
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        for index in range(self.length):
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if index == self.length - 1:
                for _ in iterator:  # drain: the loader sees the end of its epoch
                    pass
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def equal_length_loader(loader: Any, device: torch.device) -> Any:
    """``loader`` itself when every rank has as many batches, else :class:`EqualLengthLoader` (the minimum)."""
    if world_size() == 1:
        return loader
    try:
        length = len(loader)
    except TypeError:  # an iterable dataset: its length is not known in advance
        return loader
    local = torch.tensor([float(length)], device=device)
    lengths = [int(value.item()) for value in all_gather_flat(local, [1] * world_size())]
    if len(set(lengths)) == 1:
        return loader
    shortest = min(lengths)
    message = (
        f"hf_jd: the ranks have {lengths} training batches per epoch (even_batches=False with a dataset whose "
        f"batches do not divide evenly across processes). Every JD step needs every rank, so each rank takes "
        f"{shortest}; the last batch of ranks {[r for r, n in enumerate(lengths) if n > shortest]} is skipped."
    )
    if rank() == 0:
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return EqualLengthLoader(loader, shortest) if length > shortest else loader
