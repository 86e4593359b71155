r"""Supervised fine-tuning by Jacobian descent: ``JDSFTConfig`` and ``JDSFTTrainer`` (TRL's ``SFTTrainer``).

**Objectives.** One objective per sequence (document): a row of a padded batch, or a segment of a
padding-free / packed row ``[1, Σ Tᵢ]`` (TRL's ``padding_free=True``, ``packing=True`` with ``bfd``),
found from the ``position_ids`` restarts (or ``cu_seq_lens_q``). Only the supervised tokens count: TRL
turns ``completion_only_loss`` / ``assistant_only_loss`` into labels ``-100`` when it prepares the data,
so the labels that reach the batch carry the masks. With :math:`S_i` the sum of the next-token cross
entropies of sequence :math:`i` and :math:`n_i` its number of supervised tokens:

* ``jd_sft_objective_weighting="sequence"`` (default): :math:`L_i = S_i / n_i`, every sequence weighs the
  same whatever its length;
* ``"tokens"``: :math:`L_i = S_i \cdot m \cdot c / N` over the :math:`m` sequences of the micro-batch, with
  :math:`N` TRL's token count (``num_items_in_batch``: the supervised tokens of the whole accumulation
  window, of every process) and :math:`c` the factors TRL and ``Trainer`` apply (the accumulation steps
  when the loss is normalised by ``num_items_in_batch``, the number of processes under
  ``average_tokens_across_devices``). Then :math:`\frac{1}{\text{steps}} \cdot \frac1m \sum_i L_i` is
  TRL's token-weighted loss of the micro-batch: the ``mean`` aggregator reproduces the stock
  ``SFTTrainer`` update exactly (tested on one process; by construction also on several with
  ``jd_scope="local"``, or ``"global"`` when every process holds as many sequences).

**How the losses are computed.** ``SFTTrainer.compute_loss`` runs as it is (its metrics ``entropy``,
``mean_token_accuracy``, ``num_tokens`` are recorded by TRL's own code), but TRL's fused LM head is
stood in for during the training step (:mod:`hf_jd.trl._logits_head`): the model's ordinary forward gives
the logits, and the token losses are an ordinary cross entropy of them (TRL's fused head is a custom
autograd function: a batched (vmap) backward fails on it, and the Gramian engine's rules serve the LM head
only as a module call). Its metric fields (entropy, top-1 hits, label mask) are computed from the same
logits without gradient; the price is the full ``[rows, tokens, vocabulary]`` logits, as with
``JDTrainer`` on a causal LM.

**Engines.** A padded batch is per example (one row per sequence): both engines, as with ``JDTrainer``.
A padding-free or packed batch has one row for several sequences, so the sequence losses reach the
engines as :meth:`hf_jd.ObjectiveLosses.segments`, with the objective of every input token: the
explicit-Jacobian engine differentiates each sequence loss exactly, and the Gramian engine forms
``P G_tokens Pᵀ`` from one backward, with the tokens of token-wise layers as its rows (segment sums of the
token factors; self-checked on the first step, so attention that crosses sequences is caught and
``jd_engine="auto"`` falls back to the explicit Jacobian). Layers that are not token-wise (e.g. Llama's own
RMSNorm class, a broadcast weight) are served by the engine's exact per-objective fallback, one cotangent
per sequence. Several processes then need ``jd_scope="local"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from trl import SFTConfig, SFTTrainer

from .._objectives import ObjectiveLosses
from ..losses import sequence_ids, sequence_losses, sequence_token_sums
from ..trainer import JDInputError, JDTrainerMixin
from ..training_args import JDTrainingArguments
from ._config import (
    MetricsOnce,
    check_local_scope,
    default_config,
    masked_repr,
    merged_dict_fields,
    require_config,
)
from ._logits_head import LogitsHeadSteps

logger = logging.getLogger(__name__)

SFTObjectiveWeighting = Literal["sequence", "tokens"]
SFT_OBJECTIVE_WEIGHTINGS: tuple[str, ...] = get_args(SFTObjectiveWeighting)


@dataclass(repr=False)  # a regenerated __repr__ would print hub_token in clear
class JDSFTConfig(SFTConfig, JDTrainingArguments):
    """TRL's :class:`~trl.SFTConfig` and :class:`hf_jd.JDTrainingArguments` in one config, for
    :class:`JDSFTTrainer` (every field of both, on the command line through ``HfArgumentParser``).

    ``SFTTrainer`` rebuilds arguments of any other class as ``SFTConfig(**args.to_dict())``, which would drop
    the JD settings: hence one class that is both. TRL's defaults are kept (``gradient_checkpointing=True``,
    ``bf16`` unless ``fp16``, ``learning_rate=2e-5``, ``logging_steps=10``).

    Parameters:
        jd_sft_objective_weighting (`"sequence"` or `"tokens"`, defaults to `"sequence"`):
            How each sequence's objective weighs its tokens. ``"sequence"``: the mean cross entropy of its
            supervised tokens (every sequence counts the same). ``"tokens"``: its summed cross entropy, scaled
            so that the mean of the objectives is TRL's token-weighted SFT loss; with the ``mean`` aggregator
            the step is then exactly the stock ``SFTTrainer`` step, gradient accumulation included.
    """

    _VALID_DICT_FIELDS = merged_dict_fields(SFTConfig, JDTrainingArguments)
    __repr__ = masked_repr  # SFTConfig's generated __repr__ would print hub_token in clear

    jd_sft_objective_weighting: SFTObjectiveWeighting = field(
        default="sequence",
        metadata={
            "help": "One objective per sequence: 'sequence' = the mean cross entropy of its supervised tokens (each "
            "sequence counts the same); 'tokens' = its summed cross entropy scaled so that the mean of the objectives "
            "is TRL's token-weighted loss (with --aggregator mean, exactly the stock SFTTrainer step).",
            "choices": list(SFT_OBJECTIVE_WEIGHTINGS),
        },
    )

    def __post_init__(self) -> None:
        if self.jd_sft_objective_weighting not in SFT_OBJECTIVE_WEIGHTINGS:
            raise ValueError(
                f"jd_sft_objective_weighting={self.jd_sft_objective_weighting!r} is not valid. Valid values: "
                f"{', '.join(SFT_OBJECTIVE_WEIGHTINGS)}."
            )
        super().__post_init__()


def segment_map(full_ids: Tensor, label_ids: Tensor, supervised: Tensor) -> Tensor:
    """The objective of every input token of packed rows: the index, among the sequences that have a
    supervised token (the order of :func:`hf_jd.losses.sequence_token_sums`), of the sequence the token
    belongs to; ``-1`` for tokens of sequences without one.

    ``full_ids`` (``[rows, T]``) is the sequence of each input token, ``label_ids`` that of each scored
    position and ``supervised`` which positions count.
    """
    positions = label_ids.reshape(-1)
    sequences = int(full_ids.max()) + 1
    per_sequence = torch.zeros(sequences, dtype=torch.long, device=positions.device).index_add(
        0, positions, supervised.reshape(-1).long().to(positions.device)
    )
    kept = per_sequence > 0
    index = torch.full((sequences,), -1, dtype=torch.long, device=positions.device)
    index[kept] = torch.arange(int(kept.sum()), device=positions.device)
    return index[full_ids.to(positions.device)]


class JDSFTTrainer(LogitsHeadSteps, JDTrainerMixin, SFTTrainer):
    """TRL's :class:`~trl.SFTTrainer` trained by Jacobian descent over one objective per sequence.

    ``args`` must be a :class:`JDSFTConfig` (``None`` builds one, as TRL does); everything else is
    ``SFTTrainer``'s, plus the mixin's ``compute_losses_func`` and ``peft_config`` (hf_jd wraps the model in
    the adapters; JD then trains the adapter parameters). The objectives and the engines are described in
    :mod:`hf_jd.trl._sft`. TRL's metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) and tags
    (``trl``, ``sft``) are kept, and the model card gets hf_jd's section.

    Refused: label smoothing and MoE router auxiliary losses (no per-sequence decomposition here yet),
    ``jd_objectives="per_task"`` without ``compute_losses_func``, and, for padding-free or packed batches,
    several processes with ``jd_scope="global"``. ``packing_strategy="wrapped"`` without padding-free cuts
    documents into fixed-length chunks that attend across document boundaries: there each chunk (row) is
    one objective, as it is one sequence for the model (a warning says so).
    """

    args: JDSFTConfig

    def __init__(self, model: Any = None, args: JDSFTConfig | None = None, *more: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        if args is None:
            args = default_config(JDSFTConfig, model, "SFT")
        require_config(name, args, JDSFTConfig, SFTConfig)
        if args.label_smoothing_factor:
            raise ValueError(
                f"{name} does not support label_smoothing_factor={args.label_smoothing_factor} yet: TRL then computes "
                "the loss outside its fused LM head, from which hf_jd takes the per-sequence losses. Set it to 0."
            )
        if args.jd_objectives == "per_task" and kwargs.get("compute_losses_func") is None:
            raise ValueError(
                f"{name} trains on one objective per sequence (jd_objectives='per_example'); 'per_task' needs "
                "compute_losses_func=(outputs, inputs) -> Tensor[k] returning the task losses."
            )
        if args.packing and args.packing_strategy == "wrapped" and not args.padding_free:
            logger.warning(
                "%s: packing_strategy='wrapped' cuts the documents into chunks of max_length tokens that attend "
                "across document boundaries, so each chunk (batch row) is one objective. Use packing_strategy='bfd' "
                "(or padding_free=True) for one objective per document.",
                name,
            )
        super().__init__(model, args, *more, **kwargs)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"{name} does not support the router auxiliary loss of mixture-of-experts models yet (a batch-level "
                "term with no per-sequence decomposition). Set model_init_kwargs / the model config's "
                "output_router_logits=False."
            )
        #: padding-free or packed (bfd) batches: several sequences per row, found from ``position_ids``
        self.packed_sequences = bool(getattr(self, "padding_free", False))
        #: TRL's metrics count each micro-batch once, even when its forward runs again (a fallback)
        self._metrics_once = MetricsOnce()
        if self.packed_sequences:
            check_local_scope(self, "sequences of a padding-free batch")

    # ------------------------------------------------------------------ the step
    # ------------------------------------------------------------------ loss vector
    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        """One loss per sequence (see :mod:`hf_jd.trl._sft`), through ``SFTTrainer.compute_loss`` (metrics).

        With ``compute_losses_func``, its result on the model outputs (logits with gradient) instead.
        """
        micro_batch = self._jd_micro_batch
        items = micro_batch.num_items_in_batch if micro_batch is not None else None
        self._metrics_once.before_forward(self)
        with self.logits_head(model) as head:
            self._parent_compute_loss()(
                self, model, dict(inputs), return_outputs=False, num_items_in_batch=items
            )
            token_losses, supervised, outputs = head.only_call(type(self).__name__)
        if self.compute_losses_func is not None:
            return self.compute_losses_func(outputs, inputs)
        if self.args.loss_type == "dft":  # TRL's DFT: each token's loss times its (detached) probability
            token_losses = token_losses * torch.exp(-token_losses).detach()
        sums, counts, token_objective = self._sequence_sums(inputs, token_losses, supervised)
        weighting = getattr(self.args, "jd_sft_objective_weighting", "sequence")  # any SFTConfig + JD config
        if weighting == "sequence":
            losses = sequence_losses(sums, counts, "sequence")
        else:
            losses = sequence_losses(
                sums, counts, "tokens", total_tokens=items, factor=self._token_factor(items)
            )
        return losses if token_objective is None else ObjectiveLosses.segments(losses, token_objective)

    def _sequence_sums(
        self, inputs: dict[str, Any], token_losses: Tensor, supervised: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per sequence: summed token losses and supervised-token counts (rows, or segments of packed rows),
        and for packed rows the objective of every input token (``[rows, T]``, ``-1``: no objective), which
        hands the sequences to the engines as :meth:`hf_jd.ObjectiveLosses.segments`."""
        rows, length = token_losses.shape
        positions = inputs.get("position_ids")
        if isinstance(positions, Tensor) and positions.dim() == 2 and positions.shape[0] == 1 < rows:
            positions = positions.expand(rows, -1)  # one position row broadcast over the batch
        shifted = "shift_labels" not in inputs  # position t scores the label at t + 1
        full_length = length + 1 if shifted else length
        try:
            ids = sequence_ids(
                positions if isinstance(positions, Tensor) else None,
                inputs.get("cu_seq_lens_q"),
                (rows, full_length),
            )
        except ValueError as error:
            raise JDInputError(
                f"{type(self).__name__} cannot find the sequences of the batch: {error}"
            ) from None
        full_ids = ids  # the sequence of every input token
        if ids is not None:
            ids = ids[:, 1:] if shifted else torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
        if self.packed_sequences:
            if ids is None:
                raise JDInputError(
                    f"{type(self).__name__}: the padding-free batch has neither position_ids nor cu_seq_lens_q, so "
                    "its sequences cannot be told apart, and one objective for the whole row would silently merge "
                    "them. Use TRL's collator (DataCollatorForLanguageModeling with padding_free=True), which "
                    "returns position_ids."
                )
            sums, counts = sequence_token_sums(token_losses, supervised, ids)
            if sums.numel() == 0:  # no supervised token at all: a zero loss (zero gradient) per row
                return (*sequence_token_sums(token_losses, supervised), None)
            assert full_ids is not None  # ids is None only without any sequence boundary (refused above)
            return sums, counts, segment_map(full_ids, ids, supervised)
        if ids is not None:
            for row in range(rows):
                found = torch.unique(ids[row][supervised[row].to(ids.device)]).numel()
                if found > 1:
                    raise JDInputError(
                        f"{type(self).__name__}: row {row} of the batch holds {found} sequences (its position_ids "
                        "restart inside it), but neither padding_free nor bfd packing is set, so they would be merged "
                        "into one objective. Set padding_free=True (or packing=True), or give one sequence per row."
                    )
        return (*sequence_token_sums(token_losses, supervised), None)

    def _token_factor(self, items: Tensor | int | None) -> float:
        """``c`` of the ``"tokens"`` weighting: the factors by which TRL's loss and ``Trainer``'s step differ
        from ``Σ ce / N`` on one micro-batch, relative to the mixin's ``1 / steps`` scaling."""
        micro_batch = self._jd_micro_batch
        steps = 1.0 / micro_batch.scale if micro_batch is not None else 1.0
        scaled_for_steps = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_steps is None:
            scaled_for_steps = bool(self.model_accepts_loss_kwargs and items is not None)
        factor = steps if scaled_for_steps else 1.0
        if self.args.average_tokens_across_devices and items is not None:
            factor *= self.accelerator.num_processes // self.get_tp_size()
        return factor
