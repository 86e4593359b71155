"""Per-task JD: a two-head model over a shared encoder, checked against brute force."""

from __future__ import annotations

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert, tiny_bert_config
from torch import nn
from transformers import BertModel

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.aggregation import UPGradWeighting


class TwoHeadModel(nn.Module):
    """Shared BERT encoder; head ``a`` classifies, head ``b`` regresses."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = BertModel(tiny_bert_config(), add_pooling_layer=False)
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 1)

    def forward(self, input_ids, labels=None, targets=None):
        features = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        logits = self.head_a(features)
        prediction = self.head_b(features).squeeze(-1)
        losses = {
            "classification": nn.functional.cross_entropy(logits, labels),
            "regression": nn.functional.mse_loss(prediction, targets),
        }
        return {"loss": losses, "logits": logits}


def _dataset():
    dataset = classification_dataset(8, seed=5)
    generator = torch.Generator().manual_seed(7)
    return dataset.add_column("targets", torch.randn(8, generator=generator).tolist())


def _shared_jacobian(model: TwoHeadModel, batch: dict) -> tuple[dict, list[str], torch.Tensor]:
    """The task losses, the names of the shared parameters and their Jacobian, row by row."""
    losses = model(**batch)["loss"]
    named = dict(model.named_parameters())
    shared = [name for name in named if name.startswith("encoder.")]
    rows = []
    for loss in (losses["classification"], losses["regression"]):
        grads = torch.autograd.grad(loss, [named[n] for n in shared], retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(named[n])).reshape(-1)
                    for g, n in zip(grads, shared)
                ]
            )
        )
    return losses, shared, torch.stack(rows)


def _brute_force_grads(model: TwoHeadModel, batch: dict) -> dict[str, torch.Tensor]:
    losses, shared, J = _shared_jacobian(model, batch)
    la, lb = losses["classification"], losses["regression"]
    named = dict(model.named_parameters())
    w = UPGradWeighting(solver="quadprog")(J @ J.T)
    expected = {}
    update = w @ J
    offset = 0
    for name in shared:
        numel = named[name].numel()
        expected[name] = update[offset : offset + numel].view_as(named[name])
        offset += numel
    for name, loss in (("head_a", la), ("head_b", lb)):
        for suffix in ("weight", "bias"):
            param = named[f"{name}.{suffix}"]
            expected[f"{name}.{suffix}"] = torch.autograd.grad(loss, param, retain_graph=True)[0]
    return expected


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_per_task_step_matches_brute_force(tmp_path, engine):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = TwoHeadModel()
        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        dataset = _dataset()
        batch = {
            "input_ids": torch.tensor(dataset["input_ids"]),
            "labels": torch.tensor(dataset["labels"]),
            "targets": torch.tensor(dataset["targets"]),
        }
        expected = _brute_force_grads(model, batch)
        lr = 0.1
        args = JDTrainingArguments(
            **base_args(
                tmp_path,
                per_device_train_batch_size=8,
                max_steps=1,
                learning_rate=lr,
                optim="sgd",
                lr_scheduler_type="constant",
                max_grad_norm=0.0,
            ),
            jd_objectives="per_task",
            aggregator="upgrad",
            jd_engine=engine,
        )
        JDTrainer(model=model, args=args, train_dataset=dataset).train()
        for name, param in model.named_parameters():
            if name.endswith("position_ids"):
                continue
            actual_grad = (initial[name] - param.detach()) / lr
            torch.testing.assert_close(actual_grad, expected[name], atol=1e-8, rtol=1e-6, msg=name)
    finally:
        torch.set_default_dtype(torch.float32)


def test_per_task_on_a_single_task_model_is_refused_at_construction(tmp_path):
    """A stock single-loss Hugging Face head in per_task mode fails when the trainer is built, before data prep."""

    args = JDTrainingArguments(
        **base_args(tmp_path, max_steps=1), jd_objectives="per_task", jd_engine="jacobian"
    )
    with pytest.raises(ValueError, match="one loss per task.*single-task Hugging Face model"):
        JDTrainer(model=tiny_bert(), args=args, train_dataset=classification_dataset(8))


def test_per_task_metrics_are_logged_under_the_task_names(tmp_path):
    torch.manual_seed(0)
    model = TwoHeadModel()
    dataset = _dataset()
    args = JDTrainingArguments(
        **base_args(
            tmp_path,
            per_device_train_batch_size=8,
            max_steps=1,
            logging_strategy="steps",
            logging_steps=1,
            optim="sgd",
        ),
        jd_objectives="per_task",
        aggregator="upgrad",
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    batch = {key: torch.tensor(dataset[key]) for key in ("input_ids", "labels", "targets")}
    torch.manual_seed(0)
    with torch.no_grad():
        expected = TwoHeadModel()(**batch)["loss"]  # the same initial weights: the losses of step 1
    for name in ("classification", "regression"):
        assert logged[f"jd/task_loss/{name}"] == pytest.approx(float(expected[name]), rel=1e-4)
    weights = [logged[f"jd/task_weight/{name}"] for name in ("classification", "regression")]
    assert sum(weights) / 2 == pytest.approx(
        logged["jd/weight_min"] / 2 + logged["jd/weight_max"] / 2, rel=1e-4
    )
