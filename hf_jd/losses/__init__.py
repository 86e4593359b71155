"""Loss vectors (per example, per sequence or per task) from Hugging Face model outputs."""

from ._loss_type import infer_loss_type, unwrapped_model
from ._per_example import (
    causal_token_losses,
    per_example_losses,
    sequence_ids,
    sequence_losses,
    sequence_token_sums,
    task_losses,
    token_mean_losses,
)

__all__ = [
    "causal_token_losses",
    "infer_loss_type",
    "per_example_losses",
    "sequence_ids",
    "sequence_losses",
    "sequence_token_sums",
    "task_losses",
    "token_mean_losses",
    "unwrapped_model",
]
