"""``JDDPOTrainer``: TRL's Direct Preference Optimization by Jacobian descent, one objective per pair.

DPO (Rafailov et al., 2023, arXiv:2305.18290) trains a policy ``π_θ`` against a frozen reference ``π_ref``
on preference pairs: with the log-ratios ``ρ_c = log π_θ(y_c|x) − log π_ref(y_c|x)`` (chosen) and ``ρ_r``
(rejected), pair ``k``'s sigmoid loss is ``−log σ(β (ρ_c,k − ρ_r,k))`` and TRL's loss is their mean.
TRL's ``DPOTrainer`` batches the ``B`` chosen sequences then the ``B`` rejected ones (``2B`` rows),
computes the reference log-probabilities (a reference model, LoRA's disabled or ``"ref"`` adapter, or
precomputed columns) and reduces each loss type's per-pair tensor by ``.mean()``.

:class:`JDDPOTrainer` keeps the per-pair tensor: ``L_k = Σ_t w_t ℓ_t,k`` over the configured loss types
``t`` with TRL's ``loss_weights`` ``w_t`` (and WPO's per-pair weights), so that ``mean_k L_k`` is TRL's
loss, ``--aggregator mean`` takes TRL's step, and UPGrad & co. combine the per-pair gradients. The policy
forward is TRL's (``fused_lm_head=True``), its fused LM head stood in for by the model's ordinary logits
during the step (:mod:`hf_jd.trl._logits_head`: the engines then see the LM head as a module call, so the
Gramian engine's linear rule serves it instead of a backward per pair); the reference log-probabilities come from TRL's
``compute_ref_log_probs`` (or the precomputed columns); TRL's ``_compute_loss`` logs its metrics
(``rewards/chosen``, ``rewards/margins``, …) from that same forward, replayed without a second forward.
The pair losses are returned as :class:`hf_jd.ObjectiveLosses` (pair ``k`` owns rows ``k`` and ``B + k``),
so that the Gramian engine forms the per-pair Gramian ``P G_rows Pᵀ`` from one backward, at per-example
cost; the explicit-Jacobian engine differentiates the ``B`` pair losses.

Loss types served (TRL 1.16), each one loss per pair:

* ``sigmoid`` (DPO, Rafailov et al., 2023), ``hinge`` (SLiC, Zhao et al., 2023, arXiv:2305.10425),
  ``ipo`` (Azar et al., 2023, arXiv:2310.12036), ``exo_pair`` (Ji et al., 2024, arXiv:2402.00856),
  ``nca_pair`` (Chen et al., 2024, arXiv:2402.05369), ``robust`` (Chowdhury et al., 2024,
  arXiv:2403.00409), ``bco_pair`` (Jung et al., 2024, arXiv:2404.04656), ``sppo_hard`` (Wu et al., 2024,
  arXiv:2405.00675), ``apo_zero`` / ``apo_down`` (D'Oosterlinck et al., 2024, arXiv:2408.06266),
  ``discopop`` (Chris Lu et al., 2024, arXiv:2406.08414), ``sigmoid_norm`` (length-normalised sigmoid);
* ``sft``: TRL's mean NLL over every chosen completion token of the batch, split by pair as
  ``B · (pair k's NLL sum) / (the batch's chosen tokens)`` (a constant normaliser: the mean is TRL's);
* lists of them with ``loss_weights``, WPO weighting (``use_weighting``; Zhou et al., 2024,
  arXiv:2406.11827), LD-DPO's ``ld_alpha`` (Liu et al., 2024, arXiv:2409.06411) and f-DPO's
  ``f_divergence_type`` (Wang et al., 2023, arXiv:2309.16240).

Refused at construction, by name: loss types that couple the pairs of a batch — ``aot`` and
``aot_unpaired`` (AOT, Melnyk et al., 2024, arXiv:2406.05882, sort the log-ratios across the batch) — any
loss type this module does not know, ``sft`` under WPO weighting (the batch's one SFT loss times each
pair's weight reads every pair; TRL 1.16 itself cannot compute it), and a Mixture-of-Experts
load-balancing loss (``router_aux_loss_coef``), a statistic of the whole batch's routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from trl import DPOConfig, DPOTrainer

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
from ._reward import PAIR_OBJECTIVES, PAIR_OBJECTIVES_HELP, check_pair_objectives

#: Loss types whose loss is a sum of per-pair terms (TRL 1.16's ``_compute_loss``).
PAIR_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

#: Loss types whose per-pair terms depend on the other pairs of the batch, and why.
COUPLED_LOSS_TYPES = {
    "aot": "AOT sorts the policy's and the reference's log-ratios across the batch, so each term mixes pairs",
    "aot_unpaired": "unpaired AOT sorts the chosen and the rejected log-ratios across the batch separately",
}


def check_loss_types(loss_types: list[str] | str, use_weighting: bool = False) -> None:
    """Refuse, by name, the loss types that are not one loss per pair (and ``sft`` under WPO weighting)."""
    names = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    for name in names:
        if name in COUPLED_LOSS_TYPES:
            raise ValueError(
                f"loss_type={name!r} cannot be trained by Jacobian descent over preference pairs: "
                f"{COUPLED_LOSS_TYPES[name]}, so there is no loss per pair. Use a per-pair loss type: "
                f"{', '.join(PAIR_LOSS_TYPES)}."
            )
        if name not in PAIR_LOSS_TYPES:
            raise ValueError(
                f"loss_type={name!r} is not known to hf_jd's JDDPOTrainer, which needs one loss per preference "
                f"pair. Per-pair loss types: {', '.join(PAIR_LOSS_TYPES)}."
            )
    if use_weighting and "sft" in names:
        raise ValueError(
            "loss_type='sft' with use_weighting=True: WPO would weight the batch's one SFT loss by each pair's "
            "weight, a loss that reads every pair (TRL 1.16 itself cannot compute it). Drop 'sft' or "
            "use_weighting."
        )


@dataclass(repr=False)  # a regenerated __repr__ would print hub_token in clear
class JDDPOConfig(DPOConfig, JDTrainingArguments):
    """TRL's :class:`~trl.DPOConfig` and :class:`hf_jd.JDTrainingArguments` in one config, for
    :class:`JDDPOTrainer` (every field of both, on the command line through ``HfArgumentParser``).

    ``jd_objectives`` is fixed: each objective is one preference pair. Loss types that couple the pairs of
    a batch (``aot``, ``aot_unpaired``) are refused here.
    """

    _VALID_DICT_FIELDS = merged_dict_fields(DPOConfig, JDTrainingArguments)
    __repr__ = masked_repr  # TRL's generated __repr__ would print hub_token in clear

    jd_objectives: Literal["per_example"] = field(  # type: ignore[assignment]
        default=PAIR_OBJECTIVES, metadata={"help": PAIR_OBJECTIVES_HELP, "choices": [PAIR_OBJECTIVES]}
    )

    def __post_init__(self) -> None:
        check_pair_objectives(self)
        check_loss_types(self.loss_type, self.use_weighting)
        super().__post_init__()


class _Replay:
    """Stands for the model in TRL's ``_compute_loss``: returns the outputs of the forward already done."""

    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs


class JDDPOTrainer(LogitsHeadSteps, JDTrainerMixin, DPOTrainer):
    """TRL's :class:`~trl.DPOTrainer` by Jacobian descent: one loss per preference pair (module docstring).

    Arguments are those of ``DPOTrainer`` plus the mixin's ``peft_config`` (the model is wrapped in LoRA
    adapters before TRL sees it, and TRL then keeps a frozen ``"ref"`` copy of the fresh adapter as the
    reference); ``args`` must be a :class:`JDDPOConfig`. With ``aggregator="mean"`` the update is TRL's; TRL's
    metrics are logged as usual. ``compute_losses_func`` is refused (TRL's fused forward returns
    log-probabilities, not logits): override :meth:`pair_losses` or :meth:`compute_losses` instead.
    """

    args: JDDPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None:  # TRL would build a plain DPOConfig
            config = default_config(JDDPOConfig, kwargs.get("model", args[0] if args else None), "DPO")
            if len(args) > 2:
                args = (*args[:2], config, *args[3:])
            else:
                kwargs["args"] = config
        require_config(type(self).__name__, config, JDDPOConfig, DPOConfig)
        check_loss_types(config.loss_type, config.use_weighting)
        super().__init__(*args, **kwargs)
        self._metrics_once = MetricsOnce()
        if self.compute_losses_func is not None:
            raise ValueError(
                f"{type(self).__name__} computes its pair losses from TRL's fused forward, which returns "
                "log-probabilities, not logits, so compute_losses_func(outputs, inputs) has nothing to read. "
                "Override pair_losses (or compute_losses) in a subclass instead."
            )
        if self.aux_loss_enabled:
            raise ValueError(
                f"{type(self).__name__}: the Mixture-of-Experts load-balancing loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}) is a statistic of the whole batch's routing, not a loss per "
                "preference pair. Set router_aux_loss_coef=0.0."
            )

    # ------------------------------------------------------------------ the loss vector
    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor | ObjectiveLosses:
        """The ``B`` pair losses of the batch ``[chosen…, rejected…]`` (module docstring), from TRL's forward,
        pair ``k`` owning rows ``k`` and ``B + k`` (:class:`hf_jd.ObjectiveLosses`); TRL's metrics are logged
        from the same outputs."""
        self._metrics_once.before_forward(self)
        non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {key: value for key, value in inputs.items() if key not in non_model_keys}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        # the LM head as a module call (TRL's fused kernel is opaque to the engines)
        with self.logits_head(model):
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[..., 1:]
        # prompt-learning PEFT prepends virtual tokens to the outputs: keep the positions of the real tokens
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1) :]
        chosen_logps, rejected_logps = self._sequence_logps(per_token_logps, shift_mask).chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(reference, inputs)
        losses = self.pair_losses(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            completion_mask,
            per_token_logps,
            outputs,
        )
        self._log_trl_metrics(outputs, inputs, ref_chosen_logps, ref_rejected_logps)
        return ObjectiveLosses.paired(losses)

    def _sequence_logps(self, per_token_logps: Tensor, shift_mask: Tensor) -> Tensor:
        """Each row's completion log-probability: the token sum, or LD-DPO's ``shared + α · tail`` split at the
        shorter completion of the pair (as TRL)."""
        if self.ld_alpha is None:
            return per_token_logps.sum(dim=1)
        positions = shift_mask.cumsum(dim=1)
        chosen_lens, rejected_lens = shift_mask.sum(dim=1).long().chunk(2, dim=0)
        shared = torch.minimum(chosen_lens, rejected_lens)
        shared = torch.cat([shared, shared], dim=0).to(per_token_logps.device).unsqueeze(1)
        shared_logps = (per_token_logps * ((positions > 0) & (positions <= shared))).sum(dim=1)
        tail_logps = (per_token_logps * (positions > shared)).sum(dim=1)
        return shared_logps + self.ld_alpha * tail_logps

    def _scores(self, logratios: Tensor) -> Tensor:
        """f-DPO's ``f'(π_θ/π_ref)`` of a log-ratio (the log-ratio itself for the reverse KL of DPO)."""
        kind = self.f_divergence_type
        if kind == "reverse_kl":
            return logratios
        if kind == "forward_kl":
            return 1 - torch.exp(-logratios)
        if kind == "js_divergence":
            return math.log(2) + F.logsigmoid(logratios)
        if kind == "alpha_divergence":
            alpha = self.f_alpha_divergence_coef
            if abs(alpha - 1.0) < 1e-6:
                return logratios
            scaled = (alpha - 1.0) * logratios
            clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}[scaled.dtype]
            coefficient = 1.0 / (alpha - 1.0)
            return (torch.exp(torch.clamp(scaled.float(), max=clamp_max)) - 1.0).to(
                scaled.dtype
            ) * coefficient
        raise ValueError(f"Unknown f_divergence_type: {kind}")

    def pair_losses(
        self,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        completion_mask: Tensor,
        per_token_logps: Tensor,
        outputs: Any,
    ) -> Tensor:
        """``L_k = Σ_t w_t ℓ_t,k``: TRL 1.16's per-sequence loss of each loss type ``t``, weighted by
        ``loss_weights`` (and WPO's pair weights), kept per pair instead of averaged."""
        beta = self.beta
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        chosen_scores, rejected_scores = self._scores(chosen_logratios), self._scores(rejected_logratios)
        delta = chosen_scores - rejected_scores
        shift_mask = completion_mask[..., 1:]
        check_loss_types(self.loss_types, self.use_weighting)  # the settings may change after construction
        total: Tensor | None = None
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                loss = -F.logsigmoid(beta * delta)
            elif loss_type == "hinge":
                loss = torch.relu(1 - beta * delta)
            elif loss_type in ("ipo", "sigmoid_norm"):
                chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
                normalised = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0) - rejected_scores / (
                    rejected_mask.sum(dim=1).clamp(min=1.0)
                )
                if loss_type == "ipo":
                    loss = (normalised - 1 / (2 * beta)) ** 2
                else:
                    loss = -F.logsigmoid(beta * normalised)
            elif loss_type == "exo_pair":
                epsilon = torch.tensor(self.label_smoothing, device=delta.device)
                loss = torch.sigmoid(beta * delta) * (
                    F.logsigmoid(beta * delta) - torch.log1p(-epsilon)
                ) + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon))
            elif loss_type == "nca_pair":
                chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
                loss = (
                    -F.logsigmoid(chosen_rewards)
                    - 0.5 * F.logsigmoid(-chosen_rewards)
                    - 0.5 * F.logsigmoid(-rejected_rewards)
                )
            elif loss_type == "robust":
                smoothing = self.label_smoothing
                clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
                flipped = -smoothing * F.logsigmoid(-beta * delta)
                loss = (clean - flipped) / (1 - 2 * smoothing)
            elif loss_type == "bco_pair":
                loss = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
            elif loss_type == "sppo_hard":
                loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
            elif loss_type == "apo_zero":
                loss = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
            elif loss_type == "apo_down":
                loss = torch.sigmoid(beta * chosen_logratios) + (
                    1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
                )
            elif loss_type == "discopop":
                logits = delta * beta
                modulation = torch.sigmoid(logits / self.args.discopop_tau)
                loss = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
            elif loss_type == "sft":
                # TRL: the mean NLL over the batch's chosen completion tokens. Pair k's share, times B, has that mean.
                chosen_mask = shift_mask.chunk(2, dim=0)[0]
                chosen_token_logps = per_token_logps.chunk(2, dim=0)[0]
                nll_sums = -(chosen_token_logps * chosen_mask).sum(dim=1)
                loss = nll_sums * (chosen_mask.size(0) / chosen_mask.sum())
            else:  # unreachable: check_loss_types refuses every other name
                raise AssertionError(loss_type)
            if self.use_weighting:
                loss = loss * self._wpo_weights(per_token_logps, shift_mask, outputs)
            term = loss * weight
            total = term if total is None else total + term
        assert total is not None  # DPOConfig refuses an empty loss_type
        return total

    def _wpo_weights(self, per_token_logps: Tensor, shift_mask: Tensor, outputs: Any) -> Tensor:
        """WPO's pair weight ``w_c · w_r`` (Zhou et al., 2024, Eq. 2), detached as in TRL."""
        lengths = shift_mask.sum(dim=1).clamp_min(1)
        with torch.no_grad():
            aligned = (per_token_logps - outputs.log_sum_sq_probs[:, -shift_mask.size(1) :]) * shift_mask
        weights = torch.exp(aligned.sum(dim=1) / lengths)
        chosen_weights, rejected_weights = weights.chunk(2, dim=0)
        return chosen_weights * rejected_weights

    def _log_trl_metrics(
        self, outputs: Any, inputs: dict[str, Any], ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
    ) -> None:
        """TRL's own ``_compute_loss`` over this forward's outputs (replayed, no second forward) and the reference
        log-probabilities just computed (handed over as precomputed columns): it records its metrics
        (``rewards/*``, ``logps/*``, ``logits/*``, entropy, token accuracy, tokens) exactly as in a stock step."""
        batch = {
            **inputs,
            "ref_chosen_logps": ref_chosen_logps.detach(),
            "ref_rejected_logps": ref_rejected_logps.detach(),
        }
        with torch.no_grad(), instance_attribute(self, "precompute_ref_logps", True):
            self._compute_loss(_Replay(outputs), batch, return_outputs=False)
