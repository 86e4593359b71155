"""JDTrainerMixin on a Trainer subclass of its own: the parent's step runs around the JD update."""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from transformers import Trainer

from hf_jd import JDTrainer, JDTrainerMixin, JDTrainingArguments
from hf_jd.trainer._compat import refuse_unservable_setups

TOY_CARD = "Written by CountingTrainer."


class CountingTrainer(Trainer):
    """A Trainer subclass as TRL writes them: its ``training_step`` wraps ``super()`` in a context and counts
    the steps, its ``compute_loss`` records a metric that its ``log`` reports, it tags its cards and writes
    them itself."""

    _tag_names = ["toy", "counting"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0
        self.in_context = False
        self.forward_in_context: list[bool] = []
        self.grads_written_in_context: list[bool] = []
        self.accuracies: list[float] = []

    @contextlib.contextmanager
    def _around_the_step(self):
        self.in_context = True
        try:
            yield
        finally:
            self.in_context = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._around_the_step():
            loss = super().training_step(model, inputs, num_items_in_batch)
            written = any(p.grad is not None and bool(p.grad.any()) for p in model.parameters())
            self.grads_written_in_context.append(written)
        self.steps += 1
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self.forward_in_context.append(self.in_context)
        self.accuracies.append(float((outputs.logits.argmax(-1) == labels).float().mean()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self.accuracies and "loss" in logs:
            logs = {**logs, "toy/accuracy": sum(self.accuracies) / len(self.accuracies)}
            self.accuracies = []
        super().log(logs, *args, **kwargs)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """Its own card, without ``super()`` (as TRL's trainers write theirs)."""
        self.card_tags = list(tags or self._tag_names)
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(f"---\ntags: {self.card_tags}\n---\n{TOY_CARD}\n")


class JDCounting(JDTrainerMixin, CountingTrainer):
    pass


def _args(tmp_path, **overrides) -> JDTrainingArguments:
    values = dict(
        max_steps=3,
        gradient_accumulation_steps=2,
        learning_rate=0.3,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_strategy="steps",
        logging_steps=1,
    )
    values.update(overrides)
    return JDTrainingArguments(**base_args(tmp_path, **values))


def _train(cls, tmp_path, **overrides):
    trainer = cls(
        model=tiny_bert(), args=_args(tmp_path, **overrides), train_dataset=classification_dataset(24)
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
def test_the_parents_step_runs_around_an_update_equal_to_jdtrainers(tmp_path, engine):
    reference = _train(JDTrainer, tmp_path / "reference", jd_engine=engine)
    combined = _train(JDCounting, tmp_path / "combined", jd_engine=engine)
    micro_batches = 3 * 2
    assert combined.steps == micro_batches
    assert (
        combined.forward_in_context == [True] * micro_batches
    )  # the JD forward runs through its compute_loss
    assert combined.grads_written_in_context == [True] * micro_batches  # the JD update runs inside its step
    for (name, expected), actual in zip(reference.model.named_parameters(), combined.model.parameters()):
        assert torch.equal(actual, expected), f"parameter {name} differs from JDTrainer's"
    logged = [entry for entry in combined.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all("toy/accuracy" in entry and "jd/max_loss" in entry for entry in logged)
    reference_losses = [entry["loss"] for entry in reference.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in logged] == reference_losses
    # Nothing patched outlives the step: evaluation uses the parent's compute_loss, the real backward is back.
    assert "compute_loss" not in vars(combined) and "backward" not in vars(combined.accelerator)
    combined.accuracies = []
    combined.evaluate(classification_dataset(8))
    assert len(combined.accuracies) == 1  # one evaluation batch, through the parent's compute_loss


def test_the_other_class_order_is_refused_at_class_creation():
    with pytest.raises(TypeError, match=r"class CountingJD\(JDTrainerMixin, CountingTrainer\)"):

        class CountingJD(CountingTrainer, JDTrainerMixin):  # Trainer.training_step would shadow the mixin's
            pass


def test_a_parent_compute_loss_that_pops_the_labels_leaves_them_to_the_loss_vector(tmp_path):
    class PoppingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = torch.nn.functional.cross_entropy(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss

    class Combined(JDTrainerMixin, PoppingTrainer):
        pass

    reference = _train(JDTrainer, tmp_path / "reference", max_steps=2)
    combined = _train(Combined, tmp_path / "combined", max_steps=2)
    for expected, actual in zip(reference.model.parameters(), combined.model.parameters()):
        assert torch.equal(actual, expected)


def test_an_evaluation_only_compute_loss_of_a_jdtrainer_subclass_does_not_change_training(tmp_path):
    class EvaluationLoss(JDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            raise AssertionError("a JD training step must not call the subclass's compute_loss")

    reference = _train(JDTrainer, tmp_path / "reference", max_steps=2)
    custom = _train(EvaluationLoss, tmp_path / "custom", max_steps=2)
    for expected, actual in zip(reference.model.parameters(), custom.model.parameters()):
        assert torch.equal(actual, expected)


def test_a_scalarizer_run_goes_through_the_parents_step(tmp_path):
    reference = _train(JDTrainer, tmp_path / "reference", scalarizer="mean", max_steps=2)
    combined = _train(JDCounting, tmp_path / "combined", scalarizer="mean", max_steps=2)
    assert combined.steps == 4 and combined.forward_in_context == [True] * 4
    for expected, actual in zip(reference.model.parameters(), combined.model.parameters()):
        assert torch.equal(actual, expected)


def test_a_parent_step_that_skips_the_backward_is_an_error(tmp_path):
    class NoBackward(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return torch.zeros(())

    class Combined(JDTrainerMixin, NoBackward):
        pass

    with pytest.raises(RuntimeError, match="no Jacobian-descent update was made"):
        _train(Combined, tmp_path, max_steps=1)


def test_the_card_has_the_tags_of_both_classes_and_both_sections(tmp_path):
    assert JDCounting._tag_names == ["hf_jd", "jacobian-descent", "toy", "counting"]
    trainer = JDCounting(model=tiny_bert(), args=_args(tmp_path), train_dataset=classification_dataset(8))
    trainer.create_model_card(model_name="tiny")
    text = (tmp_path / "out" / "README.md").read_text()
    assert TOY_CARD in text and "## Jacobian descent" in text  # the parent's card, then hf_jd's section
    assert {"hf_jd", "jacobian-descent", "toy", "counting", "upgrad"} <= set(trainer.card_tags)


def test_tags_of_every_class_in_either_order_of_the_bases():
    class Tags(JDCounting):  # a subclass adds its own tags to the merged ones
        _tag_names = ["mine"]

    class Other:
        _tag_names = ["other"]

    class Both(JDTrainerMixin, Other):  # a non-Trainer base may come in either order
        pass

    class BothReversed(Other, JDTrainerMixin):
        pass

    assert Tags._tag_names == ["mine", "hf_jd", "jacobian-descent", "toy", "counting"]
    assert Both._tag_names == ["hf_jd", "jacobian-descent", "other"]
    assert BothReversed._tag_names == ["other", "hf_jd", "jacobian-descent"]


def test_jdtrainer_keeps_its_own_tags():
    assert JDTrainer._tag_names == ["hf_jd", "jacobian-descent"]


@pytest.mark.parametrize("optim", ["lomo", "adalomo", "galore_adamw_layerwise"])
def test_optimizers_that_step_inside_backward_are_refused(tmp_path, optim):
    args = _args(tmp_path, optim=optim, optim_target_modules=["attention"])
    with pytest.raises(ValueError, match="during the backward pass"):
        JDTrainer(model=tiny_bert(), args=args, train_dataset=classification_dataset(8))


def test_dataparallel_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(JDTrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="DataParallel"):
        JDTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=classification_dataset(8))


def test_sagemaker_model_parallelism_is_refused(monkeypatch):
    monkeypatch.setattr("transformers.utils.is_sagemaker_mp_enabled", lambda: True)
    trainer = SimpleNamespace(args=SimpleNamespace(optim="sgd"), accelerator=SimpleNamespace())
    with pytest.raises(ValueError, match="SageMaker model parallelism"):
        refuse_unservable_setups(trainer)


@pytest.mark.parametrize(("kind", "name"), [("cp", "context"), ("sp", "sequence"), ("tp", "tensor")])
def test_context_sequence_and_tensor_parallelism_are_refused(kind, name):
    config = SimpleNamespace(cp_enabled=False, sp_enabled=False, tp_enabled=False)
    setattr(config, f"{kind}_enabled", True)
    trainer = SimpleNamespace(
        args=SimpleNamespace(optim="sgd"), accelerator=SimpleNamespace(parallelism_config=config)
    )
    with pytest.raises(ValueError, match=f"{name} parallelism"):
        refuse_unservable_setups(trainer)
    config.__dict__[f"{kind}_enabled"] = False
    refuse_unservable_setups(trainer)  # data parallelism alone is served
