"""Random weighting: positivity, reproducibility from a seed, and exact resumption from a state dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.testing import assert_close

from hf_jd.aggregation import Random, RandomWeighting

MATRIX = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))


def _draws(aggregator: Random, count: int = 4) -> list[torch.Tensor]:
    return [aggregator.weights(MATRIX) for _ in range(count)]


def test_weights_are_positive_and_sum_to_one():
    for dtype in (torch.float32, torch.float64):
        weights = Random(seed=0).weights(MATRIX.to(dtype))
        assert weights.dtype == dtype and weights.shape == (5,)
        assert (weights > 0).all()
        assert_close(weights.sum(), torch.tensor(1.0, dtype=dtype))


def test_weights_are_softmax_of_standard_normal_from_the_seed():
    generator = torch.Generator().manual_seed(7)
    expected = torch.softmax(torch.randn(5, generator=generator, dtype=torch.float64), dim=0)
    assert_close(Random(seed=7).weights(MATRIX.double()), expected)


def test_same_seed_same_sequence_and_new_weights_at_each_call():
    first, second = _draws(Random(seed=123)), _draws(Random(seed=123))
    for a, b in zip(first, second):
        assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(Random(seed=124).weights(MATRIX), first[0])


def test_unseeded_instances_differ():
    assert not torch.equal(Random().weights(MATRIX), Random().weights(MATRIX))


def test_global_random_state_is_untouched():
    state = torch.get_rng_state()
    Random(seed=1)(MATRIX)
    Random()(MATRIX)
    assert torch.equal(torch.get_rng_state(), state)


def test_weights_do_not_depend_on_the_gramian_dtype():
    assert_close(Random(seed=3).weights(MATRIX.float()), Random(seed=3).weights(MATRIX.double()).float())


@pytest.mark.parametrize("target_seed", [None, 99])
def test_state_dict_round_trip_continues_the_same_sequence(target_seed):
    reference = Random(seed=5)
    _draws(reference, 3)  # advance the generator
    state = reference.state_dict()
    assert list(state) == ["gramian_weighting._extra_state"]
    expected = _draws(reference)

    resumed = Random(seed=target_seed)
    resumed.load_state_dict(state)
    for a, b in zip(_draws(resumed), expected):
        assert_close(a, b, rtol=0, atol=0)


def test_state_survives_torch_save_and_weights_only_load():
    reference = Random(seed=11)
    _draws(reference, 2)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    buffer.seek(0)
    resumed = Random(seed=0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(_draws(resumed), _draws(reference)):
        assert_close(a, b, rtol=0, atol=0)


def test_state_dict_is_a_snapshot():
    aggregator = Random(seed=2)
    state = aggregator.state_dict()
    expected = _draws(aggregator)
    aggregator.load_state_dict(state)  # rewind
    for a, b in zip(_draws(aggregator), expected):
        assert_close(a, b, rtol=0, atol=0)


def test_deepcopy_continues_the_sequence_independently():
    original = Random(seed=4)
    _draws(original, 1)
    clone = copy.deepcopy(original)
    for a, b in zip(_draws(clone), _draws(original)):
        assert_close(a, b, rtol=0, atol=0)


def test_invalid_state_and_seed_are_rejected():
    with pytest.raises(ValueError, match="Invalid state for RandomWeighting"):
        RandomWeighting(seed=0).set_extra_state({"seed": 0})
    for bad in (1.5, "1", True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            Random(seed=bad)
