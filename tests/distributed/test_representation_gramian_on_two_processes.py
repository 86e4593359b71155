"""The representation Gramian (``jd_gramian="representation"``) over two real CPU processes (gloo).

* global scope: every rank takes the weights of the global representation Gramian ``(1/R²) Σ_r G_r`` and the
  ranks' updates are averaged — the step of one process on the global batch;
* local scope: each rank weighs its own tasks' Gramian — the mean of the ranks' steps, which one process
  reproduces with the ranks' batches as accumulated micro-batches.

The one-process references run in this process (same model, data and arguments as the worker)."""

from __future__ import annotations

import os

import pytest
import torch
from _launch import launch_workers
from distributed._fixtures import TwoHeadModel, jd_args, regression_dataset

from hf_jd import JDTrainer

WORKER = os.path.join(os.path.dirname(__file__), "_ddp_worker.py")
STEPS = 3
#: MGDA: its weights (the min-norm point of the tasks' hull) move with every entry of the Gramian, where UPGrad's
#: stay at the mean while the two tasks' gradients do not conflict
AGGREGATOR = "mgda"


def _two_processes(tmp_path, scope: str) -> list[dict]:
    out = tmp_path / scope
    out.mkdir()
    options = ["--out", str(out), "--objectives", "per_task", "--gramian", "representation", "--scope", scope]
    options += ["--batch", "4", "--steps", str(STEPS), "--aggregator", AGGREGATOR]
    return launch_workers(WORKER, out, 2, options, retry_on_signal=True)


def _one_process(tmp_path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = TwoHeadModel()
    args = jd_args(
        str(tmp_path / "one"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        jd_objectives="per_task",
        jd_gramian="representation",
        aggregator=AGGREGATOR,
    )
    JDTrainer(model=model, args=args, train_dataset=regression_dataset(True)).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("scope", "batch", "accumulation"), [("global", 8, 1), ("local", 4, 2)])
def test_two_processes_take_the_one_process_step(tmp_path, scope, batch, accumulation):
    ranks = _two_processes(tmp_path, scope)
    assert all(rank["error"] is None and rank["engine"] == "representation" for rank in ranks)
    assert all(rank["identical"] for rank in ranks)
    expected = _one_process(tmp_path, batch, accumulation)
    initial = {name: p.detach() for name, p in TwoHeadModel().named_parameters()}
    assert any(not torch.equal(ranks[0]["params"][n], initial[n]) for n in initial)
    for name, value in expected.items():
        torch.testing.assert_close(ranks[0]["params"][name], value, atol=1e-5, rtol=1e-5, msg=name)
