r"""Per-example loss vectors from Hugging Face model outputs.

For instance-wise risk minimisation the objectives are :math:`L_i(\theta)`, one per example. Each
function returns a tensor of shape ``[B]`` whose entry ``i`` depends only on example ``i``; the mean
of the vector is the usual (example-averaged) training loss. Token-level losses are averaged over
the example's own non-ignored tokens (label ``-100``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _logits(outputs: Any) -> Tensor:
    """The logits of a model output: ``outputs.logits``, or by Hugging Face's tuple convention.

    With ``return_dict=False`` a model returns ``(loss, logits, ...)`` when it computed a loss (it was
    given labels) and ``(logits, ...)`` otherwise; a loss is a 0-dimensional tensor, logits never are.
    """
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)):
        tensors = [value for value in outputs[:2] if isinstance(value, Tensor)]
        if tensors and tensors[0].dim() == 0:  # (loss, logits, ...)
            tensors = tensors[1:]
        logits = tensors[0] if tensors and tensors[0].dim() > 0 else None
    if logits is None:
        raise ValueError(
            "The model output has no `logits`, so hf_jd cannot derive per-example losses. Return logits "
            "from the model, or override `JDTrainer.compute_losses(model, inputs)` (or pass "
            "`compute_losses_func`) to return a loss vector of shape [batch_size]."
        )
    return logits


def _labels(inputs: Mapping[str, Any]) -> Tensor:
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError(
            "The batch has no `labels`, so hf_jd cannot derive per-example losses. Add a `labels` column "
            "(with `label_names` if it is named differently), or override `JDTrainer.compute_losses`."
        )
    return labels


def token_mean_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-example mean cross-entropy over non-ignored tokens; logits ``[B, T, V]``, labels ``[B, T]``.

    An example with no labelled token gets loss 0 (and a zero gradient row).
    """
    batch, length, vocab = logits.shape
    token_losses = F.cross_entropy(
        logits.reshape(batch * length, vocab).float(),
        labels.reshape(batch * length).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(batch, length)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(token_losses.dtype)
    return token_losses.sum(dim=1) / counts.to(token_losses.device)


def _classification(logits: Tensor, labels: Tensor, inputs: Mapping[str, Any], smoothing: float) -> Tensor:
    return F.cross_entropy(logits.float(), labels.view(-1), reduction="none", label_smoothing=smoothing)


def _multi_label(logits: Tensor, labels: Tensor, inputs: Mapping[str, Any], smoothing: float) -> Tensor:
    per_label = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return per_label.reshape(per_label.shape[0], -1).mean(dim=1)


def _regression(logits: Tensor, labels: Tensor, inputs: Mapping[str, Any], smoothing: float) -> Tensor:
    predictions = logits.float().reshape(logits.shape[0], -1)
    targets = labels.float().reshape(labels.shape[0], -1)
    return F.mse_loss(predictions, targets, reduction="none").mean(dim=1)


def _token_mean(logits: Tensor, labels: Tensor, inputs: Mapping[str, Any], smoothing: float) -> Tensor:
    return token_mean_losses(logits, labels, smoothing)


def _causal_lm(logits: Tensor, labels: Tensor, inputs: Mapping[str, Any], smoothing: float) -> Tensor:
    shift_labels = inputs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return token_mean_losses(logits, shift_labels.to(logits.device), smoothing)


_LossFn = Callable[[Tensor, Tensor, Mapping[str, Any], float], Tensor]

# One entry per ``JDTrainingArguments.jd_loss_type``; each maps (logits, labels, inputs,
# label_smoothing) to the ``[B]`` loss vector.
_LOSS_FUNCTIONS: dict[str, _LossFn] = {
    "sequence_classification": _classification,
    "image_classification": _classification,
    "multi_label_classification": _multi_label,
    "regression": _regression,
    "token_classification": _token_mean,
    "masked_lm": _token_mean,
    "seq2seq_lm": _token_mean,
    "causal_lm": _causal_lm,
}


def per_example_losses(
    outputs: Any, inputs: Mapping[str, Any], loss_type: str, label_smoothing: float = 0.0
) -> Tensor:
    """Return the ``[B]`` loss vector for ``loss_type`` (see ``JDTrainingArguments.jd_loss_type``)."""
    logits = _logits(outputs)
    labels = _labels(inputs).to(logits.device)
    loss_fn = _LOSS_FUNCTIONS.get(loss_type)
    if loss_fn is None:
        raise ValueError(f"Unknown loss type {loss_type!r}; valid: {', '.join(sorted(_LOSS_FUNCTIONS))}.")
    return loss_fn(logits, labels, inputs, label_smoothing)


def task_losses(outputs: Any) -> tuple[Tensor, list[str]]:
    """Return the ``[k]`` vector of task losses a multi-task model returned, with the task names.

    Accepted: ``outputs.losses`` / ``outputs["losses"]`` or ``outputs.loss`` holding a dict of scalar
    losses (ordered as given), a tuple/list of scalars, or a 1-D tensor.
    """
    candidates = []
    for key in ("losses", "loss"):
        value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
        if value is not None:
            candidates.append(value)
    for value in candidates:
        if isinstance(value, Mapping):
            names = [str(name) for name in value]
            return _stack_scalars(list(value.values()), names), names
        if isinstance(value, (tuple, list)):
            names = [f"task_{i}" for i in range(len(value))]
            return _stack_scalars(list(value), names), names
        if isinstance(value, Tensor) and value.dim() == 1:
            return value, [f"task_{i}" for i in range(value.numel())]
    raise ValueError(
        "jd_objectives='per_task' needs one loss per task, but the model output has no `losses` (or "
        "`loss`) holding a dict, a tuple or a 1-D tensor of task losses. Return e.g. "
        "`{'loss': {'task_a': loss_a, 'task_b': loss_b}}` from the model, or override "
        "`JDTrainer.compute_losses`."
    )


def _stack_scalars(values: list[Any], names: list[str]) -> Tensor:
    for name, value in zip(names, values):
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"Task loss {name!r} must be a scalar tensor, got {value!r:.80}.")
    return torch.stack([value.reshape(()) for value in values])


# ---------------------------------------------------------------------------------------------- sequences
# Causal LM fine-tuning (TRL's SFT) takes one objective per *sequence*: a batch row, or a segment of a
# padding-free / packed row ``[1, Σ Tᵢ]`` that holds several sequences one after the other.


def causal_token_losses(
    logits: Tensor,
    labels: Tensor | None = None,
    shift_labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Next-token cross entropy of each position and whether it is supervised (label not ``-100``).

    ``logits`` ``[R, T, V]``; ``labels`` ``[R, T]`` are shifted here (position ``t`` predicts ``labels[t + 1]``:
    ``[R, T - 1]`` losses); pre-shifted ``shift_labels`` ``[R, T]`` are scored as they are. Unsupervised
    positions hold 0.
    """
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        raise ValueError("causal_token_losses needs labels (shifted here) or shift_labels (already shifted).")
    targets = targets.to(logits.device)
    rows, length, vocab = logits.shape
    losses = F.cross_entropy(
        logits.reshape(rows * length, vocab).float(),
        targets.reshape(rows * length),
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(rows, length)
    return losses, targets != IGNORE_INDEX


def sequence_ids(
    position_ids: Tensor | None = None,
    cu_seq_lens: Tensor | None = None,
    shape: tuple[int, int] | None = None,
) -> Tensor | None:
    """The index of the sequence each token belongs to, ``[R, T]``, numbered over the batch row by row.

    From ``position_ids`` ``[R, T]``: a sequence starts at the first column of every row and wherever the
    position does not continue the previous token's (``p[t] != p[t - 1] + 1``: TRL's padding-free and
    packed batches restart at 0; padding after the last sequence restarts at every token). Otherwise from
    ``cu_seq_lens`` (the cumulative lengths ``[0, T₁, T₁ + T₂, …, T]`` of a one-row batch of ``shape``).
    ``None`` when neither is given.
    """
    if position_ids is not None:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        return starts.reshape(-1).long().cumsum(0).view(position_ids.shape) - 1
    if cu_seq_lens is None:
        return None
    if shape is None or shape[0] != 1:
        raise ValueError(
            f"cu_seq_lens describes the sequences of ONE flattened row, but the batch has shape {shape}."
        )
    bounds = cu_seq_lens.detach().long().flatten().cpu()
    length = shape[1]
    if (
        bounds.numel() < 2
        or int(bounds[0]) != 0
        or int(bounds[-1]) != length
        or bool((bounds.diff() <= 0).any())
    ):
        raise ValueError(
            f"cu_seq_lens {bounds.tolist()} are not the increasing cumulative lengths [0, ..., {length}] of the "
            f"row of {length} tokens."
        )
    starts = torch.zeros(length, dtype=torch.long)
    starts[bounds[:-1]] = 1
    return (starts.cumsum(0) - 1).view(1, length).to(cu_seq_lens.device)


def sequence_token_sums(
    token_losses: Tensor, supervised: Tensor, sequences: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per sequence, the sum of its token losses and its number of supervised tokens.

    ``sequences`` ``None``: one sequence per row (``[R]`` each, a row without supervised token included).
    Otherwise the sequence index of each position (``[R, T]`` like ``token_losses``, see
    :func:`sequence_ids`): one entry per sequence that has at least one supervised token, in order
    (padding and fully masked sequences give no objective).
    """
    mask = supervised.to(token_losses.device)
    masked = torch.where(
        mask, token_losses, torch.zeros((), dtype=token_losses.dtype, device=token_losses.device)
    )
    if sequences is None:
        return masked.sum(dim=1), mask.sum(dim=1)
    ids = sequences.to(token_losses.device).reshape(-1)
    count = int(ids.max()) + 1 if ids.numel() else 0
    sums = masked.new_zeros(count).index_add(0, ids, masked.reshape(-1))
    counts = torch.zeros(count, dtype=torch.long, device=ids.device).index_add(
        0, ids, mask.reshape(-1).long()
    )
    kept = counts > 0
    return sums[kept], counts[kept]


def sequence_losses(
    sums: Tensor,
    counts: Tensor,
    weighting: str = "sequence",
    total_tokens: Tensor | int | None = None,
    factor: float = 1.0,
) -> Tensor:
    r"""One loss per sequence from :func:`sequence_token_sums`.

    * ``"sequence"``: :math:`L_i = S_i / n_i`, the mean token loss of sequence :math:`i` (0 without tokens);
    * ``"tokens"``: :math:`L_i = S_i \cdot m \cdot c / N` with :math:`m` sequences, :math:`N` =
      ``total_tokens`` (default :math:`\sum_i n_i`) and :math:`c` = ``factor``, so that
      :math:`\frac1m \sum_i L_i = c \sum_i S_i / N`: the token-weighted loss of the batch (TRL's SFT loss).
    """
    if weighting == "sequence":
        return sums / counts.clamp(min=1).to(sums.dtype)
    if weighting != "tokens":
        raise ValueError(f"weighting must be 'sequence' or 'tokens', got {weighting!r}.")
    total = counts.sum() if total_tokens is None else total_tokens
    denominator = torch.as_tensor(total, device=sums.device).to(sums.dtype).clamp(min=1)
    return sums * (sums.numel() * factor) / denominator
