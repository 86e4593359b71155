"""Resuming from a checkpoint continues the exact trajectory, stateful aggregator included."""

from __future__ import annotations

import os

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.trainer import AGGREGATOR_STATE_NAME, CheckpointStateError

# Every stateful aggregator, with settings under which its state moves visibly in six steps (IMTL's loss
# scales move only with set_losses, which JDTrainer does not call: there, only the loading is checked).
STATEFUL = [
    ("random", {"seed": 123}),
    ("gradvac", {"beta": 0.5}),
    ("nash_mtl", {"update_weights_every": 2}),
    ("graddrop", {"seed": 5}),
    ("db_mtl", {}),
    ("gradnorm", {"lr": 0.5}),
    ("excess_mtl", {"robust_step_size": 0.5}),
    ("moco", {}),
    ("modo", {"gamma": 0.1}),
    ("sdmgrad", {}),
    ("cr_mogm", {"alpha": 0.5}),
    ("imtl", {}),
]


def _args(tmp_path, name: str, aggregator: str = "random", kwargs: dict | None = None, **overrides):
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
    kwargs = {"seed": 123} if kwargs is None else kwargs
    return JDTrainingArguments(**values, aggregator=aggregator, aggregator_kwargs=kwargs)


@pytest.mark.parametrize(("aggregator", "kwargs"), STATEFUL, ids=[name for name, _ in STATEFUL])
def test_resume_with_stateful_aggregator_matches_uninterrupted_run(tmp_path, aggregator, kwargs):
    dataset = classification_dataset(24)
    straight = tiny_bert()
    setting = {"aggregator": aggregator, "kwargs": kwargs}
    JDTrainer(model=straight, args=_args(tmp_path, "straight", **setting), train_dataset=dataset).train()

    first = tiny_bert()
    JDTrainer(model=first, args=_args(tmp_path, "resumed", **setting), train_dataset=dataset).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / AGGREGATOR_STATE_NAME).is_file()
    saved = torch.load(checkpoint / AGGREGATOR_STATE_NAME, weights_only=True)
    assert saved["aggregator"] == aggregator and saved["state"]

    resumed_model = tiny_bert(seed=99)  # different init: everything must come from the checkpoint
    trainer = JDTrainer(
        model=resumed_model, args=_args(tmp_path, "resumed", **setting), train_dataset=dataset
    )
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


def _checkpoint_of_a_short_run(tmp_path, **overrides):
    dataset = classification_dataset(24)
    JDTrainer(model=tiny_bert(), args=_args(tmp_path, "run", **overrides), train_dataset=dataset).train()
    return tmp_path / "run" / "checkpoint-3", dataset


class _WritesAMarker:
    """Unpickling this object would create a file: what a malicious checkpoint would do."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_payload_in_the_aggregator_state_does_not_execute(tmp_path):
    checkpoint, dataset = _checkpoint_of_a_short_run(tmp_path)
    marker = tmp_path / "pwned"
    torch.save(
        {"format": "hf_jd.aggregator_state", "state": _WritesAMarker(marker)},
        checkpoint / AGGREGATOR_STATE_NAME,
    )
    trainer = JDTrainer(model=tiny_bert(), args=_args(tmp_path, "run"), train_dataset=dataset)
    with pytest.raises(CheckpointStateError, match=f"{AGGREGATOR_STATE_NAME}.*not loaded"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_resuming_with_another_aggregator_names_the_file_and_both_settings(tmp_path):
    checkpoint, dataset = _checkpoint_of_a_short_run(tmp_path)
    args = _args(tmp_path, "run")
    args.aggregator_kwargs = {"seed": 7}
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=dataset)
    with pytest.raises(
        CheckpointStateError, match=r"holds the state of aggregator 'random'.*'seed': 123.*'seed': 7"
    ):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_stateless_aggregator_records_which_aggregator_wrote_the_checkpoint(tmp_path):
    checkpoint, dataset = _checkpoint_of_a_short_run(tmp_path)
    upgrad = JDTrainingArguments(
        **{**_args(tmp_path, "run").to_dict(), "aggregator": "upgrad", "aggregator_kwargs": {}}
    )
    trainer = JDTrainer(model=tiny_bert(), args=upgrad, train_dataset=dataset)
    with pytest.raises(
        CheckpointStateError, match="aggregator 'random'.*configured with aggregator 'upgrad'"
    ):
        trainer.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "truncated or corrupt"), (b"\x80\x02garbage", "truncated or corrupt|not a plain")],
)
def test_a_truncated_or_corrupt_state_file_is_reported_by_name(tmp_path, content, message):
    checkpoint, dataset = _checkpoint_of_a_short_run(tmp_path)
    path = checkpoint / AGGREGATOR_STATE_NAME
    path.write_bytes(content if content else path.read_bytes()[:40])
    trainer = JDTrainer(model=tiny_bert(), args=_args(tmp_path, "run"), train_dataset=dataset)
    with pytest.raises(CheckpointStateError, match=message) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(path) in str(error.value)


def test_a_state_file_of_another_format_is_refused(tmp_path):
    checkpoint, dataset = _checkpoint_of_a_short_run(tmp_path)
    torch.save(
        {"gramian_weighting._extra_state": {}}, checkpoint / AGGREGATOR_STATE_NAME
    )  # an older hf_jd's file
    trainer = JDTrainer(model=tiny_bert(), args=_args(tmp_path, "run"), train_dataset=dataset)
    with pytest.raises(CheckpointStateError, match="is not an hf_jd aggregator state"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
