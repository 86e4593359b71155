"""The trainer contract on a plain loop: every scalarizer trains a tiny two-task model with ONE backward
per step, its hooks called where the contract says, and a resumed run repeats an uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_jd.scalarization import Scalarizer, get_scalarizer, scalarizer_names

KWARGS = {
    "constant": {"weights": [1.0, 0.5]},
    "uncertainty_weighting": {"shape": 2},
    "imtl_l": {"shape": 2},
    "famo": {"shape": 2},
    "stch": {"mu": 0.5},
    "cosmos": {"lambda_": 1.0},
    "random": {"seed": 0},
}
X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
TARGETS = (X @ torch.randn(4, 2, generator=torch.Generator().manual_seed(1))) + 1.0


def _losses(model: torch.nn.Module, rows: slice) -> torch.Tensor:
    pred = model(X[rows])
    return ((pred - TARGETS[rows]) ** 2).mean(dim=0) + 0.01  # two task losses, kept > 0


def _train(scalarizer: Scalarizer, model: torch.nn.Module, optimizer, epochs: range) -> None:
    for _ in epochs:
        for start in range(0, 32, 8):
            rows = slice(start, start + 8)
            scalarizer(_losses(model, rows)).backward()  # ONE ordinary backward
            optimizer.step()
            optimizer.zero_grad()
            if scalarizer.needs_post_step_update:
                with torch.no_grad():
                    scalarizer.update(_losses(model, rows))  # same inputs, after the step
        if scalarizer.needs_epoch_step:
            scalarizer.step()


def _setup(name: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scalarizer = get_scalarizer(name, **KWARGS.get(name, {}))
    groups = [{"params": list(model.parameters())}]
    if list(scalarizer.parameters()):
        groups.append({"params": list(scalarizer.parameters()), "weight_decay": 0.0})
    return model, scalarizer, torch.optim.Adam(groups, lr=0.05)


@pytest.mark.parametrize("name", scalarizer_names())
def test_training_decreases_every_task_loss(name):
    model, scalarizer, optimizer = _setup(name)
    with torch.no_grad():
        before = _losses(model, slice(None))
    _train(scalarizer, model, optimizer, range(15))
    with torch.no_grad():
        after = _losses(model, slice(None))
    assert torch.isfinite(after).all() and (after < before).all(), (before, after)


@pytest.mark.parametrize("name", scalarizer_names())
def test_resuming_from_saved_states_repeats_the_uninterrupted_run(name):
    model, scalarizer, optimizer = _setup(name)
    _train(scalarizer, model, optimizer, range(3))
    saved = copy.deepcopy((model.state_dict(), scalarizer.state_dict(), optimizer.state_dict()))
    _train(scalarizer, model, optimizer, range(3, 5))

    model2, scalarizer2, optimizer2 = _setup(name)
    model2.load_state_dict(saved[0])
    scalarizer2.load_state_dict(saved[1])
    optimizer2.load_state_dict(saved[2])
    _train(scalarizer2, model2, optimizer2, range(3, 5))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(scalarizer.state_dict().values(), scalarizer2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
