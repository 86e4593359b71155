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
    """Trainer that minimises a *vector* of losses by Jacobian descent: :class:`JDTrainerMixin` on the stock
    :class:`transformers.Trainer`.

    Its own arguments (``compute_losses_func``, ``peft_config``) are the mixin's; all others are those of
    :class:`transformers.Trainer`, with ``args`` a :class:`hf_jd.JDTrainingArguments`. Override
    :meth:`compute_losses` for full control. ``compute_loss`` stays scalar (it is used by evaluation and
    ``prediction_step``).
    """
