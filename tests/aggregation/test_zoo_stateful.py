"""Stateful added aggregators (GradVac, Nash-MTL, GradDrop): exact resumption from a state dict saved
with ``torch.save`` and loaded with ``torch.load(weights_only=True)``, ``reset()``, deep copies."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _aggregation_matrices import randn

from hf_jd.aggregation import GradDrop, GradVac, NashMTL

MATRICES = [randn(200 + i, 4, 6) for i in range(8)]

BUILDERS = {
    "GradVac": lambda: GradVac(beta=0.3),
    "NashMTL": lambda: NashMTL(update_weights_every=3),
    "GradDrop": lambda: GradDrop(seed=7),
}


def _outputs(aggregator, matrices):
    return [aggregator(matrix) for matrix in matrices]


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_round_trip_reproduces_the_next_outputs_exactly(name):
    reference = BUILDERS[name]()
    _outputs(reference, MATRICES[:4])  # advance the state
    state = _round_trip(reference.state_dict())
    expected = _outputs(reference, MATRICES[4:])

    resumed = BUILDERS[name]()
    _outputs(resumed, MATRICES[6:])  # a different history, overwritten by the load
    resumed.load_state_dict(state)
    for got, want in zip(_outputs(resumed, MATRICES[4:]), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_holds_only_tensors_and_plain_values(name):
    aggregator = BUILDERS[name]()
    _outputs(aggregator, MATRICES[:2])
    (state,) = aggregator.state_dict().values()

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return value is None or isinstance(value, (torch.Tensor, int, float, bool, str))

    assert plain(state)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_reset_behaves_like_a_fresh_instance(name):
    aggregator = BUILDERS[name]()
    _outputs(aggregator, MATRICES[:3])
    aggregator.reset()
    for got, want in zip(_outputs(aggregator, MATRICES[3:]), _outputs(BUILDERS[name](), MATRICES[3:])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_changes_the_outputs(name):
    """The state matters: the same matrix twice does not give the same result (NashMTL: reused
    weights on a different matrix)."""
    aggregator = BUILDERS[name]()
    first = aggregator(MATRICES[0])
    second = aggregator(MATRICES[1] if name == "NashMTL" else MATRICES[0])
    recomputed = BUILDERS[name]()(MATRICES[1]) if name == "NashMTL" else first
    assert not torch.equal(second, recomputed)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_deepcopy_continues_independently(name):
    original = BUILDERS[name]()
    _outputs(original, MATRICES[:2])
    clone = copy.deepcopy(original)
    for got, want in zip(_outputs(clone, MATRICES[2:5]), _outputs(original, MATRICES[2:5])):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("name", "bad_state", "match"),
    [
        ("GradVac", {"targets": "x"}, "Invalid state for GradVacWeighting"),
        ("NashMTL", {"alpha": None}, "Invalid state for NashMTLWeighting"),
        ("GradDrop", {"seed": 0}, "Invalid state for GradDrop"),
    ],
)
def test_invalid_state_is_rejected(name, bad_state, match):
    aggregator = BUILDERS[name]()
    (key,) = aggregator.state_dict()
    with pytest.raises(ValueError, match=match):
        aggregator.load_state_dict({key: bad_state})


def test_nash_mtl_counter_is_saved():
    aggregator = NashMTL(update_weights_every=3)
    _outputs(aggregator, MATRICES[:2])
    (state,) = aggregator.state_dict().values()
    assert state["step"] == 2 and state["alpha"].shape == (4,)
