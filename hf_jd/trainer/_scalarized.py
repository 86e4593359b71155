r"""``--scalarizer`` runs: the loss vector becomes ONE scalar, trained with one ordinary backward.

For a scalarizer :math:`s` (:mod:`hf_jd.scalarization`) and the loss vector :math:`L` of a micro-batch,
the micro-batch writes :math:`\nabla_\theta\, s(L) / n_\text{accum}` into ``.grad`` through
``accelerator.backward`` (where the parent's ``training_step`` calls it, see :mod:`._mixin`), so DDP's
all-reduce, the fp16 scaler, clipping and the optimizer are the stock ones. Around that single backward:

* learnable scalarizer parameters (uncertainty weighting's log-variances, IMTL-L's scales) are trained by
  the Trainer's optimizer (one extra parameter group, no weight decay); DDP does not see them, so their
  gradients are averaged over ranks on the last micro-batch of each step;
* DWA closes its epoch averages at the end of every epoch (summed over ranks);
* FAMO updates its task logits after every optimizer step from the loss decrease on the step's last
  micro-batch (Liu et al., *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023): one extra
  forward, without gradients, per optimizer step;
* the state is checkpointed as ``jd_scalarizer.pt`` (see :mod:`._checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import TrainerCallback

from ..distributed import all_reduce_grads_, any_across_ranks, reduced
from ..scalarization import Scalarizer
from ._compat import compute_loss_context, real_backward, syncs_gradients
from ._loss_vector import loss_values, non_finite_loss_message

if TYPE_CHECKING:
    from ._mixin import JDTrainerMixin, MicroBatch


def scalarized_backward(
    trainer: JDTrainerMixin, scalarizer: Scalarizer, micro_batch: MicroBatch, backward: Callable[..., None]
) -> Tensor:
    """The backward of one micro-batch whose loss vector the trainer's forward computed (inside the parent's
    ``compute_loss_context_manager``): ``scalarizer(losses) / n_accum`` back-propagated once by the real
    ``accelerator.backward``; returns the mean loss (logged)."""
    model, losses, scale = micro_batch.model, micro_batch.first_forward(), micro_batch.scale
    if any_across_ranks(not bool(torch.isfinite(losses.detach()).all()), losses.device):
        message = non_finite_loss_message(losses, trainer.state.global_step)
        return trainer._skip_or_raise(model, losses, scale, message)
    real_backward(backward, scalarizer(losses) * scale)
    if syncs_gradients(trainer.accelerator):
        # DDP only wraps the model: the scalarizer's own parameters are averaged here
        all_reduce_grads_([p for p in scalarizer.parameters() if p.requires_grad], op="mean")
        trainer._scalarizer_last_step = (micro_batch.inputs, losses.detach())
    return losses.detach().mean() * scale


class ScalarizerHooksCallback(TrainerCallback):
    """Zeroes the scalarizer's gradients after every optimizer step, and calls its per-epoch (DWA) and
    post-step (FAMO) hooks at the right moments."""

    def __init__(self, trainer: JDTrainerMixin, scalarizer: Scalarizer) -> None:
        self.trainer = trainer
        self.scalarizer = scalarizer

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.scalarizer.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        # The Trainer zeroes the model's gradients only: the scalarizer's own would accumulate across steps.
        self.scalarizer.zero_grad(set_to_none=True)
        if not self.scalarizer.needs_post_step_update:
            return
        last = self.trainer._scalarizer_last_step
        if last is None or model is None:
            return
        inputs, before = last
        self.trainer._scalarizer_last_step = None
        with torch.no_grad(), compute_loss_context(self.trainer):
            after = loss_values(self.trainer.compute_losses(model, inputs)).detach()
        update = self.scalarizer.update  # type: ignore[attr-defined]
        update(reduced(after, "mean"), losses_before=reduced(before, "mean"))

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.scalarizer.needs_epoch_step:
            self.scalarizer.step(all_reduce_sum=partial(reduced, op="sum"))  # type: ignore[attr-defined]
