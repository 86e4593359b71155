"""The aggregator specs and the Stateful / LossAware bases: every name has a spec that fits its class,
and every stateful aggregator resumes exactly from a saved state and forgets it on ``reset()``."""

from __future__ import annotations

import importlib
import io
import re
import warnings

import pytest
import torch
from _aggregation_matrices import randn
from torch import Tensor, nn

from hf_jd.aggregation import (
    Aggregator,
    AggregatorSpec,
    GramianWeightedAggregator,
    LossAware,
    Paper,
    Stateful,
    Weighting,
    aggregator_class,
    aggregator_names,
    aggregator_spec,
    aggregator_specs,
    needs_jacobian,
)
from hf_jd.aggregation._stateful import counter, cpu_tensor, jacobian_tensor

SPECS = {spec.name: spec for spec in aggregator_specs()}
STATEFUL = [name for name, spec in SPECS.items() if spec.stateful]
M = 4
MATRICES = [randn(500 + i, M, 6) for i in range(7)]
LOSSES = [torch.linspace(0.5, 2.0, M, dtype=torch.float64) * (1 + 0.1 * i) for i in range(7)]


def test_every_registered_name_has_its_spec_and_only_those():
    assert list(SPECS) == list(aggregator_names())  # the registry is generated from the specs
    for name, spec in SPECS.items():
        assert spec.name == name and aggregator_class(name) is spec.cls


def test_the_default_is_listed_first_then_the_names_in_order():
    names = [spec.name for spec in aggregator_specs()]
    assert names[0] == "upgrad" and names[1:] == sorted(names[1:])


@pytest.mark.parametrize("name", list(SPECS))
def test_the_class_of_every_spec_imports_from_its_path(name):
    spec = SPECS[name]
    module, qualname = spec.path.split(":")
    assert getattr(importlib.import_module(module), qualname) is spec.cls
    assert module.startswith("hf_jd.aggregation._")
    assert spec.cls.spec is spec  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(SPECS))
def test_the_spec_fits_the_class_and_an_instance(name):
    spec = SPECS[name]
    aggregator = spec.build(M)
    assert isinstance(aggregator, Aggregator)
    assert (
        spec.needs_jacobian
        == (not isinstance(aggregator, GramianWeightedAggregator))
        == needs_jacobian(aggregator)
    )
    assert spec.stateful == isinstance(aggregator, Stateful) == bool(aggregator.state_dict())
    assert spec.loss_aware == isinstance(aggregator, LossAware)
    assert spec.summary and "|" not in spec.summary  # one README table cell


@pytest.mark.parametrize("name", list(SPECS))
def test_the_papers_are_well_formed(name):
    for paper in SPECS[name].papers:
        assert paper.authors and paper.title and 1950 < paper.year < 2100
        assert paper.arxiv == "" or re.fullmatch(r"\d{4}\.\d{4,5}", paper.arxiv)
        assert paper.short().startswith(f"{paper.authors} {paper.year}")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"needs_jacobian": True}, "needs_jacobian=True but the class is a GramianWeightedAggregator"),
        ({"state": "weights"}, "state='weights' but the class is not Stateful"),
        ({"loss_aware": True}, "loss_aware=True but the class is not LossAware"),
        ({"name": "My-Method"}, "not lower case"),
    ],
)
def test_a_spec_that_contradicts_its_class_is_refused_at_definition(fields, message):
    from hf_jd.aggregation import MeanWeighting

    with pytest.raises(TypeError, match=message):

        @aggregator_spec(**{"name": "halves", "summary": "half the sum", **fields})  # type: ignore[arg-type]
        class Halves(GramianWeightedAggregator):
            def __init__(self) -> None:
                super().__init__(MeanWeighting())


def test_a_stateful_class_without_a_state_declared_is_refused():
    with pytest.raises(TypeError, match="state='' but the class is Stateful"):

        @aggregator_spec(name="counting", summary="counts", needs_jacobian=True)
        class Counting(Stateful, Aggregator):
            calls = counter()

            def forward(self, matrix: Tensor) -> Tensor:
                self.calls += 1
                return matrix.sum(dim=0)


def _run(aggregator: Aggregator, start: int, stop: int) -> list[Tensor]:
    outputs = []
    for i in range(start, stop):
        if isinstance(aggregator, LossAware):
            aggregator.set_losses(LOSSES[i])
        outputs.append(aggregator(MATRICES[i]))
    return outputs


def _through_a_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same_state(first: object, second: object) -> bool:
    """Equal nested states: same keys in the same order, tensors equal in value, dtype and device."""
    if isinstance(first, dict) and isinstance(second, dict):
        return list(first) == list(second) and all(_same_state(first[key], second[key]) for key in first)
    if isinstance(first, Tensor) and isinstance(second, Tensor):
        return first.dtype == second.dtype and first.device == second.device and torch.equal(first, second)
    return type(first) is type(second) and first == second


@pytest.mark.parametrize("name", STATEFUL)
def test_state_round_trip_through_a_checkpoint_gives_the_same_outputs(name):
    spec = SPECS[name]
    reference = spec.build(M)
    _run(reference, 0, 3)
    state = _through_a_file(reference.state_dict())
    assert not _same_state(state, spec.build(M).state_dict())  # not the initial state: the checks can fail
    expected = _run(reference, 3, 7)

    resumed = spec.build(M)
    _run(resumed, 5, 7)  # another history, replaced by the load
    resumed.load_state_dict(state)
    assert _same_state(resumed.state_dict(), state)
    assert all(torch.equal(got, want) for got, want in zip(_run(resumed, 3, 7), expected))
    assert _same_state(resumed.state_dict(), reference.state_dict())


@pytest.mark.parametrize("name", STATEFUL)
def test_reset_behaves_like_a_fresh_instance(name):
    spec = SPECS[name]
    aggregator = spec.build(M)
    _run(aggregator, 0, 3)
    aggregator.reset()
    fresh = spec.build(M)
    assert all(torch.equal(got, want) for got, want in zip(_run(aggregator, 3, 7), _run(fresh, 3, 7)))
    assert repr(aggregator.state_dict()) == repr(fresh.state_dict())


@pytest.mark.parametrize("name", [name for name in STATEFUL if SPECS[name].loss_aware])
def test_pending_losses_are_dropped_by_a_load_and_by_a_reset(name):
    spec = SPECS[name]
    for forget in ("reset", "load"):
        aggregator, plain = spec.build(M), spec.build(M)
        state = aggregator.state_dict()
        aggregator.set_losses(LOSSES[0] * 3)
        aggregator.reset() if forget == "reset" else aggregator.load_state_dict(state)
        assert torch.equal(aggregator(MATRICES[0]), plain(MATRICES[0])), forget


class _Tracker(Stateful, Weighting):
    """A toy stateful weighting: the mean weights, and a count and a sum of the diagonals seen."""

    calls = counter()
    diagonal_sum = cpu_tensor(ndim=1)
    last = jacobian_tensor()

    def forward(self, gramian: Tensor) -> Tensor:
        diagonal = gramian.diagonal().to(device="cpu", dtype=torch.float64)
        self.diagonal_sum = diagonal if self.diagonal_sum is None else self.diagonal_sum + diagonal
        self.calls += 1
        self.last = gramian
        return gramian.new_full((gramian.shape[0],), 1.0 / gramian.shape[0])


def test_declared_fields_give_reset_state_dict_and_checked_loads():
    tracker = _Tracker()
    assert tracker.calls == 0 and tracker.diagonal_sum is None  # the initial values, before any call
    assert [field.name for field in _Tracker.state_fields()] == ["calls", "diagonal_sum", "last"]
    gramian = torch.eye(3, dtype=torch.float32) * 2
    tracker(gramian)
    tracker(gramian)
    (state,) = tracker.state_dict().values()
    assert list(state) == ["calls", "diagonal_sum", "last"] and state["calls"] == 2
    assert state["diagonal_sum"].dtype == torch.float64 and state["last"].dtype == torch.float32
    other = _Tracker()
    other.load_state_dict({"_extra_state": _through_a_file(dict(state))})
    assert other.calls == 2 and torch.equal(other.diagonal_sum, torch.full((3,), 4.0, dtype=torch.float64))
    other.reset()
    assert other.calls == 0 and other.diagonal_sum is None and other.last is None
    with pytest.raises(ValueError, match=r"Invalid state for _Tracker: expected a dict with 'calls' \(int\)"):
        other.load_state_dict({"_extra_state": {**state, "calls": True}})
    with pytest.raises(ValueError, match="'diagonal_sum' must be a 1-D tensor"):
        other.load_state_dict({"_extra_state": {**state, "diagonal_sum": torch.zeros(2, 2)}})
    assert other.calls == 0  # a refused state changes nothing


def test_a_stateful_class_without_fields_of_its_own_saves_nothing_itself():
    """An aggregator whose state is its weighting's adds no ``_extra_state`` of its own: the checkpoint
    keys stay those of before the bases existed (``gramian_weighting._extra_state``)."""

    class TrackerAggregator(Stateful, GramianWeightedAggregator):
        def __init__(self) -> None:
            super().__init__(_Tracker())

    aggregator = TrackerAggregator()
    aggregator(torch.ones(2, 3))
    assert list(aggregator.state_dict()) == ["gramian_weighting._extra_state"]
    aggregator.reset()  # resets the stateful sub-module
    assert aggregator.gramian_weighting.calls == 0


def test_isinstance_is_structural_for_classes_that_do_not_derive_from_the_bases():
    class WithReset(nn.Module):
        def reset(self) -> None:
            pass

    class WithLosses(nn.Module):
        def set_losses(self, losses: Tensor) -> None:
            pass

    class WithNeither(nn.Module):
        reset = None  # as collections.abc: None blocks the method

    assert isinstance(WithReset(), Stateful) and not isinstance(WithReset(), LossAware)
    assert isinstance(WithLosses(), LossAware) and not isinstance(WithLosses(), Stateful)
    assert not isinstance(WithNeither(), Stateful) and not isinstance(nn.Linear(2, 2), Stateful)


def test_an_aggregator_passes_the_losses_to_its_loss_aware_weighting():
    aggregator = SPECS["gradnorm"].build(M)
    aggregator.set_losses([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(
        aggregator.gramian_weighting._losses, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    )
    assert aggregator._losses is None
    with pytest.raises(ValueError, match="GradNorm.set_losses needs finite loss values"):
        aggregator.set_losses([1.0, float("nan")])


def test_a_spec_can_describe_a_user_class_registered_at_run_time():
    @aggregator_spec(
        name="halves",
        summary="half the sum of the rows",
        papers=(Paper("Doe et al.", "A Test Aggregator", "", 2031, "3101.00001"),),
        needs_jacobian=True,
    )
    class Halves(Aggregator):
        def forward(self, matrix: Tensor) -> Tensor:
            return matrix.sum(dim=0) / 2

    spec = Halves.spec  # type: ignore[attr-defined]
    assert (
        isinstance(spec, AggregatorSpec)
        and spec.cls is Halves
        and spec.path.endswith(":" + Halves.__qualname__)
    )
    assert "halves" not in SPECS  # only the package's own classes are built in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(spec.build(2)(torch.ones(2, 3)), torch.ones(3))
