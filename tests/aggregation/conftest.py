"""Shared matrices and builders for the aggregation tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from _aggregation_matrices import edge_matrices
from torch import Tensor

from hf_jd.aggregation import Aggregator, aggregator_specs, get_aggregator

EDGE_MATRICES = edge_matrices()
# Every built-in aggregator's spec, by name (declared next to its class).
SPECS = {spec.name: spec for spec in aggregator_specs()}


@pytest.fixture(params=list(EDGE_MATRICES), ids=list(EDGE_MATRICES))
def edge_matrix(request: pytest.FixtureRequest) -> Tensor:
    """Random, zero, low-rank, badly scaled, single-row and duplicated-row matrices."""
    return EDGE_MATRICES[request.param].clone()


@pytest.fixture
def build_aggregator() -> Callable[[str, int], Aggregator]:
    """Build the registered aggregator ``name`` for ``m`` objectives with the arguments of its spec.

    ``example_kwargs`` of the spec (``hf_jd/aggregation/_<method>.py``): e.g. ``constant`` gets the
    weights ``1, 2, ..., m``, ``random`` and ``graddrop`` a fixed seed, ``trimmed_mean`` trims at most
    one row at each end and ``krum`` tolerates one Byzantine row when ``m > 3``; the defaults otherwise.
    """

    def build(name: str, m: int) -> Aggregator:
        return get_aggregator(name, **SPECS[name].example_kwargs(m))

    return build
