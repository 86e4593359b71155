"""``JDGRPOTrainer``: TRL's Group Relative Policy Optimization by Jacobian descent, one objective per
completion (or per prompt group).

GRPO (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300) samples ``G = num_generations`` completions of each
prompt, scores them with reward functions and normalises each reward within its prompt's group into an
advantage ``A_i`` (computed at generation time, detached). With the per-token ratio
``ρ_i,t = π_θ / π_old`` (or its sequence-level geometric mean, ``importance_sampling_level="sequence"``),
TRL's per-token loss is the clipped surrogate

    ``ℓ_i,t = −min(ρ_i,t A_i, clip(ρ_i,t, 1 − ε_low, 1 + ε_high) A_i) + β · KL_i,t``

with the optional KL term ``KL = exp(r − log π_θ) − (r − log π_θ) − 1`` against the reference model's
per-token log-probabilities ``r`` (computed by TRL in ``_generate_and_score_completions``), and the loss
reduces the masked per-token terms by the loss type's normalisation. Every completion ``i`` of the
micro-batch (``B`` rows) owns the token sum ``S_i = Σ_t m_i,t ℓ_i,t``; nothing else couples the rows (the
advantages, the old and reference log-probabilities, the masks are detached data of the batch), so TRL's loss
is the mean of ``B`` per-completion losses ``L_i`` (times the accumulation steps, as the mixin scales):

* ``grpo``: ``L_i = S_i / |m_i|`` (each completion's token mean; Shao et al., 2024);
* ``bnpo``: ``L_i = B · S_i / Σ_j |m_j|`` (the micro-batch's token mean, a fixed scale of the step);
* ``dr_grpo``: ``L_i = S_i / max_completion_length`` (Dr. GRPO, Liu et al., 2025, arXiv:2503.20783);
* ``dapo``: ``L_i = B · S_i · k / N`` with TRL's normaliser ``N / k`` (``N`` = ``num_items_in_batch``, the
  completion tokens of the whole generation batch, a fixed scale; DAPO, Yu et al., 2025, arXiv:2503.14476).

So ``--aggregator mean`` takes TRL's step and UPGrad & co. combine the per-completion gradients. With
``jd_grpo_objectives="prompt"`` the objectives are the prompt groups instead: the completions of one prompt
present in the micro-batch form one objective ``L_g = (K / B) Σ_{i ∈ g} L_i`` (``K`` groups; the mean of the
``L_g`` is again TRL's loss), returned as :class:`hf_jd.ObjectiveLosses`, so that the Gramian engine forms the
group Gramian ``P G_rows Pᵀ`` from one backward at per-example cost. TRL shuffles the completions of a
generation batch before it splits it into micro-batches, so each row carries its group index
(``jd_prompt_group``, added at generation time).

The forward is TRL's ``_get_per_token_logps_and_entropies``, its fused LM head stood in for by the model's
ordinary logits during the step (:mod:`hf_jd.trl._logits_head`, TRL's temperature applied), so that the
Gramian engine's linear rule serves the LM head; TRL's own ``_compute_loss`` then logs its metrics
(KL, entropy, clip ratios) from that forward, replayed without a second forward; rewards and completion
lengths are logged by TRL at generation time. Clipping (``epsilon``, ``epsilon_high``, ``delta``), both
importance-sampling levels, the KL term (``beta > 0``, with ``use_bias_correction_kl``), the off-policy mask,
the high-entropy token mask (``top_entropy_quantile``: a detached 0/1 mask of the step) are served and tested
against TRL's loss; vLLM's importance-sampling correction (a detached per-token factor) follows TRL's code
but is not exercised by the tests (no vLLM there).

Refused at construction, by name: the loss types whose split is not implemented here (``cispo``, ``sapo``,
``luspo``, ``vespo`` and any other), the entropy bonus (``entropy_coef`` or adaptive entropy) and a
Mixture-of-Experts load-balancing loss (``router_aux_loss_coef``), both statistics of the whole batch added to
the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from trl import GRPOConfig, GRPOTrainer

from .._objectives import ObjectiveLosses
from ..trainer import JDTrainerMixin
from ..training_args import JDTrainingArguments
from ._config import (
    MetricsOnce,
    default_config,
    instance_attribute,
    masked_repr,
    merged_dict_fields,
    require_config,
)
from ._logits_head import LogitsHeadSteps

#: Loss types split into per-completion losses (TRL 1.16's ``_compute_loss``).
COMPLETION_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

#: The input key holding each completion's prompt group (added at generation time).
PROMPT_GROUP_KEY = "jd_prompt_group"

OBJECTIVES_HELP = (
    "Fixed for GRPO: the objectives are completions or prompt groups (jd_grpo_objectives), handed to the "
    "engines as hf_jd.ObjectiveLosses over the batch rows ('per_example')."
)


def check_grpo_settings(config: GRPOConfig) -> None:
    """Refuse, by name, the settings whose loss is not a mean of per-completion losses."""
    loss_type = config.loss_type
    if loss_type not in COMPLETION_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not served by hf_jd's JDGRPOTrainer, which splits TRL's loss into one "
            f"loss per completion; the split is implemented for {', '.join(COMPLETION_LOSS_TYPES)}. Use one of "
            "these, or train with TRL's GRPOTrainer."
        )
    if config.entropy_coef != 0.0 or config.use_adaptive_entropy:
        raise ValueError(
            f"entropy_coef={config.entropy_coef} / use_adaptive_entropy={config.use_adaptive_entropy}: the "
            "entropy bonus is not served by JDGRPOTrainer (it is not split into per-completion losses). Set "
            "entropy_coef=0.0 and use_adaptive_entropy=False."
        )


@dataclass(repr=False)  # a regenerated __repr__ would print hub_token in clear
class JDGRPOConfig(GRPOConfig, JDTrainingArguments):
    """TRL's :class:`~trl.GRPOConfig` and :class:`hf_jd.JDTrainingArguments` in one config, for
    :class:`JDGRPOTrainer` (every field of both, on the command line through ``HfArgumentParser``).

    ``jd_objectives`` is fixed; ``jd_grpo_objectives`` chooses completions (default) or prompt groups.
    Unserved loss types (see :data:`COMPLETION_LOSS_TYPES`) and the entropy bonus are refused here.
    """

    _VALID_DICT_FIELDS = merged_dict_fields(GRPOConfig, JDTrainingArguments)
    __repr__ = masked_repr  # TRL's generated __repr__ would print hub_token in clear

    jd_objectives: Literal["per_example"] = field(  # type: ignore[assignment]
        default="per_example", metadata={"help": OBJECTIVES_HELP, "choices": ["per_example"]}
    )
    jd_grpo_objectives: Literal["completion", "prompt"] = field(
        default="completion",
        metadata={
            "help": "One objective per completion ('completion') or per prompt group: the completions of one "
            "prompt in the micro-batch ('prompt').",
            "choices": ["completion", "prompt"],
        },
    )

    jd_parallel_chunk_size: int | None = field(
        default=1,
        metadata={
            "help": "Jacobian engine only: rows back-propagated per batched (vmap) backward. Defaults to 1 (one by "
            "one) here: the backward of TRL's per-token log-probabilities adds in place, which vmap cannot batch."
        },
    )

    def __post_init__(self) -> None:
        if self.jd_objectives != "per_example":
            raise ValueError(
                f"JDGRPOConfig(jd_objectives={self.jd_objectives!r}): the objectives of GRPO are completions or "
                "prompt groups (jd_grpo_objectives), routed as 'per_example'. Leave jd_objectives unset."
            )
        if self.jd_grpo_objectives not in ("completion", "prompt"):
            raise ValueError(
                f"jd_grpo_objectives must be 'completion' or 'prompt', got {self.jd_grpo_objectives!r}."
            )
        check_grpo_settings(self)
        super().__post_init__()


class JDGRPOTrainer(LogitsHeadSteps, JDTrainerMixin, GRPOTrainer):
    """TRL's :class:`~trl.GRPOTrainer` by Jacobian descent: one loss per completion or per prompt group
    (module docstring).

    Arguments are those of ``GRPOTrainer`` plus the mixin's ``peft_config``; ``args`` must be a
    :class:`JDGRPOConfig`. With ``aggregator="mean"`` the update is TRL's; TRL's metrics are logged as usual.
    ``compute_losses_func`` is refused (the forward returns log-probabilities): override
    :meth:`completion_losses` or :meth:`compute_losses` instead.
    """

    args: JDGRPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None:  # TRL would build a plain GRPOConfig
            config = default_config(JDGRPOConfig, kwargs.get("model", args[0] if args else None), "GRPO")
            if len(args) > 2:
                args = (*args[:2], config, *args[3:])
            else:
                kwargs["args"] = config
        require_config(type(self).__name__, config, JDGRPOConfig, GRPOConfig)
        check_grpo_settings(config)
        super().__init__(*args, **kwargs)
        self._metrics_once = MetricsOnce()
        if self.compute_losses_func is not None:
            raise ValueError(
                f"{type(self).__name__} computes its losses from TRL's per-token log-probabilities, not from "
                "model outputs, so compute_losses_func(outputs, inputs) has nothing to read. Override "
                "completion_losses (or compute_losses) in a subclass instead."
            )
        if self.aux_loss_enabled:
            raise ValueError(
                f"{type(self).__name__}: the Mixture-of-Experts load-balancing loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}) is a statistic of the whole batch's routing, not a loss per "
                "completion. Set router_aux_loss_coef=0.0."
            )

    # ------------------------------------------------------------------ generation: the prompt groups
    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        """TRL's generation and scoring, with each completion's prompt group (``jd_prompt_group``): TRL's rows
        are ``num_generations`` consecutive completions per prompt over the processes' concatenated batches,
        before it shuffles them."""
        output: dict[str, Any] = super()._generate_and_score_completions(inputs)
        rows = output["prompt_ids"].size(0)
        device = output["prompt_ids"].device
        first = self.accelerator.process_index * rows
        training = cast(nn.Module, self.model).training
        generations = cast(int, self.num_generations if training else self.num_generations_eval)
        output[PROMPT_GROUP_KEY] = torch.arange(first, first + rows, device=device) // generations
        return output

    # ------------------------------------------------------------------ the loss vector
    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor | ObjectiveLosses:
        """The per-completion (or per-prompt-group) losses of the micro-batch (module docstring), from TRL's
        forward; TRL's metrics are logged from the same forward."""
        self._metrics_once.before_forward(self)
        check_grpo_settings(self.args)  # the settings may change after construction
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        forward = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )
        per_token_logps, entropies = forward[0], forward[1]
        losses = self.completion_losses(per_token_logps, entropies, inputs)
        self._log_trl_metrics(model, inputs, per_token_logps, entropies)
        rows = losses.numel()
        if self.args.jd_grpo_objectives == "completion":
            return ObjectiveLosses(losses, torch.arange(rows, device=losses.device))
        groups, row_objective = torch.unique(inputs[PROMPT_GROUP_KEY], return_inverse=True)
        count = groups.numel()
        group_losses = losses.new_zeros(count).index_add(0, row_objective.to(losses.device), losses)
        return ObjectiveLosses(group_losses * (count / rows), row_objective)

    def completion_losses(
        self, per_token_logps: Tensor, entropies: Tensor | None, inputs: dict[str, Any]
    ) -> Tensor:
        """``L_i``: each completion's share of TRL 1.16's loss, times the accumulation steps, so that
        ``mean_i L_i / accumulation_steps`` is TRL's ``_compute_loss`` (module docstring)."""
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        log_ratio = per_token_logps - old_per_token_logps
        if self.importance_sampling_level == "token":
            log_importance_weights = log_ratio
        elif self.importance_sampling_level == "sequence":
            log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        else:
            raise ValueError(f"Unknown importance sampling level: {self.importance_sampling_level}.")
        coef_1 = torch.exp(log_importance_weights)
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        # two-sided clipping (delta) bounds the surrogate's ratio only; the KL correction below reads the raw one
        clipped = coef_1 if self.args.delta is None else torch.clamp(coef_1, max=self.args.delta)
        per_token_loss = -torch.min(clipped * advantages, coef_2 * advantages)
        if self.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
        if self.top_entropy_quantile < 1.0:
            assert entropies is not None  # computed by the forward
            per_token_loss = per_token_loss * self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if self.beta != 0.0:
            reference = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(reference - per_token_logps) - (reference - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1
            per_token_loss = per_token_loss + self.beta * per_token_kl
        sums = (per_token_loss * mask).sum(-1)
        rows = sums.size(0)
        if self.loss_type == "grpo":
            return sums / mask.sum(-1).clamp(min=1.0)
        if self.loss_type == "bnpo":
            return sums * (rows / mask.sum().clamp(min=1.0))
        if self.loss_type == "dr_grpo":
            return sums / self.max_completion_length
        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            normalizer = (
                normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            )
            return sums * (rows * self.current_gradient_accumulation_steps / normalizer)
        raise AssertionError(self.loss_type)  # unreachable: check_grpo_settings refuses every other name

    def _log_trl_metrics(
        self, model: nn.Module, inputs: dict[str, Any], per_token_logps: Tensor, entropies: Tensor | None
    ) -> None:
        """TRL's own ``_compute_loss`` over this forward's log-probabilities and entropies (replayed, no second
        forward): it records its metrics (KL, entropy, clip ratios) exactly as in a stock step."""
        replayed = (per_token_logps.detach(), None if entropies is None else entropies.detach(), None)

        def replay(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None, None]:
            return replayed

        with torch.no_grad(), instance_attribute(self, "_get_per_token_logps_and_entropies", replay):
            self._compute_loss(model, inputs)
