"""Shared matrices and builders for the aggregation tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from _aggregation_matrices import edge_matrices
from torch import Tensor

from hf_jd.aggregation import Aggregator, get_aggregator

EDGE_MATRICES = edge_matrices()


@pytest.fixture(params=list(EDGE_MATRICES), ids=list(EDGE_MATRICES))
def edge_matrix(request: pytest.FixtureRequest) -> Tensor:
    """Random, zero, low-rank, badly scaled, single-row and duplicated-row matrices."""
    return EDGE_MATRICES[request.param].clone()


@pytest.fixture
def build_aggregator() -> Callable[[str, int], Aggregator]:
    """Build the registered aggregator ``name`` for ``m`` objectives with its default settings.

    ``constant`` needs weights (``1, 2, ..., m``), ``random`` and ``graddrop`` get a fixed seed,
    ``trimmed_mean`` trims at most one row at each end (it needs ``m > 2 * trim_number``) and ``krum``
    tolerates one Byzantine row when ``m > 3`` (Krum's guarantee needs ``m > 2f + 2``).
    """

    def build(name: str, m: int) -> Aggregator:
        if name == "constant":
            return get_aggregator(name, weights=[float(i + 1) for i in range(m)])
        if name in ("random", "graddrop"):
            return get_aggregator(name, seed=0)
        if name == "krum":
            return get_aggregator(name, n_byzantine=1 if m > 3 else 0)
        if name == "trimmed_mean":
            return get_aggregator(name, trim_number=max(0, min(1, (m - 1) // 2)))
        return get_aggregator(name)

    return build
