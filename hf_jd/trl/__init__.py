"""Jacobian descent for TRL's trainers (``pip install 'hf-jd[trl]'``, TRL >= 1.16).

Each trainer is TRL's with :class:`hf_jd.JDTrainerMixin` in front, and each config is TRL's config and
:class:`hf_jd.JDTrainingArguments` in one (TRL rebuilds arguments of any other class as its own config,
which would drop the JD settings; the shared checks are in :mod:`hf_jd.trl._config`):

* :class:`JDSFTConfig`, :class:`JDSFTTrainer`: supervised fine-tuning, one objective per sequence
  (completion-only and assistant-only masks respected; padding-free and packed batches split into their
  sequences);
* :class:`JDRewardConfig`, :class:`JDRewardTrainer` and :class:`JDDPOConfig`, :class:`JDDPOTrainer`: one
  objective per preference pair (its chosen and rejected rows);
* :class:`JDGRPOConfig`, :class:`JDGRPOTrainer`: GRPO, one objective per completion (or per prompt group).
"""

try:
    import trl  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "hf_jd.trl needs TRL (>= 1.16), which is not installed. Install it with `pip install 'hf-jd[trl]'` "
        "(or `pip install 'trl>=1.16'`)."
    ) from error

from ._dpo import JDDPOConfig, JDDPOTrainer
from ._grpo import JDGRPOConfig, JDGRPOTrainer
from ._reward import JDRewardConfig, JDRewardTrainer
from ._sft import JDSFTConfig, JDSFTTrainer

__all__ = [
    "JDDPOConfig",
    "JDDPOTrainer",
    "JDGRPOConfig",
    "JDGRPOTrainer",
    "JDRewardConfig",
    "JDRewardTrainer",
    "JDSFTConfig",
    "JDSFTTrainer",
]
