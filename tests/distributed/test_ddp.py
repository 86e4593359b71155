"""Exact JD across two real CPU processes (gloo) launched with torch.distributed.run."""

from __future__ import annotations

import os

import pytest
import torch
from _launch import launch_workers

WORKER = os.path.join(os.path.dirname(__file__), "_ddp_worker.py")


def launch(tmp_path, name: str, nproc: int, **options) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    args = ["--out", str(out)]
    for key, value in options.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return launch_workers(WORKER, out, nproc, args, retry_on_signal=True)


def assert_params_close(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=1e-5, msg=name)


def assert_moved(result: dict, initial: dict) -> None:
    assert any(not torch.equal(result["params"][n], initial[n]) for n in initial)


@pytest.fixture(scope="module")
def initial_params(tmp_path_factory):
    from distributed._fixtures import TwoHeadModel, tiny_bert

    return {
        "per_example": {n: p.detach().clone() for n, p in tiny_bert().named_parameters()},
        "per_task": {n: p.detach().clone() for n, p in TwoHeadModel().named_parameters()},
    }


def test_local_scope_equals_mean_of_per_rank_aggregates(tmp_path, initial_params):
    # Mean of the per-rank UPGrad aggregates == one process aggregating each half as its own
    # micro-batch with gradient accumulation 2 (sequential sampling: rank r gets the r-th half).
    two = launch(tmp_path, "two", 2, objectives="per_example", scope="local", batch=4, steps=3)
    one = launch(
        tmp_path, "one", 1, objectives="per_example", scope="local", batch=4, accumulation=2, steps=3
    )
    global_two = launch(tmp_path, "global", 2, objectives="per_example", scope="global", batch=4, steps=3)
    assert all(result["identical"] for result in two)
    for result in two:
        assert_params_close(result["params"], one[0]["params"])
    # ...and the local step is genuinely different from the global JD step.
    difference = max((two[0]["params"][n] - global_two[0]["params"][n]).abs().max() for n in one[0]["params"])
    assert difference > 1e-4


@pytest.mark.parametrize(
    ("objectives", "scope"), [("per_example", "global"), ("per_example", "local"), ("per_task", "global")]
)
def test_bit_identical_parameters_with_accumulation(tmp_path, objectives, scope, initial_params):
    # jd_check_rank_consistency compares checksums after every optimizer step (raises otherwise);
    # the worker also compares the full parameter vectors at the end.
    results = launch(tmp_path, "run", 2, objectives=objectives, scope=scope, batch=3, accumulation=2, steps=3)
    assert all(result["identical"] for result in results)
    assert all(result["global_step"] == 3 for result in results)
    assert torch.equal(
        torch.cat([p.reshape(-1) for p in results[0]["params"].values()]),
        torch.cat([p.reshape(-1) for p in results[1]["params"].values()]),
    )
    assert_moved(results[0], initial_params[objectives])


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    results = launch(
        tmp_path, "nan", 2, objectives="per_example", scope="global", batch=4, steps=3, nan_rank=1
    )
    for result in results:
        assert result["error"] is not None and "global step 1" in result["error"]
        assert result["global_step"] == 1
    assert "another rank" in results[0]["error"] and "indices [0, 1, 2, 3]" in results[1]["error"]
    assert all(result["identical"] for result in results)


def test_static_graph_ddp_works(tmp_path):
    results = launch(
        tmp_path, "static", 2, objectives="per_example", scope="global", batch=4, steps=2, static_graph=True
    )
    assert all(result["identical"] and result["global_step"] == 2 for result in results)


@pytest.mark.parametrize(
    ("scalarizer", "kwargs"),
    [("uncertainty_weighting", '{"shape": 2}'), ("famo", '{"shape": 2}')],
    ids=["learned-log-variances", "famo-logits"],
)
def test_scalarizer_state_is_identical_on_both_ranks(tmp_path, scalarizer, kwargs, initial_params):
    """DDP averages the model's gradients; the scalarizer's own parameters (UW) and its post-step state
    (FAMO) are averaged by JDTrainer, so both ranks end with the same parameters and the same state."""
    ranks = launch(tmp_path, "two", 2, objectives="per_task", scalarizer=scalarizer, scalarizer_kwargs=kwargs)
    assert all(r["identical"] and r["error"] is None for r in ranks)
    first, second = (r["scalarizer_state"] for r in ranks)
    assert first.keys() == second.keys() and first
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key
    moved = [
        k
        for k, v in first.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.abs().sum() > 0
    ]
    assert moved, f"the scalarizer state never changed: {first}"
    assert_moved(ranks[0], initial_params["per_task"])


@pytest.mark.parametrize("objectives", ["per_task", "per_example"])
def test_loss_aware_aggregator_gets_the_same_losses_on_every_rank(tmp_path, objectives, initial_params):
    """GradNorm learns from the loss values; each rank's own losses would give each rank other weights
    (and the rank-consistency check would stop the run). JDTrainer gives every rank the losses of the
    rows of the global step: rank-mean task losses, or every rank's example losses."""
    ranks = launch(tmp_path, "two", 2, objectives=objectives, aggregator="gradnorm", engine="jacobian")
    assert all(r["identical"] and r["error"] is None for r in ranks)
    assert_moved(ranks[0], initial_params[objectives])
