"""One definition of "shared parameter" in per-task mode, the same on both engines and on mtl_backward.

The contract (``hf_jd.autojac._shared_params``): a parameter is shared when the graphs of at least two
task losses reach it. The trap is a step on which one task's gradient is exactly zero (a dead ReLU): a
rule by value would then call the shared encoder task-specific and give it the plain gradient, where
``mtl_backward`` + ``jac_to_grad`` give it the aggregated one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hf_jd.aggregation import UPGrad
from hf_jd.autojac import jac_to_grad, mtl_backward, shared_by_graph
from hf_jd.gramian import GramianEngine
from hf_jd.trainer._engines import ExplicitJacobianEngine, JDEngine
from hf_jd.trainer._jacobian_backend import JacobianBackend


class TwoTasks(nn.Module):
    """A shared encoder, two heads; ``dead_second`` makes task 2's gradient exactly zero on this input."""

    def __init__(self, dead_second: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 6)
        self.head_1 = nn.Linear(6, 1)
        self.head_2 = nn.Linear(6, 1)
        self.offset = 1e4 if dead_second else -1e4  # every ReLU dead, or every ReLU active

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.encoder(x))

    def task_losses(self, features: Tensor, y: Tensor) -> list[Tensor]:
        first = ((self.head_1(features).squeeze(-1) - y) ** 2).mean()
        second = torch.relu(self.head_2(features).squeeze(-1) - self.offset).mean()
        return [first, second]


def _data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=generator), torch.randn(8, generator=generator)


def _reference(model: TwoTasks) -> list[Tensor]:
    """``mtl_backward`` on the named features, then UPGrad on the encoder's ``.jac``."""
    x, y = _data()
    features = model.features(x)
    mtl_backward(model.task_losses(features, y), features=features)
    jac_to_grad(list(model.encoder.parameters()), UPGrad())
    return [p.grad.clone() for p in model.parameters()]


def _engine_step(model: TwoTasks, engine: JDEngine, stack: Callable[[list[Tensor]], Tensor]) -> list[Tensor]:
    x, y = _data()
    with engine.capture():
        losses = stack(model.task_losses(model.features(x), y))
    gramian = engine.gramian(losses)
    engine.accumulate_grad(UPGrad().gramian_weighting(gramian), 1.0)
    return [p.grad.clone() for p in model.parameters()]


ENGINES = {
    "gramian": lambda model: GramianEngine(model, objectives="per_task"),
    "jacobian": lambda model: JacobianBackend(model, per_task=True),
}


@pytest.mark.parametrize("dead_second", [False, True], ids=["both-live", "task-2-gradient-zero"])
@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_both_engines_match_mtl_backward(engine_name: str, dead_second: bool) -> None:
    expected = _reference(TwoTasks(dead_second))
    model = TwoTasks(dead_second)
    got = _engine_step(model, ENGINES[engine_name](model), torch.stack)
    for reference, value in zip(expected, got):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)


def test_a_zero_task_gradient_does_not_unshare_the_encoder() -> None:
    model = TwoTasks(dead_second=True)
    x, y = _data()
    losses = torch.stack(model.task_losses(model.features(x), y))
    names = [name for name, _ in model.named_parameters()]
    shared = dict(zip(names, shared_by_graph(losses, list(model.parameters())) or []))
    assert shared == {
        "encoder.weight": True,
        "encoder.bias": True,
        "head_1.weight": False,
        "head_1.bias": False,
        "head_2.weight": False,
        "head_2.bias": False,
    }
    # the reference really is the case the contract is about: task 2 sends an exactly zero gradient
    (second_grad,) = torch.autograd.grad(losses[1], [model.encoder.weight], retain_graph=True)
    assert torch.count_nonzero(second_grad) == 0


def test_a_vector_from_one_operation_is_decided_by_value_on_both_engines() -> None:
    """Without separate graphs per entry both engines read this step's values: with two live tasks
    they agree with each other and with ``mtl_backward``."""

    def concatenated(task_losses: list[Tensor]) -> Tensor:
        return torch.cat([loss.reshape(1) for loss in task_losses])

    expected = _reference(TwoTasks(dead_second=False))
    for build in ENGINES.values():
        model = TwoTasks(dead_second=False)
        losses_probe = concatenated(model.task_losses(model.features(_data()[0]), _data()[1]))
        assert shared_by_graph(losses_probe, list(model.parameters())) is None
        got = _engine_step(model, build(model), concatenated)
        for reference, value in zip(expected, got):
            torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)


def test_both_engines_implement_the_engine_interface() -> None:
    model = TwoTasks(dead_second=False)
    assert isinstance(GramianEngine(model, objectives="per_task"), JDEngine)
    assert not isinstance(GramianEngine(model, objectives="per_task"), ExplicitJacobianEngine)
    assert isinstance(JacobianBackend(model, per_task=True), ExplicitJacobianEngine)
