"""Loss vectors (per example or per task) from Hugging Face model outputs."""

from ._loss_type import infer_loss_type
from ._per_example import per_example_losses, task_losses, token_mean_losses

__all__ = ["infer_loss_type", "per_example_losses", "task_losses", "token_mean_losses"]
