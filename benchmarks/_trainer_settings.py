"""Trainer settings shared by the step benchmarks: plain SGD, a constant rate, clipping, no I/O."""

from __future__ import annotations

from typing import Any

LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0


def timed_trainer_arguments(
    output_dir: str, batch: int, max_steps: int, use_cpu: bool, seed: int
) -> dict[str, Any]:
    """``TrainingArguments`` fields of a timed run: the same optimizer step for every variant, nothing logged or saved."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_steps=max_steps,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        optim="sgd",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=seed,
    )
