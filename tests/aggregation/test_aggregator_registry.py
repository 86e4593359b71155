"""The name registry behind ``--aggregator`` and the errors users see for bad arguments or inputs."""

from __future__ import annotations

import json

import pytest
import torch

from hf_jd.aggregation import (
    IMTLG,
    MGDA,
    Aggregator,
    DualProj,
    GramianWeightedAggregator,
    PCGrad,
    Stateful,
    UPGrad,
    WeightedAggregator,
    _registry,
    aggregator_class,
    aggregator_names,
    aggregator_specs,
    get_aggregator,
    needs_jacobian,
    register_aggregator,
)

# Every built-in aggregator's spec (declared next to its class), by name.
SPECS = {spec.name: spec for spec in aggregator_specs()}
# The Gramian-weighted methods, and those that need the explicit Jacobian (the Gramian engine cannot serve them).
GRAMIAN_NAMES = [name for name, spec in SPECS.items() if not spec.needs_jacobian]
JACOBIAN_NAMES = [name for name, spec in SPECS.items() if spec.needs_jacobian]
# Methods that keep a state across calls (saved by state_dict, cleared by reset).
STATEFUL_NAMES = [name for name, spec in SPECS.items() if spec.stateful]


def test_the_specs_cover_every_built_in_name():
    assert set(SPECS) == set(aggregator_names())
    assert {"upgrad", "trimmed_mean", "random", "imtl"} <= set(SPECS)


@pytest.mark.parametrize("name", GRAMIAN_NAMES)
def test_gramian_names_resolve_to_gramian_weighted_aggregators(name):
    cls = aggregator_class(name)
    assert cls is SPECS[name].cls
    assert issubclass(cls, GramianWeightedAggregator)


@pytest.mark.parametrize("name", JACOBIAN_NAMES)
def test_jacobian_names_resolve_to_plain_aggregators(name):
    cls = aggregator_class(name)
    assert cls is SPECS[name].cls
    assert not issubclass(cls, GramianWeightedAggregator)


@pytest.mark.parametrize("name", list(SPECS))
def test_every_name_builds_with_its_spec_and_reports_needs_jacobian(name):
    aggregator = get_aggregator(name, **SPECS[name].example_kwargs(3))
    assert needs_jacobian(aggregator) == (name in JACOBIAN_NAMES)


@pytest.mark.parametrize("name", STATEFUL_NAMES)
def test_stateful_aggregators_expose_reset_and_state(name):
    aggregator = get_aggregator(name, **SPECS[name].example_kwargs(3))
    assert callable(aggregator.reset)
    assert len(aggregator.state_dict()) == 1
    assert isinstance(aggregator, Stateful)


@pytest.mark.parametrize("name", ["upgrad", "mgda", "trimmed_mean", "cagrad"])
def test_stateless_aggregators_are_not_stateful(name):
    aggregator = get_aggregator(name)
    assert not isinstance(aggregator, Stateful) and not aggregator.state_dict()


def test_weighted_aggregator_is_the_base_of_gramian_weighted_ones():
    """TorchJD's names: every Gramian-weighted aggregator is a WeightedAggregator; ExcessMTL is weighted
    (its update is J^T w) but its weights read J itself, so it needs the Jacobian."""
    assert issubclass(GramianWeightedAggregator, WeightedAggregator)
    excess = get_aggregator("excess_mtl")
    assert isinstance(excess, WeightedAggregator) and needs_jacobian(excess)
    matrix = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(excess.weights(matrix) @ matrix, get_aggregator("excess_mtl")(matrix))


@pytest.mark.parametrize(
    ("name", "cls_name"),
    [("Nash-MTL", "NashMTL"), ("aligned-mtl", "AlignedMTL"), ("ConFIG", "ConFIG"), ("CAGrad", "CAGrad")],
)
def test_zoo_spellings(name, cls_name):
    assert type(get_aggregator(name)).__name__ == cls_name


@pytest.mark.parametrize("name", ["UPGrad", "upgrad", " UPGRAD ", "UpGrad"])
def test_names_are_case_insensitive(name):
    assert isinstance(get_aggregator(name), UPGrad)


@pytest.mark.parametrize(
    ("name", "cls"), [("IMTL-G", IMTLG), ("imtl_g", IMTLG), ("MGDA", MGDA), ("PCGrad", PCGrad)]
)
def test_other_spellings(name, cls):
    assert isinstance(get_aggregator(name), cls)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown aggregator 'upgrade'") as info:
        get_aggregator("upgrade")
    for name in aggregator_names():
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "signature_part"),
    [
        ("upgrad", {"pref": [1, 2]}, "pref_vector"),
        ("mean", {"pref_vector": [1, 2]}, "Mean accepts ()"),
        ("mgda", {"eps": 0.1}, "epsilon"),
        ("constant", {}, "weights"),
        ("random", {"seed": 1, "other": 2}, "seed"),
    ],
)
def test_bad_kwargs_name_the_accepted_signature(name, kwargs, signature_part):
    with pytest.raises(ValueError, match="Invalid aggregator_kwargs") as info:
        get_aggregator(name, **kwargs)
    assert signature_part in str(info.value)


def test_kwargs_from_json_command_line():
    kwargs = json.loads('{"pref_vector": [1, 2], "reg_eps": 1e-5, "solver": "quadprog"}')
    for name in ("upgrad", "dualproj"):
        aggregator = get_aggregator(name, **kwargs)
        assert aggregator.gramian_weighting.pref_vector.tolist() == [1.0, 2.0]
        assert aggregator.gramian_weighting.reg_eps == 1e-5
    assert (
        repr(get_aggregator("constant", **json.loads('{"weights": [0.5, 2]}')))
        == "Constant(weights=[0.5, 2.0])"
    )
    assert repr(get_aggregator("mgda", **json.loads('{"epsilon": 0.01, "max_iters": 7}'))) == (
        "MGDA(epsilon=0.01, max_iters=7)"
    )


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_preference_vector_of_wrong_length_is_a_clear_error(cls):
    aggregator = cls(pref_vector=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="preference vector has 3 entries but there are 2 objectives"):
        aggregator(torch.randn(2, 4))


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [], [1.0, float("inf")]])
def test_invalid_preference_vector_is_rejected_at_construction(cls, bad):
    with pytest.raises(ValueError, match="pref_vector"):
        cls(pref_vector=bad)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_unknown_solver_is_rejected_at_construction(cls):
    with pytest.raises(ValueError, match="Unknown dual-cone solver 'cvxpy'"):
        cls(solver="cvxpy")


@pytest.mark.parametrize("cls", [UPGrad, DualProj, MGDA, PCGrad, IMTLG])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_gramian_is_a_clear_error(cls, bad_value):
    gramian = torch.eye(3)
    gramian[0, 1] = gramian[1, 0] = bad_value
    with pytest.raises(ValueError, match="contains NaN or inf"):
        cls().gramian_weighting(gramian)
    matrix = torch.randn(3, 4)
    matrix[2, 0] = bad_value
    with pytest.raises(ValueError, match="contains NaN or inf"):
        cls()(matrix)


def test_register_custom_aggregator(monkeypatch):
    monkeypatch.setattr(_registry._REGISTRY, "_entries", dict(_registry._REGISTRY._entries))

    class FirstRow(Aggregator):
        def forward(self, matrix):
            return matrix[0]

    register_aggregator("First_Row", FirstRow)
    aggregator = get_aggregator("first_row")
    assert isinstance(aggregator, FirstRow)
    assert needs_jacobian(aggregator)
    assert "first_row" in aggregator_names()
    with pytest.raises(TypeError, match="not a subclass"):
        register_aggregator("bad", dict)


def test_gramian_weighted_aggregators_do_not_need_the_jacobian(build_aggregator):
    for name in aggregator_names():
        aggregator = build_aggregator(name, 3)
        assert needs_jacobian(aggregator) == (not isinstance(aggregator, GramianWeightedAggregator))
        assert not needs_jacobian(aggregator) or name not in GRAMIAN_NAMES


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("upgrad", {"norm_eps": "x"}, "UPGrad's norm_eps must be a finite number"),
        ("upgrad", {"reg_eps": -1}, "UPGrad's reg_eps must be >= 0"),
        ("dualproj", {"pref_vector": ["a", "b"]}, "DualProj's pref_vector must be a list of numbers"),
        ("upgrad", {"pref_vector": [1.0, -2.0]}, "UPGrad's pref_vector must be non-negative"),
        ("upgrad", {"pref_vector": [0.0, 0.0]}, "UPGrad's pref_vector is all zeros"),
        ("upgrad", {"solver": 3}, "UPGrad's solver must be a string"),
        ("mgda", {"epsilon": "0.1"}, "MGDA's epsilon must be a finite number"),
        ("mgda", {"max_iters": 2.5}, "MGDA's max_iters must be an integer"),
        ("trimmed_mean", {"trim_number": -1}, "TrimmedMean's trim_number must be >= 0"),
        ("trimmed_mean", {"trim_number": "1"}, "TrimmedMean's trim_number must be an integer"),
        ("constant", {"weights": [0, 0, 0]}, "Constant's weights are all zeros"),
    ],
)
def test_bad_aggregator_arguments_fail_at_construction_naming_the_argument(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_aggregator(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "rows"),
    [
        ("upgrad", {"pref_vector": [1, 2, 3]}, 3),
        ("dualproj", {"pref_vector": [1, 2]}, 2),
        ("config", {"pref_vector": [1, 2, 3, 4]}, 4),
        ("aligned_mtl", {"pref_vector": [1, 1]}, 2),
        ("constant", {"weights": [1, 2, 3]}, 3),
        ("upgrad", {}, None),
        ("mgda", {}, None),
    ],
)
def test_weightings_sized_to_the_objectives_say_so(name, kwargs, rows):
    """``required_rows`` lets JDTrainer refuse a batch size that cannot fit before training starts."""
    assert get_aggregator(name, **kwargs).required_rows == rows
