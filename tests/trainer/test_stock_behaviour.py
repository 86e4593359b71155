"""Where the stock Trainer's behaviour is right, JDTrainer has it.

- tuple outputs (``return_dict=False``: ``(loss, logits, ...)``) give the per-example losses;
- a loss-derivation error is an input error, raised once (no engine fallback, no rerun);
- parameters no objective reaches keep ``.grad = None``, so AdamW leaves them untouched;
- ``aggregator_kwargs`` holding numpy or torch values give checkpoints that resume.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _toy_models import FEATURES, HIDDEN, ToyClassifier, parameters_of, toy_dataset
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.gramian import GramianEngine
from hf_jd.trainer import JDInputError

ENGINES = ["jacobian", "gramian"]
ADAMW = dict(optim="adamw_torch", weight_decay=0.1, learning_rate=0.05, lr_scheduler_type="constant")
# Adam divides each gradient entry by its own running scale, so entries that are zero in exact arithmetic
# (an attention key bias: softmax ignores a constant shift) move by float32 noise; the tuple-output tests
# compare on SGD with weight decay, the unreached-parameter tests (toys without such entries) on AdamW.
SGD = dict(optim="sgd", weight_decay=0.1, learning_rate=0.5, lr_scheduler_type="constant")


def _stock_and_jd(tmp_path, make_model, dataset, engine: str, **overrides):
    """Train the same model with the stock Trainer and with JDTrainer(aggregator="mean"); both models."""
    common = base_args(tmp_path, **overrides)
    stock_model = make_model()
    stock = Trainer(model=stock_model, args=TrainingArguments(**common), train_dataset=dataset)
    stock.model_accepts_loss_kwargs = False  # the mean-loss reference (see test_trainer_equivalence)
    stock.train()
    jd_model = make_model()
    args = JDTrainingArguments(**common, aggregator="mean", jd_engine=engine)
    JDTrainer(model=jd_model, args=args, train_dataset=dataset).train()
    return stock_model, jd_model


def _assert_same_parameters(expected: nn.Module, actual: nn.Module, atol: float = 1e-6) -> None:
    for (name, want), (_, got) in zip(expected.named_parameters(), actual.named_parameters()):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-5, msg=f"parameter {name}")


# ---------------------------------------------------------------------------------------------- tuple outputs
@pytest.mark.parametrize("engine", ENGINES)
def test_a_classifier_returning_tuples_trains_like_the_stock_trainer(tmp_path, engine):
    """``return_dict=False``: BERT returns ``(loss, logits)``; the losses come from the logits."""
    dataset = classification_dataset(8)
    stock, jd = _stock_and_jd(
        tmp_path, lambda: tiny_bert(return_dict=False), dataset, engine, max_steps=2, **SGD
    )
    _assert_same_parameters(stock, jd)


class TupleCausalLM(nn.Module):
    """GPT-2 called with ``return_dict=False``: ``(loss, logits, cache)`` with labels, else ``(logits, cache)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
        self.lm = GPT2LMHeadModel(config)

    def forward(self, input_ids, labels=None):  # noqa: ANN001, ANN201
        return self.lm(input_ids=input_ids, labels=labels, return_dict=False, use_cache=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_causal_lm_returning_tuples_trains_like_the_stock_trainer(tmp_path, engine):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (8, 6), generator=generator).tolist()
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    common = dict(max_steps=2, jd_loss_type="causal_lm", **SGD)
    stock_args = {k: v for k, v in common.items() if k != "jd_loss_type"}
    stock_model = TupleCausalLM()
    stock = Trainer(
        model=stock_model, args=TrainingArguments(**base_args(tmp_path, **stock_args)), train_dataset=dataset
    )
    stock.train()
    jd_model = TupleCausalLM()
    args = JDTrainingArguments(**base_args(tmp_path, **common), aggregator="mean", jd_engine=engine)
    JDTrainer(model=jd_model, args=args, train_dataset=dataset).train()
    # Every sequence has the same number of labelled tokens: the mean of per-sequence means is the
    # token mean of the stock loss.
    _assert_same_parameters(stock_model, jd_model)


# ------------------------------------------------------------------------------------ loss-derivation errors
class CountsForwards(ToyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, x, labels=None):  # noqa: ANN001, ANN201
        self.forwards += 1
        return super().forward(x, labels)


def test_a_loss_derivation_error_is_an_input_error_raised_once(tmp_path):
    """Token-level losses asked of a sequence classifier: one JDInputError naming the setting, no rerun."""
    model = CountsForwards()
    args = JDTrainingArguments(
        **base_args(tmp_path, max_steps=1), jd_loss_type="token_classification", jd_engine="auto"
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=toy_dataset(8))
    before = parameters_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(JDInputError, match="jd_loss_type") as raised:
            trainer.train()
    assert "token_classification" in str(raised.value)
    assert "ToyClassifier" in str(raised.value) or "CountsForwards" in str(raised.value)
    assert model.forwards == 1, "the micro-batch was run again on another engine"
    assert not [w for w in caught if "engine" in str(w.message).lower()], [str(w.message) for w in caught]
    for name, value in parameters_of(model).items():
        assert torch.equal(value, before[name]), name


# --------------------------------------------------------------------------- unreached parameters: no .grad
class Branches(nn.Module):
    """``unused`` is never called; ``sometimes`` only for batches whose first label is 0; ``frozen_path``
    is called but its output does not reach the logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(FEATURES, HIDDEN)
        self.unused = nn.Linear(HIDDEN, HIDDEN)
        self.sometimes = nn.Linear(HIDDEN, HIDDEN)
        self.frozen_path = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, x, labels=None):  # noqa: ANN001, ANN201
        hidden = torch.tanh(self.fc1(x))
        self.frozen_path(hidden)  # computed, discarded: no loss depends on it
        if labels is not None and int(labels[0]) == 0:
            hidden = hidden + torch.tanh(self.sometimes(hidden))
        return {"logits": self.head(hidden)}


def _cross_entropy(outputs, inputs):  # noqa: ANN001, ANN201
    return F.cross_entropy(outputs["logits"], inputs["labels"], reduction="none")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("aggregator", ["mean", "upgrad"])
def test_unreached_parameters_keep_no_gradient_and_adamw_leaves_them(tmp_path, engine, aggregator):
    dataset = toy_dataset(16)
    model = Branches()
    before = parameters_of(model)
    args = JDTrainingArguments(
        **base_args(tmp_path, max_steps=4, **ADAMW), aggregator=aggregator, jd_engine=engine
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, compute_losses_func=_cross_entropy)
    trainer.train()
    after = parameters_of(model)
    for name in ("unused.weight", "unused.bias", "frozen_path.weight", "frozen_path.bias"):
        assert torch.equal(after[name], before[name]), f"{name} moved although no loss reaches it"
    assert not torch.equal(after["head.weight"], before["head.weight"])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_branch_used_on_some_steps_trains_like_the_stock_trainer_under_adamw(tmp_path, engine):
    """Where the stock Trainer skips a parameter (``.grad`` None), AdamW's decay and moments must too."""
    dataset = toy_dataset(16, seed=3)
    assert len({labels[0] for labels in np.array(dataset["labels"]).reshape(4, 4).tolist()}) > 1

    class StockBranches(Branches):
        def forward(self, x, labels=None):  # noqa: ANN001, ANN201
            outputs = super().forward(x, labels)
            return {**outputs, "loss": F.cross_entropy(outputs["logits"], labels)}

    common = base_args(tmp_path, max_steps=4, **ADAMW)
    stock = StockBranches()
    Trainer(model=stock, args=TrainingArguments(**common), train_dataset=dataset).train()
    jd = Branches()
    args = JDTrainingArguments(**common, aggregator="mean", jd_engine=engine)
    JDTrainer(model=jd, args=args, train_dataset=dataset, compute_losses_func=_cross_entropy).train()
    _assert_same_parameters(stock, jd)


def test_the_gramian_engine_writes_no_gradient_into_unreached_parameters():
    model = Branches()
    x = torch.randn(4, FEATURES)
    labels = torch.tensor([1, 2, 0, 1])
    engine = GramianEngine(model)
    with engine.capture():
        outputs = model(x, labels)
    losses = F.cross_entropy(outputs["logits"], labels, reduction="none")
    gramian = engine.gramian(losses)
    engine.accumulate_grad(torch.full((4,), 0.25, dtype=gramian.dtype))
    reference = torch.autograd.grad(
        F.cross_entropy(model(x, labels)["logits"], labels), list(model.parameters()), allow_unused=True
    )
    for (name, param), expected in zip(model.named_parameters(), reference):
        if expected is None:
            assert param.grad is None, f"{name} got a gradient although autograd gives None"
        else:
            torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------- aggregator_kwargs of any type
@pytest.mark.parametrize(
    ("aggregator", "kwargs"),
    [
        ("upgrad", {"pref_vector": np.array([1.0, 2.0, 1.0, 1.0]), "reg_eps": np.float64(1e-4)}),
        ("gradvac", {"beta": np.float32(0.5)}),
        ("constant", {"weights": torch.tensor([0.5, 0.25, 0.125, 0.125])}),
    ],
    ids=["upgrad-numpy", "gradvac-numpy-scalar", "constant-tensor"],
)
def test_aggregator_kwargs_of_numpy_or_torch_values_give_resumable_checkpoints(tmp_path, aggregator, kwargs):
    dataset = classification_dataset(24)

    def run(name: str, resume: bool) -> dict[str, torch.Tensor]:
        values = base_args(
            tmp_path,
            output_dir=str(tmp_path / name),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            jd_engine="jacobian",
            dataloader_drop_last=True,
            **ADAMW,
        )
        args = JDTrainingArguments(**values, aggregator=aggregator, aggregator_kwargs=kwargs)
        assert all(
            not isinstance(v, (np.ndarray, np.generic, torch.Tensor)) for v in args.aggregator_kwargs.values()
        )
        model = tiny_bert()
        trainer = JDTrainer(model=model, args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2") if resume else None)
        return parameters_of(model)

    full = run("full", resume=False)
    resumed = run("resumed", resume=True)
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, msg=name)


def test_aggregator_kwargs_holding_an_object_are_refused_naming_the_field(tmp_path):
    class Projector:
        pass

    with pytest.raises(ValueError, match=r"aggregator_kwargs\['projector'\].*Projector"):
        JDTrainingArguments(
            **base_args(tmp_path), aggregator="upgrad", aggregator_kwargs={"projector": Projector()}
        )
