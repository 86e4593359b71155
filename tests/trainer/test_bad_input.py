"""Bad input gets a clear error, never a silently wrong update or lost state."""

from __future__ import annotations

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from torch import nn

from hf_jd import JDTrainer, JDTrainingArguments


def _trainer(tmp_path, model=None, dataset=None, **kwargs) -> JDTrainer:
    jd_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key.startswith(("jd_", "aggregator"))}
    args = JDTrainingArguments(**base_args(tmp_path, max_steps=2, **kwargs), **jd_kwargs)
    return JDTrainer(
        model=model or tiny_bert(), args=args, train_dataset=dataset or classification_dataset(8)
    )


def test_scalar_loss_explains_how_to_get_per_example_losses(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.compute_losses_func = lambda outputs, inputs: nn.functional.cross_entropy(
        outputs.logits, inputs["labels"]
    )
    with pytest.raises(ValueError, match="reduction='none'"):
        trainer.train()


class NoLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(64, 4)

    def forward(self, input_ids, labels=None):
        return {"hidden": self.embedding(input_ids).mean(dim=1)}


def test_model_output_without_loss_or_logits(tmp_path):
    trainer = _trainer(tmp_path, model=NoLogits(), jd_loss_type="sequence_classification")
    with pytest.raises(ValueError, match="no `logits`"):
        trainer.train()


def test_unknown_model_type_asks_for_jd_loss_type(tmp_path):
    trainer = _trainer(tmp_path, model=NoLogits())
    with pytest.raises(ValueError, match="--jd_loss_type"):
        trainer.train()


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_nan_loss_names_step_and_indices_and_leaves_parameters_intact(tmp_path, engine):
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model=model, jd_engine=engine)

    def losses_with_nan(outputs, inputs):
        losses = nn.functional.cross_entropy(outputs.logits, inputs["labels"], reduction="none")
        return losses * torch.tensor([1.0, float("nan"), 1.0, float("inf")])

    trainer.compute_losses_func = losses_with_nan
    with pytest.raises(FloatingPointError, match=r"global step 0 \(indices \[1, 3\]"):
        trainer.train()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None or bool(torch.isfinite(param.grad).all()), name


def test_empty_loss_vector(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.compute_losses_func = lambda outputs, inputs: outputs.logits.sum(dim=1)[:0]
    with pytest.raises(ValueError, match="empty"):
        trainer.train()


def test_matrix_instead_of_vector(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.compute_losses_func = lambda outputs, inputs: outputs.logits
    with pytest.raises(ValueError, match=r"1-D loss vector of shape \[m\]"):
        trainer.train()


def test_jacobian_aggregator_with_gramian_engine_refused(tmp_path):
    with pytest.raises(ValueError, match="needs the explicit Jacobian"):
        JDTrainingArguments(**base_args(tmp_path), aggregator="trimmed_mean", jd_engine="gramian")


def test_jacobian_aggregator_trains_with_auto_engine(tmp_path):
    model = tiny_bert()
    before = model.classifier.weight.detach().clone()
    trainer = _trainer(tmp_path, model=model, aggregator="trimmed_mean", aggregator_kwargs={"trim_number": 1})
    trainer.train()
    assert trainer.jd_engine.name == "jacobian"
    assert not torch.equal(model.classifier.weight, before)


def test_plain_training_arguments_refused(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="JDTrainingArguments"):
        JDTrainer(
            model=tiny_bert(),
            args=TrainingArguments(**base_args(tmp_path)),
            train_dataset=classification_dataset(8),
        )


def test_scalar_compute_loss_func_without_vector_version_refused(tmp_path):
    with pytest.raises(ValueError, match="compute_losses_func"):
        JDTrainer(
            model=tiny_bert(),
            args=JDTrainingArguments(**base_args(tmp_path)),
            train_dataset=classification_dataset(8),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )
