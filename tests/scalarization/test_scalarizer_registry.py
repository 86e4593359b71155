"""The ``--scalarizer`` registry, argument checks and loss-vector checks: every error is clear."""

from __future__ import annotations

import io
import math

import pytest
import torch

import hf_jd
from hf_jd import scalarization
from hf_jd.scalarization import (
    COSMOS,
    DWA,
    FAMO,
    PBI,
    STCH,
    Constant,
    GeometricMean,
    Mean,
    Scalarizer,
    get_scalarizer,
    register_scalarizer,
    scalarizer_class,
    scalarizer_names,
)
from hf_jd.scalarization._registry import _REGISTRY

NAMES = [
    "constant",
    "mean",
    "sum",
    "random",
    "geometric_mean",
    "dwa",
    "uncertainty_weighting",
    "imtl_l",
    "famo",
    "stch",
    "pbi",
    "cosmos",
]
# the arguments each needs to be built (the others have defaults)
KWARGS = {
    "constant": {"weights": [1.0, 2.0, 3.0]},
    "uncertainty_weighting": {"shape": 3},
    "imtl_l": {"shape": 3},
    "famo": {"shape": 3},
    "stch": {"mu": 0.1},
    "cosmos": {"lambda_": 1.0},
}
EXPECTED_CLASSES = {
    "constant": "Constant",
    "mean": "Mean",
    "sum": "Sum",
    "random": "Random",
    "geometric_mean": "GeometricMean",
    "dwa": "DWA",
    "uncertainty_weighting": "UncertaintyWeighting",
    "imtl_l": "IMTLL",
    "famo": "FAMO",
    "stch": "STCH",
    "pbi": "PBI",
    "cosmos": "COSMOS",
}


def test_the_twelve_names_in_order():
    assert scalarizer_names() == tuple(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_its_class_and_gives_a_scalar(name):
    scalarizer = get_scalarizer(name, **KWARGS.get(name, {}))
    assert type(scalarizer).__name__ == EXPECTED_CLASSES[name]
    assert scalarizer_class(name) is type(scalarizer)
    assert getattr(scalarization, EXPECTED_CLASSES[name]) is type(scalarizer)
    out = scalarizer(torch.tensor([0.5, 1.0, 2.0]))
    assert out.dim() == 0 and torch.isfinite(out)
    assert repr(scalarizer).startswith(EXPECTED_CLASSES[name])


@pytest.mark.parametrize("name", NAMES)
def test_state_dicts_hold_only_tensors_and_plain_values(name):
    scalarizer = get_scalarizer(name, **KWARGS.get(name, {}))
    scalarizer(torch.tensor([0.5, 1.0, 2.0]))
    buffer = io.BytesIO()
    torch.save(scalarizer.state_dict(), buffer)
    buffer.seek(0)
    fresh = get_scalarizer(name, **KWARGS.get(name, {}))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))


def test_names_are_case_and_dash_insensitive():
    assert scalarizer_class(" Geometric-Mean ") is GeometricMean
    assert scalarizer_class("IMTL-L").__name__ == "IMTLL"


@pytest.mark.parametrize("name", ["upgrad", "", "means"])
def test_unknown_name_lists_the_valid_names(name):
    with pytest.raises(ValueError, match="Unknown scalarizer") as error:
        get_scalarizer(name)
    assert all(valid in str(error.value) for valid in NAMES)


def test_unknown_or_missing_kwargs_show_the_signature():
    with pytest.raises(ValueError, match=r"Invalid scalarizer_kwargs for 'dwa'.*temperature"):
        get_scalarizer("dwa", temprature=2.0)
    with pytest.raises(ValueError, match=r"Invalid scalarizer_kwargs for 'stch'.*mu"):
        get_scalarizer("stch")
    with pytest.raises(ValueError, match=r"shape"):
        get_scalarizer("uncertainty_weighting")


def test_register_a_custom_scalarizer():
    class Max(Scalarizer):
        def forward(self, losses):
            return losses.max()

    register_scalarizer("My-Max", Max)
    try:
        assert get_scalarizer("my_max")(torch.tensor([1.0, 3.0])).item() == 3.0
        assert "my_max" in scalarizer_names()
    finally:
        _REGISTRY._entries.pop("my_max")
    with pytest.raises(TypeError, match="not a subclass"):
        register_scalarizer("bad", torch.nn.Identity)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DWA(temperature=0), "temperature must be > 0"),
        (lambda: DWA(temperature="2"), "temperature must be a finite number"),
        (lambda: STCH(mu=-1.0), "mu must be > 0"),
        (lambda: STCH(mu=math.inf), "mu must be a finite number"),
        (lambda: PBI(theta=-0.1), "theta must be >= 0"),
        (lambda: COSMOS(lambda_=-1.0), "lambda_ must be >= 0"),
        (lambda: FAMO(3, w_lr=0.0), "w_lr must be > 0"),
        (lambda: FAMO(3, gamma=-1.0), "gamma must be >= 0"),
        (lambda: FAMO(3, min_losses=[0.0, 0.0]), "min_losses has 2 entries"),
        (lambda: Constant([0.0, 0.0]), "all zeros"),
        (lambda: Constant([1.0, math.nan]), "finite"),
        (lambda: Constant("12"), "list of numbers"),
        (lambda: Constant([[1.0, 2.0]]), "1-D"),
        (lambda: STCH(0.1, weights=[1.0, -1.0]), "non-negative"),
        (lambda: PBI(weights=[0.0, 0.0]), "all zeros"),
        (lambda: STCH(0.1, weights=[1.0, 1.0], reference=[0.0]), "differ in length"),
        (lambda: get_scalarizer("random", seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_arguments_fail_at_construction_and_name_the_argument(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("losses", "error", "match"),
    [
        (torch.tensor([1.0, math.nan, 2.0]), ValueError, r"non-finite losses at positions \[1\]"),
        (torch.tensor([1.0, 2.0, math.inf]), ValueError, r"non-finite losses at positions \[2\]"),
        (torch.ones(1, 3), ValueError, "1-D tensor of losses"),
        (torch.tensor(1.0), ValueError, "1-D tensor of losses"),
        (torch.ones(0), ValueError, "non-empty"),
        (torch.tensor([1, 2, 3]), TypeError, "floating-point"),
        ([1.0, 2.0, 3.0], TypeError, "torch.Tensor"),
    ],
)
def test_bad_losses_are_refused_by_every_scalarizer(name, losses, error, match):
    with pytest.raises(error, match=match):
        get_scalarizer(name, **KWARGS.get(name, {}))(losses)


@pytest.mark.parametrize("name", ["constant", "stch", "pbi", "cosmos"])
def test_preference_length_must_match_the_losses(name):
    kwargs = {**KWARGS.get(name, {}), "weights": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match="for 3 objectives but got 2 losses"):
        get_scalarizer(name, **kwargs)(torch.tensor([1.0, 2.0]))


def test_domain_errors():
    with pytest.raises(ValueError, match="strictly positive losses"):
        GeometricMean()(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="all-zero losses"):
        COSMOS(1.0)(torch.zeros(2))


def test_hooks_are_flagged_for_the_trainer():
    flagged = {name for name in NAMES if scalarizer_class(name).needs_epoch_step}
    assert flagged == {"dwa"}
    flagged = {name for name in NAMES if scalarizer_class(name).needs_post_step_update}
    assert flagged == {"famo"}


def test_public_api():
    assert set(scalarization.__all__) >= {EXPECTED_CLASSES[n] for n in NAMES} | {"Scalarizer", "UW"}
    assert hf_jd.scalarization is scalarization
    assert Mean()(torch.tensor([1.0, 2.0, 3.0])).item() == 2.0
