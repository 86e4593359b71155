"""``JDRewardTrainer``: TRL's reward-model trainer by Jacobian descent, one objective per preference pair.

TRL's ``RewardTrainer`` trains an outcome reward model on preference pairs with the Bradley–Terry loss
(Bradley & Terry, 1952; as used for RLHF reward models by Ouyang et al., 2022, arXiv:2203.02155): the
batch holds the ``B`` chosen sequences and then the ``B`` rejected ones (``2B`` rows), the model scores
each row, and the loss is

    ``mean_k -log σ(r_c,k − r_r,k − m_k)  +  c · mean_k (r_c,k + r_r,k)²``

with the optional per-pair margin ``m_k`` (Touvron et al., 2023, Llama 2, arXiv:2307.09288) and the
optional reward-centring term of coefficient ``c = center_rewards_coefficient`` (Eisenstein et al., 2023,
arXiv:2312.09244). :class:`JDRewardTrainer` splits that scalar into its ``B`` pair losses

    ``L_k = -log σ(r_c,k − r_r,k − m_k) + c · (r_c,k + r_r,k)²``

whose mean is TRL's loss, so that ``--aggregator mean`` takes TRL's step and any other aggregator
(UPGrad, …) combines the per-pair gradients. The forward (and TRL's metrics) is TRL's own
``compute_loss``: the mixin calls it with ``return_outputs=True`` and the pair losses are read from the
rewards it returns.

Pair ``k`` is rows ``k`` and ``B + k`` of the batch: the losses are returned as
:class:`hf_jd.ObjectiveLosses` (``row_objective = [0..B-1, 0..B-1]``), so that the Gramian engine forms the
per-pair Gramian ``P G_rows Pᵀ`` from one backward, at per-example cost (``jd_objectives="per_example"``,
fixed by the configs); the explicit-Jacobian engine differentiates the ``B`` pair losses.

The pair routing (``PAIR_OBJECTIVES``, :func:`check_pair_objectives`) lives here and is used by :mod:`._dpo`
too; the config helpers shared with the other TRL trainers are in :mod:`._config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from trl import RewardConfig, RewardTrainer

from .._objectives import ObjectiveLosses
from ..trainer import JDTrainerMixin
from ..training_args import JDTrainingArguments
from ._config import (
    MetricsOnce,
    default_config,
    masked_repr,
    merged_dict_fields,
    require_config,
)

#: How the pair losses reach the engines: ``ObjectiveLosses`` over the batch rows, a per-example route.
PAIR_OBJECTIVES: Literal["per_example"] = "per_example"

PAIR_OBJECTIVES_HELP = (
    "Fixed for preference training: one objective per preference pair (rows k and B+k of the batch), "
    "handed to the engines as hf_jd.ObjectiveLosses over the batch rows ('per_example')."
)


def check_pair_objectives(config: JDTrainingArguments) -> None:
    """A preference config's objectives are its pairs: ``jd_objectives`` may only hold the pair routing."""
    if config.jd_objectives != PAIR_OBJECTIVES:
        raise ValueError(
            f"{type(config).__name__}(jd_objectives={config.jd_objectives!r}): in preference training each "
            f"objective is one preference pair (its chosen and rejected rows), routed as {PAIR_OBJECTIVES!r}. "
            "Leave jd_objectives unset."
        )


@dataclass(repr=False)  # a regenerated __repr__ would print hub_token in clear
class JDRewardConfig(RewardConfig, JDTrainingArguments):
    """TRL's :class:`~trl.RewardConfig` and :class:`hf_jd.JDTrainingArguments` in one config, for
    :class:`JDRewardTrainer` (every field of both, on the command line through ``HfArgumentParser``).

    ``jd_objectives`` is fixed: each objective is one preference pair.
    """

    _VALID_DICT_FIELDS = merged_dict_fields(RewardConfig, JDTrainingArguments)
    __repr__ = masked_repr  # TRL's generated __repr__ would print hub_token in clear

    jd_objectives: Literal["per_example"] = field(  # type: ignore[assignment]
        default=PAIR_OBJECTIVES, metadata={"help": PAIR_OBJECTIVES_HELP, "choices": [PAIR_OBJECTIVES]}
    )

    def __post_init__(self) -> None:
        check_pair_objectives(self)
        super().__post_init__()


def reward_pair_losses(
    rewards: Tensor, margin: Tensor | None = None, center_rewards_coefficient: float | None = None
) -> Tensor:
    """The ``B`` pair losses of TRL's reward loss from the ``2B`` rewards ``[chosen…, rejected…]``.

    ``L_k = -log σ(r_c,k − r_r,k − m_k) + c · (r_c,k + r_r,k)²``; their mean is
    ``RewardTrainer.compute_loss`` (TRL 1.16).
    """
    chosen, rejected = torch.chunk(rewards.squeeze(-1), chunks=2)
    difference = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


class JDRewardTrainer(JDTrainerMixin, RewardTrainer):
    """TRL's :class:`~trl.RewardTrainer` by Jacobian descent: one loss per preference pair.

    Arguments are those of ``RewardTrainer`` plus the mixin's (``compute_losses_func``, ``peft_config``: the
    model is wrapped in adapters before TRL sees it); ``args`` must be a :class:`JDRewardConfig`. With
    ``aggregator="mean"`` the update is TRL's; TRL's metrics (accuracy, margin, rewards) are logged as usual.
    """

    args: JDRewardConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is None:  # TRL would build a plain RewardConfig
            config = default_config(JDRewardConfig, kwargs.get("model", args[0] if args else None), "Reward")
            if len(args) > 1:
                args = (args[0], config, *args[2:])
            else:
                kwargs["args"] = config
        require_config(type(self).__name__, config, JDRewardConfig, RewardConfig)
        super().__init__(*args, **kwargs)
        self._metrics_once = MetricsOnce()

    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor | ObjectiveLosses:
        """The ``B`` pair losses (see :func:`reward_pair_losses`) from TRL's own forward and metrics, pair ``k``
        owning rows ``k`` and ``B + k``."""
        self._metrics_once.before_forward(self)
        if self.compute_losses_func is not None:
            return super().compute_losses(model, inputs)
        outputs = self._model_outputs(model, inputs)
        losses = reward_pair_losses(
            outputs.logits, inputs.get("margin"), self.args.center_rewards_coefficient
        )
        return ObjectiveLosses.paired(losses)
