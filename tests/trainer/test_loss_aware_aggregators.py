"""Aggregators that also use the loss values (GradNorm, DB-MTL, IMTL) get them from JDTrainer."""

from __future__ import annotations

import pytest
import torch
from _trainer_fixtures import base_args
from test_per_task import TwoHeadModel, _dataset

from hf_jd import JDTrainer, JDTrainingArguments


def _train(
    tmp_path, aggregator: str, steps: int = 1, jd_engine: str = "auto", **kwargs
) -> tuple[JDTrainer, torch.Tensor]:
    torch.manual_seed(0)
    model = TwoHeadModel()
    dataset = _dataset()
    batch = {key: torch.tensor(dataset[key]) for key in ("input_ids", "labels", "targets")}
    with torch.no_grad():
        first = model(**batch)["loss"]
    first_losses = torch.stack([first["classification"], first["regression"]])
    args = JDTrainingArguments(
        **base_args(
            tmp_path, per_device_train_batch_size=8, max_steps=steps, optim="sgd", learning_rate=0.05
        ),
        jd_objectives="per_task",
        aggregator=aggregator,
        aggregator_kwargs=kwargs,
        jd_engine=jd_engine,
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer, first_losses


@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
def test_gradnorm_records_the_first_losses_of_the_run(tmp_path, engine):
    trainer, first_losses = _train(tmp_path, "gradnorm", jd_engine=engine)
    weighting = trainer.aggregator.gramian_weighting
    torch.testing.assert_close(weighting.initial_losses.float(), first_losses, rtol=1e-5, atol=1e-6)


def test_imtl_learns_its_loss_scales_in_the_trainer(tmp_path):
    """Without the loss values the scales stay at 0 (IMTL = IMTL-G); the trainer gives them."""
    trainer, first_losses = _train(tmp_path, "imtl", steps=1, lr=0.01)
    log_scales = trainer.aggregator.state_dict()["gramian_weighting._extra_state"]["log_scales"]
    # one step of s <- s - lr (e^s L - 1) from s = 0
    torch.testing.assert_close(log_scales.float(), -0.01 * (first_losses - 1), rtol=1e-4, atol=1e-7)


def test_db_mtl_runs_on_log_losses_in_the_trainer(tmp_path):
    trainer, _ = _train(tmp_path, "db_mtl", steps=2)
    assert trainer.jd_engine.name == "jacobian"  # DB-MTL needs the rows of J
    assert trainer.state.global_step == 2
