"""Never silently wrong, never a crash that ``auto`` could avoid, nothing non-finite in the parameters.

Each test isolates one mechanism on a toy module (``_toy_models``) and compares with the explicit
Jacobian engine, which makes no assumption about the model or the loss vector.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _toy_models import (
    NaNBackward,
    RepeatsItsBias,
    ToyClassifier,
    in_batch_contrastive,
    parameters_of,
    per_example_cross_entropy,
    toy_dataset,
)
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from torch import nn

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.gramian import GramianEngineError, GramianMismatchError
from hf_jd.trainer import JDInputError


def _train(model, tmp_path, losses=per_example_cross_entropy, dataset=None, name="run", **overrides):
    values = base_args(tmp_path, output_dir=str(tmp_path / name), max_steps=3, learning_rate=0.1, optim="sgd")
    values.update(overrides)
    trainer = JDTrainer(
        model=model,
        args=JDTrainingArguments(**values),
        train_dataset=dataset if dataset is not None else toy_dataset(),
        compute_losses_func=losses,
    )
    trainer.train()
    return trainer


def _assert_same_parameters(model, reference, atol=1e-5):
    for (name, actual), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- auto recovers from a crashing Gramian engine
def test_auto_recovers_when_broadcast_expansion_breaks_the_model(tmp_path):
    torch.manual_seed(0)
    reference = RepeatsItsBias(dropout=0.3)
    model = RepeatsItsBias(dropout=0.3)
    model.load_state_dict(reference.state_dict())
    _train(reference, tmp_path, name="jacobian", jd_engine="jacobian")
    with pytest.warns(RuntimeWarning, match="failed on the first step.*without broadcast expansion"):
        trainer = _train(model, tmp_path, name="auto")
    assert trainer.jd_engine.name == "gramian"
    assert trainer._engines.choice.expand_broadcast is False
    # the crashed attempt left no trace: same dropout masks, same gradients as the Jacobian engine's run
    _assert_same_parameters(model, reference)


def test_expand_broadcast_is_reachable_from_the_arguments(tmp_path):
    torch.manual_seed(0)
    model = RepeatsItsBias()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer = _train(model, tmp_path, jd_engine="gramian", jd_expand_broadcast=False)
    assert trainer.jd_engine.name == "gramian"


# ---------------------------------------------------------------- in-batch losses: self-check
def test_in_batch_loss_makes_auto_switch_to_the_jacobian_engine(tmp_path):
    torch.manual_seed(0)
    reference, model = ToyClassifier(), ToyClassifier()
    model.load_state_dict(reference.state_dict())
    _train(reference, tmp_path, losses=in_batch_contrastive, name="jacobian", jd_engine="jacobian")
    with pytest.warns(RuntimeWarning, match="differs from row-by-row autograd"):
        trainer = _train(model, tmp_path, losses=in_batch_contrastive, name="auto")
    assert trainer.jd_engine.name == "jacobian"
    _assert_same_parameters(model, reference)


def test_in_batch_loss_makes_the_gramian_engine_raise(tmp_path):
    torch.manual_seed(0)
    model = ToyClassifier()
    before = parameters_of(model)
    with pytest.raises(GramianMismatchError, match="loss i must depend on example i only"):
        _train(model, tmp_path, losses=in_batch_contrastive, jd_engine="gramian")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_verify_every_catches_a_loss_that_starts_mixing_examples_later(tmp_path):
    torch.manual_seed(0)
    state = {}

    def losses(outputs, inputs):
        step = state["trainer"].state.global_step
        return (
            in_batch_contrastive(outputs, inputs) if step >= 2 else per_example_cross_entropy(outputs, inputs)
        )

    args = JDTrainingArguments(**base_args(tmp_path, max_steps=4, learning_rate=0.1), jd_verify_every=2)
    trainer = JDTrainer(
        model=ToyClassifier(), args=args, train_dataset=toy_dataset(), compute_losses_func=losses
    )
    state["trainer"] = trainer
    with pytest.warns(RuntimeWarning, match="differs from row-by-row autograd"):
        trainer.train()
    assert trainer.jd_engine.name == "jacobian"


def test_per_example_losses_pass_the_self_check(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer = _train(ToyClassifier(dropout=0.2), tmp_path, jd_verify_every=1)
    assert trainer.jd_engine.name == "gramian"


# ---------------------------------------------------------------- checkpointing, batch norm, compile
def test_reentrant_checkpointing_is_refused_with_advice_that_works(tmp_path):
    with pytest.raises(ValueError, match="use_reentrant': False"):
        JDTrainingArguments(
            **base_args(tmp_path),
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
    model = tiny_bert()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant': False"):
        JDTrainer(
            model=model,
            args=JDTrainingArguments(**base_args(tmp_path)),
            train_dataset=classification_dataset(8),
        )


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_the_advised_non_reentrant_checkpointing_trains_exactly(tmp_path, engine):
    plain, checkpointed = tiny_bert(), tiny_bert()
    common = dict(max_steps=2, learning_rate=0.1, jd_engine=engine)
    for model, extra in ((plain, {}), (checkpointed, {"gradient_checkpointing": True})):
        args = JDTrainingArguments(**base_args(tmp_path, **common, **extra))
        JDTrainer(model=model, args=args, train_dataset=classification_dataset(8)).train()
    _assert_same_parameters(checkpointed, plain)


def _batch_norm_classifier() -> ToyClassifier:
    torch.manual_seed(0)
    model = ToyClassifier(middle=nn.BatchNorm1d(8))
    model.middle.running_mean.uniform_(-0.5, 0.5)
    return model


def test_frozen_batch_norm_makes_the_gramian_engine_usable_and_exact(tmp_path):
    reference, model = _batch_norm_classifier(), _batch_norm_classifier()
    stats = model.middle.running_mean.clone()
    _train(reference, tmp_path, name="jacobian", jd_engine="jacobian", jd_freeze_batch_norm=True)
    trainer = _train(model, tmp_path, name="gramian", jd_engine="gramian", jd_freeze_batch_norm=True)
    assert trainer.jd_engine.name == "gramian"
    assert torch.equal(model.middle.running_mean, stats)
    _assert_same_parameters(model, reference)


def test_batch_norm_in_train_mode_points_to_the_freeze_option(tmp_path):
    with pytest.raises(GramianEngineError, match="jd_freeze_batch_norm=True"):
        _train(_batch_norm_classifier(), tmp_path, jd_engine="gramian")


def test_compiled_model_infers_its_loss_type_and_trains(tmp_path):
    args = JDTrainingArguments(
        **base_args(tmp_path, max_steps=1), torch_compile=True, torch_compile_backend="eager"
    )
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=classification_dataset(8))
    with pytest.warns(RuntimeWarning, match="compiled with torch.compile"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.jd_engine.name == "jacobian"


# ---------------------------------------------------------------- nothing non-finite reaches the parameters
@pytest.mark.parametrize("aggregator", ["mean", "sum", "random", "trimmed_mean", "upgrad"])
@pytest.mark.parametrize("engine", ["jacobian", "auto"])
def test_finite_losses_with_a_non_finite_jacobian_stop_before_any_update(tmp_path, aggregator, engine):
    if aggregator == "trimmed_mean" and engine == "auto":
        pytest.skip("trimmed_mean always runs on the Jacobian engine")
    torch.manual_seed(0)
    model = ToyClassifier(middle=NaNBackward())
    before = parameters_of(model)
    with pytest.raises(FloatingPointError, match="global step 0 although the losses are finite"):
        _train(model, tmp_path, aggregator=aggregator, jd_engine=engine)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_huge_finite_losses_give_the_float64_step(tmp_path, engine):
    """A loss of ~1e25 overflows float32 products of its gradient; the step must equal the float64 one."""

    def huge(outputs, inputs):
        losses = per_example_cross_entropy(outputs, inputs)
        return losses * torch.tensor([1e25] + [1.0] * (losses.numel() - 1), dtype=losses.dtype)

    torch.manual_seed(0)
    single, double = ToyClassifier(), ToyClassifier()
    double.load_state_dict(single.state_dict())
    double.double()
    dataset = toy_dataset(4)
    common = dict(losses=huge, dataset=dataset, jd_engine=engine, max_steps=1, learning_rate=1e-27)
    _train(double, tmp_path, name="double", **common)
    _train(single, tmp_path, name="single", **common)
    for (name, actual), (_, expected) in zip(single.named_parameters(), double.named_parameters()):
        assert torch.isfinite(actual).all(), name
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- bad settings fail early, naming the field
@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_per_example_loss_vector_of_the_wrong_length_is_refused_by_both_engines(tmp_path, engine):
    def too_short(outputs, inputs):
        return per_example_cross_entropy(outputs, inputs)[:-1]

    with pytest.raises(JDInputError, match="the batch has 4 examples but the loss vector has 3 entries"):
        _train(ToyClassifier(), tmp_path, losses=too_short, jd_engine=engine)


def test_bad_aggregator_kwargs_fail_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match="aggregator_kwargs=.*norm_eps must be a finite number"):
        JDTrainingArguments(**base_args(tmp_path), aggregator_kwargs={"norm_eps": "x"})
    with pytest.raises(ValueError, match="pref_vector is all zeros"):
        JDTrainingArguments(**base_args(tmp_path), aggregator_kwargs='{"pref_vector": [0, 0, 0, 0]}')


def test_weights_sized_to_the_batch_are_checked_against_the_data_up_front(tmp_path):
    def make(n, **overrides):
        args = JDTrainingArguments(
            **base_args(tmp_path, **overrides), aggregator_kwargs={"pref_vector": [1, 2, 3, 4]}
        )
        return JDTrainer(
            model=ToyClassifier(),
            args=args,
            train_dataset=toy_dataset(n),
            compute_losses_func=per_example_cross_entropy,
        )

    with pytest.raises(ValueError, match="last batch of each epoch has only 2.*dataloader_drop_last=True"):
        make(10)
    with pytest.raises(ValueError, match="built for 4 objectives.*has 2 examples"):
        make(8, per_device_train_batch_size=2)
    make(10, dataloader_drop_last=True, max_steps=3).train()


def test_fsdp1_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="JDTrainer does not support FSDP version 1.*FSDP2"):
        JDTrainingArguments(**base_args(tmp_path), fsdp=True, fsdp_config={"version": 1})


def test_fsdp1_enabled_through_accelerate_is_refused_and_deepspeed_is_served(tmp_path):
    from types import SimpleNamespace

    from hf_jd.trainer._backends import select_backend

    args = JDTrainingArguments(**base_args(tmp_path))
    model = nn.Linear(2, 2)
    fsdp1 = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1), deepspeed_plugin=None)
    with pytest.raises(ValueError, match="does not support FSDP1.*fsdp_version: 2"):
        select_backend(SimpleNamespace(state=fsdp1), model).check(args, None)
    zero2 = SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=2))
    backend = select_backend(SimpleNamespace(state=zero2), model)
    assert backend.name == "deepspeed" and backend.zero_stage == 2
    backend.check(args, None)  # served: UPGrad, per example, the Gramian engine
    plain = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=None))
    select_backend(plain, model).check(args, None)
