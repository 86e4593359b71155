"""``--scalarizer``: JDTrainer trains on ONE scalar of the loss vector with one ordinary backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from test_per_task import TwoHeadModel, _dataset
from transformers import Trainer, TrainingArguments

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.scalarization import DWA, FAMO, UncertaintyWeighting
from hf_jd.trainer import SCALARIZER_STATE_NAME


def _sgd(tmp_path, name: str, **overrides) -> dict:
    values = base_args(
        tmp_path,
        output_dir=str(tmp_path / name),
        max_steps=3,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    values.update(overrides)
    return values


class _MeanLossTrainer(Trainer):
    """The stock Trainer on the mean per-example cross-entropy (the reference of --scalarizer mean)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, inputs["labels"])
        return (loss, outputs) if return_outputs else loss


def test_the_mean_scalarizer_is_the_stock_trainer_on_the_mean_loss(tmp_path):
    dataset = classification_dataset(12)
    reference = tiny_bert()
    _MeanLossTrainer(
        model=reference, args=TrainingArguments(**_sgd(tmp_path, "stock")), train_dataset=dataset
    ).train()
    model = tiny_bert()
    trainer = JDTrainer(
        model=model,
        args=JDTrainingArguments(**_sgd(tmp_path, "jd"), scalarizer="mean"),
        train_dataset=dataset,
    )
    trainer.train()
    assert trainer.jd_engine is None and trainer.aggregator is None  # no Jacobian was formed
    for (name, expected), (_, actual) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_setting_both_an_aggregator_and_a_scalarizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Both aggregator='mgda' and scalarizer='mean' are set"):
        JDTrainingArguments(**base_args(tmp_path), aggregator="mgda", scalarizer="mean")
    with pytest.raises(ValueError, match="scalarizer_kwargs=.* is set without --scalarizer"):
        JDTrainingArguments(**base_args(tmp_path), scalarizer_kwargs={"temperature": 2.0})
    with pytest.raises(ValueError, match="Unknown scalarizer 'meen'"):
        JDTrainingArguments(**base_args(tmp_path), scalarizer="meen")
    with pytest.raises(ValueError, match="pass scalarizer_kwargs=\\{'shape': <number of tasks>\\}"):
        JDTrainingArguments(**base_args(tmp_path), scalarizer="famo", jd_objectives="per_task")
    assert JDTrainingArguments(**base_args(tmp_path)).aggregator == "upgrad"  # the default stays


def test_learned_log_variances_are_trained_by_the_optimizer(tmp_path):
    torch.manual_seed(0)
    model = TwoHeadModel()
    args = JDTrainingArguments(
        **_sgd(tmp_path, "uw", per_device_train_batch_size=8),
        jd_objectives="per_task",
        scalarizer="uncertainty_weighting",
        scalarizer_kwargs={"shape": 2},
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=_dataset())
    assert isinstance(trainer.scalarizer, UncertaintyWeighting)
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(trainer.scalarizer.log_var) in optimized
    # SGD on L = Σ exp(-s_k) L_k + s_k moves each s_k by -lr (1 - exp(-s_k) L_k) per step: never stays 0
    assert not torch.equal(trainer.scalarizer.log_var.detach(), torch.zeros(2))


def test_per_example_shape_defaults_to_the_batch_size(tmp_path):
    args = JDTrainingArguments(**base_args(tmp_path, per_device_train_batch_size=6), scalarizer="famo")
    assert args.resolved_scalarizer_kwargs == {"shape": 6}
    assert isinstance(args.build_scalarizer(), FAMO)


def test_dwa_closes_its_epoch_averages_at_every_epoch_end(tmp_path):
    torch.manual_seed(0)
    args = JDTrainingArguments(
        **_sgd(tmp_path, "dwa", max_steps=-1, num_train_epochs=3, per_device_train_batch_size=4),
        jd_objectives="per_task",
        scalarizer="dwa",
    )
    trainer = JDTrainer(model=TwoHeadModel(), args=args, train_dataset=_dataset())
    trainer.train()
    assert isinstance(trainer.scalarizer, DWA)
    weights = trainer.scalarizer.weights(2)
    # after two closed epochs DWA's weights follow the loss ratios: no longer the uniform start
    assert not torch.allclose(weights, torch.ones(2))


def _resume_args(tmp_path, name: str, scalarizer: str, kwargs: dict) -> JDTrainingArguments:
    return JDTrainingArguments(
        **_sgd(
            tmp_path,
            name,
            max_steps=4,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
            optim="adamw_torch",
        ),
        jd_objectives="per_task",
        scalarizer=scalarizer,
        scalarizer_kwargs=kwargs,
    )


@pytest.mark.parametrize(
    ("scalarizer", "kwargs"),
    [
        ("uncertainty_weighting", {"shape": 2}),
        ("imtl_l", {"shape": 2}),
        ("famo", {"shape": 2}),
        ("dwa", {}),
        ("random", {"seed": 3}),
    ],
)
def test_resume_continues_the_uninterrupted_run_exactly(tmp_path, scalarizer, kwargs):
    torch.manual_seed(0)
    straight = TwoHeadModel()
    initial = {n: p.detach().clone() for n, p in straight.named_parameters()}
    straight_trainer = JDTrainer(
        model=straight, args=_resume_args(tmp_path, "straight", scalarizer, kwargs), train_dataset=_dataset()
    )
    straight_trainer.train()

    first = TwoHeadModel()
    first.load_state_dict(initial)
    JDTrainer(
        model=first, args=_resume_args(tmp_path, "resumed", scalarizer, kwargs), train_dataset=_dataset()
    ).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    saved = torch.load(checkpoint / SCALARIZER_STATE_NAME, weights_only=True)
    assert saved["scalarizer"] == scalarizer

    torch.manual_seed(99)
    resumed = TwoHeadModel()  # another initialisation: everything must come from the checkpoint
    trainer = JDTrainer(
        model=resumed, args=_resume_args(tmp_path, "resumed", scalarizer, kwargs), train_dataset=_dataset()
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for (name, expected), (_, actual) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(actual, expected, atol=1e-7, rtol=1e-6, msg=name)
    for key, value in straight_trainer.scalarizer.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(trainer.scalarizer.state_dict()[key], value, msg=key)


def test_resuming_with_another_scalarizer_names_the_file(tmp_path):
    torch.manual_seed(0)
    args = _resume_args(tmp_path, "a", "uncertainty_weighting", {"shape": 2})
    JDTrainer(model=TwoHeadModel(), args=args, train_dataset=_dataset()).train()
    other = _resume_args(tmp_path, "a", "famo", {"shape": 2})
    trainer = JDTrainer(model=TwoHeadModel(), args=other, train_dataset=_dataset())
    with pytest.raises(
        Exception, match="jd_scalarizer.pt holds the state of scalarizer 'uncertainty_weighting'"
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
