"""Resuming from a checkpoint continues the exact trajectory, stateful aggregator included."""

from __future__ import annotations

import os

import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.trainer import AGGREGATOR_STATE_NAME


def _args(tmp_path, name: str, **overrides) -> JDTrainingArguments:
    values = base_args(
        tmp_path,
        output_dir=str(tmp_path / name),
        max_steps=6,
        learning_rate=0.05,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=3,
        jd_engine="jacobian",
    )
    values.update(overrides)
    return JDTrainingArguments(**values, aggregator="random", aggregator_kwargs={"seed": 123})


def test_resume_with_stateful_aggregator_matches_uninterrupted_run(tmp_path):
    dataset = classification_dataset(24)
    straight = tiny_bert()
    JDTrainer(model=straight, args=_args(tmp_path, "straight"), train_dataset=dataset).train()

    first = tiny_bert()
    JDTrainer(model=first, args=_args(tmp_path, "resumed", max_steps=6), train_dataset=dataset).train(
        resume_from_checkpoint=None
    )
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / AGGREGATOR_STATE_NAME).is_file()

    resumed_model = tiny_bert(seed=99)  # different init: everything must come from the checkpoint
    trainer = JDTrainer(model=resumed_model, args=_args(tmp_path, "resumed"), train_dataset=dataset)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    for (name, expected), (_, actual) in zip(straight.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=name)


def test_resume_without_aggregator_state_is_refused(tmp_path):
    """A stateful aggregator without its saved state cannot continue the trajectory: refuse clearly."""
    dataset = classification_dataset(24)
    straight = tiny_bert()
    JDTrainer(model=straight, args=_args(tmp_path, "straight"), train_dataset=dataset).train()
    JDTrainer(model=tiny_bert(), args=_args(tmp_path, "resumed"), train_dataset=dataset).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    os.remove(checkpoint / AGGREGATOR_STATE_NAME)
    trainer = JDTrainer(model=tiny_bert(), args=_args(tmp_path, "resumed"), train_dataset=dataset)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    except FileNotFoundError as error:
        assert AGGREGATOR_STATE_NAME in str(error)
    else:  # pragma: no cover - the trainer must refuse rather than silently diverge
        raise AssertionError("resuming a stateful aggregator without its state must fail")
