"""``JDTrainer``: the Hugging Face ``Trainer`` with a Jacobian-descent ``training_step``.

It is :class:`~hf_jd.trainer._mixin.JDTrainerMixin` on the stock ``Trainer``: the loss vector (one loss
per example or per task) goes through a JD engine, whose aggregated update is written to ``.grad``
where the stock step would back-propagate its scalar loss; the stock optimizer step, scheduler,
clipping, logging and checkpointing follow. To add Jacobian descent to another ``Trainer`` subclass
(e.g. TRL's), combine it with the mixin the same way: ``class MyTrainer(JDTrainerMixin, SomeTrainer)``.
"""

from __future__ import annotations

from transformers import Trainer

from ._mixin import JDTrainerMixin


class JDTrainer(JDTrainerMixin, Trainer):
    """Trainer that minimises a *vector* of losses by Jacobian descent.

    Args:
        compute_losses_func: Optional ``(outputs, inputs) -> Tensor[m]`` returning the loss vector
            from the model outputs (one loss per example, or per task). Without it, per-example losses
            are derived from the outputs (see ``JDTrainingArguments.jd_loss_type``) and per-task losses
            are read from ``outputs.losses`` / ``outputs.loss`` (a dict, tuple or 1-D tensor).
        peft_config: Optional ``peft.PeftConfig`` (e.g. ``LoraConfig``): the model is wrapped in adapters
            and JD trains the adapter parameters only, as with TRL's trainers (needs ``pip install peft``).
        All other arguments are those of :class:`transformers.Trainer`; ``args`` must be a
        :class:`hf_jd.JDTrainingArguments`.

    Override :meth:`compute_losses` for full control. ``compute_loss`` stays scalar (it is used by
    evaluation and ``prediction_step``).
    """
