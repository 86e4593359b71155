"""Checks on the loss vector of a micro-batch, with messages that say what to change."""

from __future__ import annotations

from typing import Any, TypeAlias

import torch
from torch import Tensor

from .._objectives import ObjectiveLosses
from ..gramian import infer_batch_size, loss_count_mismatch

#: What ``compute_losses`` returns: one loss per example (or per task), or losses over row groups.
LossVector: TypeAlias = Tensor | ObjectiveLosses


class JDInputError(ValueError):
    """The loss vector or the batch is not what Jacobian descent needs (never retried with another engine)."""


def loss_values(losses: LossVector) -> Tensor:
    """The loss tensor ``[m]`` (``[K]`` for :class:`~hf_jd.ObjectiveLosses`)."""
    return losses.losses if isinstance(losses, ObjectiveLosses) else losses


def row_objective_of(losses: LossVector) -> Tensor | None:
    """The objective map of :class:`~hf_jd.ObjectiveLosses`: its row map ``[n_rows]``, or its token map
    ``[n_rows, T]`` for token segments (``None`` for a plain loss tensor). The trainer carries either to
    the JD step, which hands it to the engine by :func:`objective_maps`."""
    if not isinstance(losses, ObjectiveLosses):
        return None
    return losses.row_objective if losses.token_objective is None else losses.token_objective


def objective_maps(objective_map: Tensor | None) -> dict[str, Tensor]:
    """The engine's keyword for a map of :func:`row_objective_of`: ``row_objective`` (1-D, rows) or
    ``token_objective`` (2-D, tokens); nothing for ``None``."""
    if objective_map is None:
        return {}
    return {"row_objective" if objective_map.dim() == 1 else "token_objective": objective_map}


def check_loss_vector(losses: Any, inputs: dict[str, Any], objectives: str) -> LossVector:
    """Return ``losses`` when it is a non-empty 1-D tensor connected to the parameters, else raise.

    Per example, the vector must also have one entry per example of the batch. An
    :class:`~hf_jd.ObjectiveLosses` (``K`` losses over groups of rows) is per example only; its rows are
    those of the model's forward, which may differ from the trainer's inputs (TRL's DPO concatenates the
    chosen and rejected sequences into one forward of ``2B`` rows), so the Gramian engine checks them
    against the batch it records.
    """
    if isinstance(losses, ObjectiveLosses):
        if objectives != "per_example":
            raise JDInputError(
                f"compute_losses returned ObjectiveLosses (losses over groups of batch rows), which needs "
                f"jd_objectives='per_example', not {objectives!r}: per task, every loss already reads the whole "
                "batch, so return the task losses as a plain tensor instead."
            )
        _check_tensor(losses.losses)
        return losses
    _check_tensor(losses)
    if objectives == "per_example":
        batch = infer_batch_size((), inputs)
        if batch is not None and batch != losses.numel():
            raise JDInputError(loss_count_mismatch(batch, losses.numel()))
    return losses


def _check_tensor(losses: Any) -> None:
    """Raise unless ``losses`` is a non-empty 1-D tensor that requires grad."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            "compute_losses must return a torch.Tensor of shape [m] (or hf_jd.ObjectiveLosses), got "
            f"{type(losses).__name__}."
        )
    if losses.dim() == 0:
        raise JDInputError(
            "compute_losses returned a scalar loss, but Jacobian descent needs a loss vector: one loss per "
            "example (compute it with reduction='none', e.g. F.cross_entropy(logits, labels, "
            "reduction='none')) or one per task (return a dict/tuple of task losses with "
            "jd_objectives='per_task')."
        )
    if losses.dim() != 1:
        raise JDInputError(
            f"compute_losses must return a 1-D loss vector of shape [m], got shape {tuple(losses.shape)}. "
            "Reduce the other dimensions per example (e.g. .mean(dim=1))."
        )
    if losses.numel() == 0:
        raise JDInputError(
            "The batch is empty: compute_losses returned no loss. Check the dataset and collator."
        )
    if not losses.requires_grad:
        raise JDInputError(
            "The loss vector does not require grad: it is not connected to any trainable parameter."
        )


def loss_derivation_message(model: Any, loss_type: str, error: BaseException) -> str:
    """What to set when the per-example losses of ``loss_type`` cannot be derived from the outputs."""
    name = type(getattr(model, "module", model)).__name__
    return (
        f"hf_jd could not derive per-example losses of type {loss_type!r} from the outputs of {name} "
        f"({type(error).__name__}: {error}). Set --jd_loss_type to the model's task (e.g. "
        "sequence_classification, causal_lm, token_classification), pass "
        "compute_losses_func=(outputs, inputs) -> Tensor[batch_size], or override JDTrainer.compute_losses."
    )


def non_finite_loss_message(losses: Tensor, global_step: int) -> str:
    """What went wrong when the loss vector (of this rank, or of another one) holds inf/NaN."""
    bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
    where = f"indices {bad} of this rank's loss vector" if bad else "another rank's loss vector"
    return (
        f"Non-finite loss at global step {global_step} ({where}; values "
        f"{losses.detach()[bad].tolist() if bad else 'n/a'}). No update was written, parameters are "
        "unchanged. Check the inputs of these examples, lower the learning rate, or resume from the last "
        "checkpoint."
    )


def non_finite_update_message(what: str, global_step: int) -> str:
    """What went wrong when the losses are finite but the Jacobian, Gramian or weights are not."""
    return (
        f"Non-finite values in {what} at global step {global_step} although the losses are finite (a gradient "
        "overflowed, or the model produced inf/NaN in its backward). No update was written, parameters are "
        "unchanged. Lower the learning rate, check the model for numerically unstable operations, or resume "
        "from the last checkpoint."
    )
