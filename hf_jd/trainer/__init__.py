"""The Hugging Face Trainer integration: ``JDTrainer`` and its JD step."""

from ._jd_trainer import AGGREGATOR_STATE_NAME, JDTrainer
from ._metrics import step_metrics

__all__ = ["AGGREGATOR_STATE_NAME", "JDTrainer", "step_metrics"]
