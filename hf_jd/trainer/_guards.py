"""Checks run when a ``JDTrainer`` is built: settings that cannot work fail before any data is prepared.

What a sharding backend does not serve (FSDP1, FSDP2's and DeepSpeed's unserved settings) is refused by the
backend itself (``hf_jd/trainer/_backends/``); the checks here hold under every backend."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..aggregation import Aggregator
from ..gramian import REENTRANT_ADVICE, reentrant_checkpointing_module, representation_module
from ..losses import infer_loss_type
from ..training_args import JDTrainingArguments


def check_process_count(accelerate_processes: int, launched_processes: int) -> None:
    """Refuse a multi-process launch that Accelerate runs as independent single processes.

    ``accelerate launch --config_file multi_gpu.yaml`` (or ``torchrun``) on a machine without GPUs, without
    ``use_cpu``, starts N processes that each train alone on the same batches and write the same
    ``output_dir``: the launcher says ``WORLD_SIZE=N``, Accelerate says one process.
    """
    if launched_processes > 1 and accelerate_processes == 1:
        raise ValueError(
            f"This process was launched as one of {launched_processes} (WORLD_SIZE={launched_processes}), but "
            "Accelerate runs it as a single process (no GPU was found and use_cpu is not set): every process "
            "would train on its own, on the same batches, writing the same output_dir. On CPUs use "
            f"`hf-jd train --config RECIPE --num_processes {launched_processes}` (it passes --use_cpu True) or "
            "add --use_cpu True; on GPUs check that CUDA is visible to every process (CUDA_VISIBLE_DEVICES)."
        )


def launched_processes(process_group_size: int) -> int:
    """How many processes the launcher started: ``WORLD_SIZE`` (torchrun, accelerate launch) or the group's size."""
    try:
        from_env = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        from_env = 1
    return max(from_env, process_group_size)


def check_reentrant_checkpointing(model: nn.Module) -> None:
    """Refuse a model on which reentrant activation checkpointing was enabled by hand."""
    name = reentrant_checkpointing_module(model)
    if name is not None:
        raise ValueError(REENTRANT_ADVICE.format(name=name))


def check_per_task_model(model: nn.Module, args: JDTrainingArguments, custom_losses: bool) -> None:
    """``per_task`` needs task losses: a stock Hugging Face head returns one scalar loss."""
    if args.jd_objectives != "per_task" or custom_losses:
        return
    loss_type = infer_loss_type(model)
    if loss_type is not None:
        raise ValueError(
            f"jd_objectives='per_task' needs one loss per task, but {type(getattr(model, '_orig_mod', model)).__name__} "
            f"is a single-task Hugging Face model ({loss_type}) that returns one scalar loss. Use "
            "jd_objectives='per_example' (one loss per example), give a model that returns "
            "{'loss': {'task_a': ..., 'task_b': ...}}, or pass compute_losses_func returning the task losses."
        )


def check_representation_module(model: nn.Module, args: JDTrainingArguments) -> None:
    """``jd_representation`` names a submodule of the model (checked before any data is prepared)."""
    if args.jd_gramian == "representation" and args.jd_representation is not None:
        representation_module(getattr(model, "_orig_mod", model), args.jd_representation)


def check_fixed_rows(
    aggregator: Aggregator, args: JDTrainingArguments, train_dataset: Any, world_size: int
) -> None:
    """A weighting sized to the batch (pref_vector, constant weights) must fit every micro-batch."""
    required = aggregator.required_rows
    if required is None or args.jd_objectives != "per_example":
        return
    processes = world_size if args.jd_scope == "global" else 1
    rows = args.per_device_train_batch_size * processes
    where = "per_device_train_batch_size" + (f" × {processes} processes" if processes > 1 else "")
    if required != rows:
        raise ValueError(
            f"aggregator {args.aggregator!r} is built for {required} objectives (aggregator_kwargs), but each JD step "
            f"has {rows} examples ({where}). Give one weight per example of a step, or change the batch size."
        )
    size = _length(train_dataset)
    batch = args.per_device_train_batch_size * world_size
    if size is not None and size % batch and not args.dataloader_drop_last:
        raise ValueError(
            f"aggregator {args.aggregator!r} is built for {required} objectives, but the training set has {size} "
            f"examples, so the last batch of each epoch has only {size % batch}. Set dataloader_drop_last=True, or "
            "make the dataset size a multiple of the global batch size."
        )


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None
