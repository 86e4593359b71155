"""Every stateful aggregator (the specs that declare a state): exact resumption from a state dict saved
with ``torch.save`` and loaded with ``torch.load(weights_only=True)``, ``reset()``, deep copies."""

from __future__ import annotations

import copy
import io
from functools import partial

import pytest
import torch
from _aggregation_matrices import randn

from hf_jd.aggregation import CRMOGM, NashMTL, Stateful, aggregator_specs

MATRICES = [randn(200 + i, 4, 6) for i in range(8)]

# Arguments that make the state visible within a few calls (e.g. SDMGrad's default 20 inner steps
# converge from any warm start); the others are built with their spec's example arguments.
TUNED = {
    "gradvac": {"beta": 0.3},
    "nash_mtl": {"update_weights_every": 3},
    "graddrop": {"seed": 7},
    "gradnorm": {"lr": 0.1},
    "excess_mtl": {"robust_step_size": 0.5},
    "modo": {"gamma": 0.05},
    "sdmgrad": {"niter": 3},
    "cr_mogm": {"alpha": 0.5},
    "imtl": {"lr": 0.1},
    "pcd": {"tau": 0.3, "beta": 0.5},
}
# Every stateful aggregator (its spec), and CR-MOGM around a stateful weighting.
BUILDERS = {
    spec.name: partial(spec.build, 4, **TUNED.get(spec.name, {}))
    for spec in aggregator_specs()
    if spec.stateful
}
BUILDERS["cr_mogm_gradvac"] = lambda: CRMOGM(weighting="gradvac", weighting_kwargs={"beta": 0.3})
# Methods whose state evolves from the loss values too: fed the same losses in every run.
LOSSES = [torch.linspace(0.5, 2.0, 4, dtype=torch.float64) * (1 + 0.1 * i) for i in range(8)]


def _outputs(aggregator, matrices):
    outputs = []
    for matrix in matrices:
        if hasattr(aggregator, "set_losses"):
            aggregator.set_losses(LOSSES[[m.data_ptr() for m in MATRICES].index(matrix.data_ptr())])
        outputs.append(aggregator(matrix))
    return outputs


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
    assert isinstance(aggregator, Stateful)
    (state, *others) = aggregator.state_dict().values()

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return value is None or isinstance(value, (torch.Tensor, int, float, bool, str))

    assert plain(state) and all(plain(other) for other in others)


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
    (first,) = _outputs(aggregator, MATRICES[:1])  # IMTL's state moves with the losses only
    if name in ("gradvac", "graddrop", "random"):
        assert not torch.equal(aggregator(MATRICES[0]), first)
    else:  # the second call differs from a fresh instance's first call on the same matrix
        assert not torch.equal(aggregator(MATRICES[1]), BUILDERS[name]()(MATRICES[1]))


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
        ("gradvac", {"targets": "x"}, "Invalid state for GradVacWeighting"),
        ("nash_mtl", {"alpha": None}, "Invalid state for NashMTLWeighting"),
        ("graddrop", {"seed": 0}, "Invalid state for GradDrop"),
        ("db_mtl", {"step": True, "buffer": None}, "Invalid state for DBMTL.*'step' \\(int\\)"),
        ("gradnorm", {"logits": None}, "Invalid state for GradNormWeighting.*'initial_losses'"),
        ("excess_mtl", [1, 2], "Invalid state for ExcessMTL.*got list"),
        ("moco", {"step": 1, "y": None, "lambd": "x"}, "Invalid state for MoCo"),
        ("modo", {"lambd": 3}, "Invalid state for MoDoWeighting"),
        ("sdmgrad", {}, "Invalid state for SDMGradWeighting"),
        ("cr_mogm", {"lambd": [0.5]}, "Invalid state for CRMOGMWeighting"),
        ("imtl", {"scales": None}, "Invalid state for IMTLWeighting"),
    ],
)
def test_invalid_state_is_rejected(name, bad_state, match):
    aggregator = BUILDERS[name]()
    (key, *_) = aggregator.state_dict()
    with pytest.raises(ValueError, match=match):
        aggregator.load_state_dict({key: bad_state})


def test_nash_mtl_counter_is_saved():
    aggregator = NashMTL(update_weights_every=3)
    _outputs(aggregator, MATRICES[:2])
    (state,) = aggregator.state_dict().values()
    assert state["step"] == 2 and state["alpha"].shape == (4,)
