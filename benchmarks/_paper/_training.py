"""One training run of the paper benchmarks, through ``JDTrainer``, with a per-epoch record of the training loss.

Every aggregator (``mean`` included: it is plain SGD, the paper's baseline) runs through
``hf_jd.JDTrainer`` with a constant learning rate, no warm-up, no weight decay and no gradient clipping
(Quinton & Rey, arXiv:2406.16232, Section 5: "SGD without momentum"). Scalarizers (one backward of
``scalarizer(losses)``) run through the same ``JDTrainer`` with ``JDTrainingArguments(scalarizer=...)``:
same batches, same optimizer, the scalarizer's hooks (DWA per epoch, FAMO per step) called by the trainer.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from transformers import PrinterCallback, TrainerCallback

from hf_jd import JDTrainer, JDTrainingArguments

from ._data import TensorDictDataset

Evaluate = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Method:
    """What turns the loss vector into an update: an aggregator (JD) or a scalarizer (one backward)."""

    kind: str  # "aggregator" | "scalarizer"
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: further ``JDTrainingArguments`` fields of the method, e.g. ``{"jd_gramian": "representation"}``
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.arguments.get("jd_gramian") == "representation":
            return f"{self.name} (representation Gramian)"
        return self.name if self.kind == "aggregator" else f"{self.name} (scalarizer)"


@dataclass(frozen=True)
class Schedule:
    """The optimizer settings shared by every method of one comparison."""

    learning_rate: float
    epochs: int
    batch_size: int = 32
    optim: str = "sgd"  # a ``TrainingArguments.optim`` value: "sgd" (plain SGD) or "adamw_torch"
    seed: int = 0


@dataclass
class RunRecord:
    """Per-epoch training loss (index 0 = at initialisation), per-epoch wall time, and the diverged flag."""

    curve: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    diverged: bool = False
    error: str = ""


class EpochRecorder:
    """Records ``evaluate(model)`` before training and after every epoch, and each epoch's wall time.

    The evaluation runs outside the timed interval (between ``epoch_end`` and the next ``epoch_start``).
    """

    def __init__(self, evaluate: Evaluate) -> None:
        self.evaluate = evaluate
        self.record = RunRecord()
        self._start = 0.0

    def begin(self, model: nn.Module) -> None:
        self.record.curve.append(self.evaluate(model))

    def epoch_start(self) -> None:
        self._start = time.perf_counter()

    def epoch_end(self, model: nn.Module) -> None:
        self.record.epoch_seconds.append(time.perf_counter() - self._start)
        self.record.curve.append(self.evaluate(model))


class _RecorderCallback(TrainerCallback):
    """Adapts :class:`EpochRecorder` to the Trainer's callback events."""

    def __init__(self, recorder: EpochRecorder) -> None:
        self.recorder = recorder

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        assert model is not None
        self.recorder.begin(model)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.epoch_start()

    def on_epoch_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        assert model is not None
        self.recorder.epoch_end(model)


def jd_arguments(output_dir: str, schedule: Schedule, method: Method, objectives: str) -> JDTrainingArguments:
    """``JDTrainingArguments`` of one run: constant rate, no warm-up, no weight decay, no clipping, no I/O."""
    if method.kind == "aggregator":
        chosen: dict[str, Any] = {"aggregator": method.name, "aggregator_kwargs": dict(method.kwargs)}
    else:
        chosen = {"scalarizer": method.name, "scalarizer_kwargs": dict(method.kwargs)}
    return JDTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=schedule.batch_size,
        num_train_epochs=schedule.epochs,
        learning_rate=schedule.learning_rate,
        optim=schedule.optim,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=schedule.seed,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        jd_objectives=objectives,
        **chosen,
        **method.arguments,
    )


def _is_divergence(error: BaseException) -> bool:
    """A non-finite loss or gradient (hf_jd's ``FloatingPointError``, the scalarizers' "non-finite" check)."""
    message = str(error).lower()
    return isinstance(error, FloatingPointError) or "non-finite" in message or " nan" in message


def _diverged(record: RunRecord, epochs: int, error: BaseException) -> RunRecord:
    record.diverged = True
    record.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    record.curve += [math.inf] * (epochs + 1 - len(record.curve))
    return record


def fit(
    model: nn.Module,
    train: TensorDictDataset,
    schedule: Schedule,
    method: Method,
    evaluate: Evaluate,
    objectives: str = "per_example",
    compute_losses_func: Callable[[Any, dict[str, Any]], Tensor] | None = None,
) -> RunRecord:
    """Train ``model`` in place with ``method``; returns the per-epoch record (``diverged`` on a non-finite loss).

    Aggregators and scalarizers alike run through ``JDTrainer``.
    """
    recorder = EpochRecorder(evaluate)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = JDTrainer(
            model=model,
            args=jd_arguments(output_dir, schedule, method, objectives),
            train_dataset=train,
            callbacks=[_RecorderCallback(recorder)],
            compute_losses_func=compute_losses_func,
        )
        trainer.remove_callback(PrinterCallback)  # no end-of-training metrics printout per run
        try:
            trainer.train()
        except (FloatingPointError, ValueError, RuntimeError) as error:
            if not _is_divergence(error):
                raise
            return _diverged(recorder.record, schedule.epochs, error)
    return _check_finite(recorder.record, schedule.epochs)


def _check_finite(record: RunRecord, epochs: int) -> RunRecord:
    if not all(math.isfinite(value) for value in record.curve):
        return _diverged(record, epochs, FloatingPointError("non-finite training loss"))
    return record
