"""Memory of the subproblems: reusable flat buffers, the kept Cholesky factors, groups by size."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

MAX_CHUNK_ELEMENTS = 1 << 25  # entries of one batch of gathered systems (256 MB in float64)


class Workspace:
    """Pools of flat buffers (by dtype) for the gathered systems and their indices.

    The systems are the largest tensors of the solver; reusing their memory (within a call, and
    across calls through the caller's state on CPU) avoids paying for fresh pages each time.
    """

    def __init__(self, pool: list[Tensor] | None, device: torch.device) -> None:
        self.free = [b for b in (pool or []) if isinstance(b, Tensor) and b.device == device]
        self.device = device

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        fitting = [i for i, b in enumerate(self.free) if b.dtype == dtype and b.numel() >= numel]
        if fitting:
            return self.free.pop(min(fitting, key=lambda i: self.free[i].numel()))
        return torch.empty(numel, dtype=dtype, device=self.device)

    def give(self, buffer: Tensor) -> None:
        self.free.append(buffer)

    def trimmed(self, max_float64_entries: int) -> list[Tensor]:
        """The largest free buffers whose total size stays within that many float64 entries."""
        kept, total = [], 0
        for buffer in sorted(self.free, key=lambda b: b.numel() * b.element_size(), reverse=True):
            size = buffer.numel() * buffer.element_size() // 8
            if total + size <= max_float64_entries:
                kept.append(buffer)
                total += size
        return kept


class Chunk:
    """Cholesky factors of the gathered systems of a group of rows, stored in a workspace buffer."""

    def __init__(self, idx: Tensor, buffer: Tensor, factor: Tensor, route: Tensor) -> None:
        self.idx = idx  # [n, s] global indices of each system, padded with the sink index m
        self.buffer = buffer  # flat storage of ``factor``
        self.factor = factor  # [n, s, s] upper triangular R (M = R^T R), column-major
        self.route = route  # [n] 0: primal (matrix G), 1: dual (matrix H)


def size_groups(order: Tensor, sorted_sizes: list[int]) -> Iterator[tuple[Tensor, int]]:
    """Split rows (sorted by decreasing system size) into groups of similar size and bounded memory.

    Largest first, so that the buffers of a group can be reused by the next ones.
    """
    n = len(sorted_sizes)
    start = 0
    while start < n:
        size = sorted_sizes[start]
        low = min(int(size / 1.5), size - 8)
        end = start + 1
        while end < n and sorted_sizes[end] >= low:
            end += 1
        per_chunk = max(1, MAX_CHUNK_ELEMENTS // max(size * size, 1))
        for lo in range(start, end, per_chunk):
            yield order[lo : min(lo + per_chunk, end)], sorted_sizes[lo]
        start = end
