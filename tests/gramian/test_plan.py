"""The plan of a step (``hf_jd.gramian._plan``): every call and every parameter gets one immutable
decision naming the pass that chose it, and the passes leave the captured calls as recorded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gramian_oracles import assert_exact
from test_gramian_region import RelativeKeys
from test_gramian_region import inputs as region_inputs
from torch import Tensor, nn

from hf_jd.gramian import GramianEngine
from hf_jd.gramian._plan import CallDecision, CallKey, CallKind, ParamRoute, Pass, Plan, Route

B = 4


def plan_of(model: nn.Module, forward, **engine_kwargs) -> tuple[GramianEngine, Plan]:
    """The plan of one ``gramian()`` (the engine keeps its step state until released)."""
    engine = GramianEngine(model, **engine_kwargs)
    with engine.capture():
        losses = forward()
    engine.gramian(losses)
    state = engine.step_state
    assert state is not None
    return engine, state.plan


def by_name(model: nn.Module, plan: Plan) -> dict[str, tuple[ParamRoute, Pass]]:
    return {
        name: (plan.param(p).route, plan.param(p).by)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


class LayerScale(nn.Module):
    """A parameter used directly by its owner's forward, broadcast over the batch (ConvNeXt's layer scale)."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (self.gamma * self.linear(x)).pow(2).sum(dim=1)


def test_a_broadcast_parameter_gets_a_synthetic_call_of_its_own():
    torch.manual_seed(0)
    model = LayerScale().double()
    x = torch.randn(B, 3, dtype=torch.float64)
    engine, plan = plan_of(model, lambda: model(x))
    assert by_name(model, plan) == {
        "linear.weight": (ParamRoute.RULE, Pass.BATCH),
        "linear.bias": (ParamRoute.RULE, Pass.BATCH),
        "gamma": (ParamRoute.BROADCAST, Pass.BROADCAST),
    }
    index = [name for name, _ in model.named_parameters()].index("gamma")
    key = CallKey(CallKind.PARAM, index)
    decision = plan.calls[key]
    assert (decision.route, decision.by, decision.remap is not None) == (
        Route.SYNTHETIC,
        Pass.BROADCAST,
        True,
    )
    assert [use.key for use in plan.active] == [CallKey(CallKind.MODULE, 0, 0), key]
    assert plan.fallback == {}
    engine.release()


class RelativeBias(nn.Module):
    """An embedding of a ``[T, T]`` bucket matrix (T may equal the batch), added to per-example scores
    (T5's relative attention bias): the call is not per example, its output reaches the examples
    through a broadcast point only."""

    def __init__(self, tokens: int = B) -> None:
        super().__init__()
        self.bias = nn.Embedding(2 * tokens, 1)
        self.query = nn.Linear(3, tokens)
        buckets = torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :] + tokens
        self.register_buffer("buckets", buckets)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.query(x)  # [B, T, T]
        bias = self.bias(self.buckets).squeeze(-1)  # [T, T]: the leading T is not the batch
        return torch.tanh(scores + bias.unsqueeze(0)).pow(2).sum(dim=(1, 2))


def test_a_call_that_does_not_follow_the_batch_is_served_through_its_broadcast_points():
    torch.manual_seed(0)
    model = RelativeBias().double()
    x = torch.randn(B, B, 3, dtype=torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10)
    engine, plan = plan_of(model, lambda: model(x))
    served = by_name(model, plan)
    assert served["bias.weight"] == (ParamRoute.RULE, Pass.BROADCAST)
    assert served["query.weight"] == (ParamRoute.RULE, Pass.BATCH)
    (use,) = [use for use in plan.active if use.rule.module is model.bias]
    assert use.decision.route is Route.BROADCAST and use.decision.by is Pass.BROADCAST
    # The decision says how the call is served; the captured call stays as the hook recorded it.
    assert use.expanded == [True] and use.call.expanded == [False]
    assert len(use.edges) == 1 and use.call.edges == []  # the backward took b at the broadcast point
    state = engine.step_state
    assert state is not None and use.input_shared(state.ctx)  # the buckets are shared by every row
    engine.release()


class FlatRows(nn.Module):
    """A linear layer on ``[B·T, H]`` rows (OPT's feed-forward): proven per example by the layout pass."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 5)
        self.second = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.tanh(self.first(x))  # [B, T, 5]
        flat = self.second(hidden.reshape(-1, 5))  # [B·T, 2]
        return flat.view(x.shape[0], -1).pow(2).sum(dim=1)


def test_flattened_rows_are_decided_by_the_layout_pass():
    torch.manual_seed(0)
    model = FlatRows().double()
    x = torch.randn(B, 3, 3, dtype=torch.float64)
    engine, plan = plan_of(model, lambda: model(x))
    assert by_name(model, plan)["second.weight"] == (ParamRoute.RULE, Pass.LAYOUT)
    assert by_name(model, plan)["first.weight"] == (ParamRoute.RULE, Pass.BATCH)
    second = plan.calls[CallKey(CallKind.MODULE, 1, 0)]
    assert second.route is Route.RULE and second.by is Pass.LAYOUT and second.in_rows[0]
    engine.release()


def test_a_batch_free_region_is_a_synthetic_call():
    torch.manual_seed(0)
    model = RelativeKeys().double()
    x = region_inputs(torch.float64)
    engine, plan = plan_of(model, lambda: model(x), expand_broadcast=False)
    served = by_name(model, plan)
    assert {served[name] for name in ("table", "norm.weight", "norm.bias")} == {
        (ParamRoute.REGION, Pass.REGION)
    }
    assert plan.calls[CallKey(CallKind.REGION)].route is Route.SYNTHETIC
    assert plan.active[-1].key == CallKey(CallKind.REGION)
    engine.release()


class Mixed(nn.Module):
    """A batch norm (root-level fallback), and a weight read outside its owner's call."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.linear = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(self.norm(x))
        return (y @ self.linear.weight).pow(2).sum(dim=1)  # the weight again, outside the call


def test_the_fallback_names_why():
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(B, 3, dtype=torch.float64)
    engine, plan = plan_of(model, lambda: model(x))
    assert by_name(model, plan) == {
        "norm.weight": (ParamRoute.FALLBACK, Pass.SETUP),
        "norm.bias": (ParamRoute.FALLBACK, Pass.SETUP),
        "linear.weight": (ParamRoute.FALLBACK, Pass.COVERAGE),
        "linear.bias": (ParamRoute.RULE, Pass.BATCH),
    }
    assert set(plan.fallback) == {id(model.norm.weight), id(model.norm.bias), id(model.linear.weight)}
    engine.release()


def test_per_task_calls_are_decided_without_classification():
    torch.manual_seed(0)
    model = LayerScale().double()
    x = torch.randn(B, 3, dtype=torch.float64)

    def tasks() -> Tensor:
        out = model(x)
        return torch.stack([out[:2].sum(), out[2:].sum()])

    engine, plan = plan_of(model, tasks, objectives="per_task")
    (key,) = plan.calls
    assert plan.calls[key] == CallDecision(Route.RULE, Pass.PER_TASK, (False,))
    assert by_name(model, plan)["gamma"] == (ParamRoute.FALLBACK, Pass.SETUP)  # owned by the root model
    engine.release()


def test_op_level_calls_have_their_own_kind():
    class Norm(nn.LayerNorm):  # a stock layer with its own forward: recorded at its F.layer_norm call
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2.0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), Norm(3)).double()
    x = torch.randn(B, 3, dtype=torch.float64)
    engine, plan = plan_of(model, lambda: model(x).pow(2).sum(dim=1))
    assert {key.kind for key in plan.calls} == {CallKind.MODULE, CallKind.OP}
    assert CallKey(CallKind.OP, 1, 0) in plan.calls
    engine.release()


def test_decisions_and_plans_are_immutable():
    decision = CallDecision(Route.RULE, Pass.BATCH, (True,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.route = Route.DROPPED  # type: ignore[misc]
    torch.manual_seed(0)
    model = LayerScale().double()
    x = torch.randn(B, 3, dtype=torch.float64)
    engine, plan = plan_of(model, lambda: model(x))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fallback = {}  # type: ignore[misc]
    engine.release()
