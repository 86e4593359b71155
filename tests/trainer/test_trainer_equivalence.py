"""JDTrainer against the stock Trainer and against first-order guarantees."""

from __future__ import annotations

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from transformers import Trainer, TrainingArguments

from hf_jd import JDTrainer, JDTrainingArguments

ENGINES = ["jacobian", "gramian"]


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("accumulation", "max_grad_norm"), [(1, 0.0), (3, 0.0), (3, 0.05)])
@pytest.mark.parametrize("engine", ENGINES)
def test_mean_aggregator_reproduces_stock_trainer(tmp_path, accumulation, max_grad_norm, engine):
    # 20 examples, batch 4 -> 5 micro-batches: with accumulation 3 the last window has only 2.
    dataset = classification_dataset(20)
    common = base_args(
        tmp_path,
        num_train_epochs=1,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
    )
    stock_model = tiny_bert()
    stock = Trainer(model=stock_model, args=TrainingArguments(**common), train_dataset=dataset)
    # The stock Trainer believes BERT normalises by num_items_in_batch (it does not) and would skip the
    # accumulation division; force the correct mean-loss semantics as the reference.
    stock.model_accepts_loss_kwargs = False
    stock.train()

    jd_model = tiny_bert()
    jd = JDTrainer(
        model=jd_model,
        args=JDTrainingArguments(**common, aggregator="mean", jd_engine=engine),
        train_dataset=dataset,
    )
    jd.train()
    assert jd.state.global_step == stock.state.global_step == (2 if accumulation == 3 else 5)
    initial = _params(tiny_bert())
    for (name, expected), (_, actual) in zip(stock_model.named_parameters(), jd_model.named_parameters()):
        assert not torch.equal(expected, initial[name]) or name.endswith("position_ids"), (
            f"{name} did not train"
        )
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=f"parameter {name}")


def test_jd_trainer_does_not_inherit_loss_kwargs_scaling_bug(tmp_path):
    """Stock Trainer + accumulation 2 on a model that takes **kwargs: a 2x too large step. Not JDTrainer."""
    dataset = classification_dataset(8)
    common = base_args(
        tmp_path,
        num_train_epochs=1,
        gradient_accumulation_steps=2,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    reference_model = tiny_bert()
    reference = Trainer(model=reference_model, args=TrainingArguments(**common), train_dataset=dataset)
    reference.model_accepts_loss_kwargs = False
    reference.train()
    buggy_model = tiny_bert()
    buggy = Trainer(model=buggy_model, args=TrainingArguments(**common), train_dataset=dataset)
    assert buggy.model_accepts_loss_kwargs  # the precondition of the bug
    buggy.train()
    jd_model = tiny_bert()
    JDTrainer(
        model=jd_model, args=JDTrainingArguments(**common, aggregator="mean"), train_dataset=dataset
    ).train()

    initial = dict(tiny_bert().named_parameters())
    name = "classifier.weight"
    reference_step = dict(reference_model.named_parameters())[name] - initial[name]
    buggy_step = dict(buggy_model.named_parameters())[name] - initial[name]
    jd_step = dict(jd_model.named_parameters())[name] - initial[name]
    torch.testing.assert_close(jd_step, reference_step, atol=1e-6, rtol=1e-5)
    assert (buggy_step - reference_step).abs().max() > 1e-3  # the stock bug is real here


def _per_example_losses(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


@pytest.mark.parametrize("engine", ENGINES)
def test_upgrad_step_increases_no_per_example_loss(tmp_path, engine):
    torch.set_default_dtype(torch.float64)
    try:
        dataset = classification_dataset(8, seed=3)
        batch = {key: torch.tensor(dataset[key]) for key in ("input_ids", "labels")}

        def one_step(aggregator: str) -> torch.Tensor:
            model = tiny_bert(seed=1)
            before = _per_example_losses(model, batch).detach()
            args = JDTrainingArguments(
                **base_args(
                    tmp_path,
                    per_device_train_batch_size=8,
                    max_steps=1,
                    learning_rate=1e-3,
                    optim="sgd",
                    lr_scheduler_type="constant",
                    max_grad_norm=0.0,
                ),
                aggregator=aggregator,
                jd_engine=engine,
            )
            JDTrainer(model=model, args=args, train_dataset=dataset).train()
            return _per_example_losses(model, batch).detach() - before

        upgrad_change = one_step("upgrad")
        mean_change = one_step("mean")
    finally:
        torch.set_default_dtype(torch.float32)
    # The mean step sacrifices some example (so the test is meaningful), UPGrad's step sacrifices none.
    assert (mean_change > 0).any()
    assert (upgrad_change <= 1e-9).all(), upgrad_change
