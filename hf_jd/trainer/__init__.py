"""The Hugging Face Trainer integration: ``JDTrainer`` and its JD step."""

from ._checkpoint import AGGREGATOR_STATE_NAME, SCALARIZER_STATE_NAME, CheckpointStateError
from ._jd_trainer import JDTrainer
from ._loss_vector import JDInputError
from ._metrics import step_metrics

__all__ = [
    "AGGREGATOR_STATE_NAME",
    "SCALARIZER_STATE_NAME",
    "CheckpointStateError",
    "JDInputError",
    "JDTrainer",
    "step_metrics",
]
