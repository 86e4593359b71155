"""The Hugging Face Trainer integration: ``JDTrainer``, ``JDTrainerMixin`` and their JD step."""

from ._checkpoint import AGGREGATOR_STATE_NAME, SCALARIZER_STATE_NAME, CheckpointStateError
from ._jd_trainer import JDTrainer
from ._loss_vector import JDInputError
from ._metrics import step_metrics
from ._mixin import JDTrainerMixin

__all__ = [
    "AGGREGATOR_STATE_NAME",
    "SCALARIZER_STATE_NAME",
    "CheckpointStateError",
    "JDInputError",
    "JDTrainer",
    "JDTrainerMixin",
    "step_metrics",
]
