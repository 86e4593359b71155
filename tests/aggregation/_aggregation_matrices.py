"""Matrices shared by the aggregation tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import torch
from torch import Tensor


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Standard normal matrix of the given shape, reproducible from ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def edge_matrices() -> dict[str, Tensor]:
    """Random, zero, low-rank, badly scaled, single-row, duplicated and opposed-row matrices."""
    base = randn(0, 3, 5)
    scales = torch.logspace(-10, 10, 5, dtype=torch.float64)[:, None]
    return {
        "random_5x7": randn(1, 5, 7),
        "random_5x7_float32": randn(1, 5, 7, dtype=torch.float32),
        "tall_8x3": randn(2, 8, 3),  # m > n: rank-deficient Gramian
        "zero_4x5": torch.zeros(4, 5, dtype=torch.float64),
        "rank1_4x6": randn(3, 4, 1) @ randn(4, 1, 6),
        "rank2_6x8": randn(5, 6, 2) @ randn(6, 2, 8),
        "scaled_rows_1e-10_to_1e10": randn(7, 5, 6) * scales,
        "scaled_rows_1e-10_to_1e10_float32": (randn(7, 5, 6) * scales).float(),
        "single_row_1x5": randn(8, 1, 5),
        "single_zero_row_1x4": torch.zeros(1, 4, dtype=torch.float64),
        "duplicated_rows_6x5": torch.cat([base, base]),
        "opposite_rows_2x4": torch.cat([base[:1], -base[:1]]),
        "zero_and_nonzero_rows_3x4": torch.cat([torch.zeros(1, 4, dtype=torch.float64), randn(9, 2, 4)]),
    }


def ill_conditioned(
    seed: int, m: int, n: int, condition: float, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Full-row-rank ``[m, n]`` matrix whose Gramian has eigenvalues ``geomspace(1, 1 / condition, m)``."""
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=generator, dtype=torch.float64))
    singular = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), m, dtype=torch.float64).sqrt()
    return ((U * singular) @ V.T).to(dtype)
