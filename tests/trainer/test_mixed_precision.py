"""bf16 autocast on CPU: the JD step runs under autocast and matches the stock step's direction."""

from __future__ import annotations

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from transformers import Trainer, TrainingArguments

from hf_jd import JDTrainer, JDTrainingArguments


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_bf16_autocast_mean_matches_stock_direction(tmp_path, engine):
    dataset = classification_dataset(8)
    common = base_args(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=1,
        bf16=True,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    initial = torch.cat([p.detach().reshape(-1) for p in tiny_bert().parameters()])
    stock_model = tiny_bert()
    stock = Trainer(model=stock_model, args=TrainingArguments(**common), train_dataset=dataset)
    stock.model_accepts_loss_kwargs = False
    stock.train()
    jd_model = tiny_bert()
    trainer = JDTrainer(
        model=jd_model,
        args=JDTrainingArguments(**common, aggregator="mean", jd_engine=engine),
        train_dataset=dataset,
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    stock_step = torch.cat([p.detach().reshape(-1) for p in stock_model.parameters()]) - initial
    jd_step = torch.cat([p.detach().reshape(-1) for p in jd_model.parameters()]) - initial
    assert bool(torch.isfinite(jd_step).all())
    cosine = torch.nn.functional.cosine_similarity(stock_step, jd_step, dim=0)
    assert cosine > 0.999, cosine
    assert (jd_step.norm() / stock_step.norm() - 1).abs() < 0.02


def test_bf16_upgrad_trains(tmp_path):
    model = tiny_bert()
    before = model.classifier.weight.detach().clone()
    args = JDTrainingArguments(
        **base_args(tmp_path, max_steps=3, bf16=True, logging_strategy="steps", logging_steps=1),
        aggregator="upgrad",
        jd_engine="jacobian",
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=classification_dataset(12))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    assert all("jd/weight_min" in entry and "jd/conflict_fraction" in entry for entry in logged)
    assert not torch.equal(model.classifier.weight, before)
