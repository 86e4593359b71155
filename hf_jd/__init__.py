"""hf_jd: Jacobian descent for the Hugging Face Trainer.

``JDTrainer`` / ``JDTrainingArguments`` train on a vector of losses (one per example or per task);
``JDTrainerMixin`` adds the same Jacobian-descent step to any ``Trainer`` subclass (e.g. TRL's);
``hf_jd.autojac`` and ``hf_jd.aggregation`` are the JD core with TorchJD's names; ``hf_jd.scalarization``
holds the one-backward baselines (TorchJD's ``torchjd.scalarization``).
"""

from . import aggregation, autojac, scalarization
from ._objectives import ObjectiveLosses
from ._version import __version__
from .trainer import JDTrainer, JDTrainerMixin
from .training_args import JDTrainingArguments

__all__ = [
    "JDTrainer",
    "JDTrainerMixin",
    "JDTrainingArguments",
    "ObjectiveLosses",
    "aggregation",
    "autojac",
    "scalarization",
    "__version__",
]
