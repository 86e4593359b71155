r"""DeepSpeed: detected and refused today; the seam a DeepSpeed backend will fill.

**Detection**: accelerate's DeepSpeed plugin on the accelerator state (what ``Trainer.is_deepspeed_enabled``
reads), with its ZeRO stage. The arguments refuse ``--deepspeed`` themselves
(:func:`hf_jd.training_args.sharding_refusal`, the one message of both refusals).

**Refused** today, whatever the stage: the JD step writes ``.grad`` itself, which ZeRO's partitioned
gradients (stage 2) and parameters (stage 3) do not allow from outside DeepSpeed's own backward.

**What a DeepSpeed backend will implement** (against :class:`~._base.Backend`):

* :meth:`~._base.Backend.backward`: ``engine.backward(loss)`` — DeepSpeed's backward scales an fp16 loss
  and reduces (stage 1–2) or reduce-scatters (stage 3) the gradients into its partitions, at the
  accumulation boundary it tracks. The inherited generic :meth:`~._base.Backend.write_update` then writes
  :math:`s\,J^\top w` as the backward of :math:`s\,w^\top L`, with the weights from the Gramian of an engine
  that kept the graph of the losses (``engine.keeps_graph``). ``engine.backward`` back-propagates into every
  parameter (it takes no ``inputs``), so per-task runs with task-specific parameters, whose plain task
  gradients need a second, restricted backward, write those with ``deepspeed.utils.safe_set_full_grad``
  (or ``safe_get_full_grad`` / set) instead — the backend's own full-gradient setter.
* :meth:`~._base.Backend.engine_choices` / :meth:`~._base.Backend.build_engine`: a Gramian engine that
  keeps the graph (stage 3: rules that read only the captured activations and gradient-outputs, as under
  FSDP2, since ZeRO-3 frees the gathered parameters).
* :meth:`~._base.Backend.after_micro_batch`: nothing — DeepSpeed reduces in its backward and steps in
  ``engine.step()``.
* :meth:`~._base.Backend.gradients_are_finite`: DeepSpeed's own overflow check of its partitions, agreed
  across ranks.
"""

from __future__ import annotations

from typing import Any, NoReturn

from torch import nn

from ...aggregation import Aggregator
from ...training_args import JDTrainingArguments, sharding_refusal
from .._compat import deepspeed_zero_stage
from .._engines import JDEngine
from ._base import Backend, EngineChoice


def deepspeed_refusal() -> ValueError:
    """DeepSpeed ZeRO enabled through accelerate (the arguments refuse ``--deepspeed`` themselves)."""
    return sharding_refusal("DeepSpeed ZeRO", "the accelerate config or environment")


class DeepSpeedBackend(Backend):
    """DeepSpeed (module docstring): detected with its ZeRO stage, refused by :meth:`check`.

    Args:
        zero_stage: the ZeRO stage of accelerate's DeepSpeed plugin (``None`` when it does not say).
    """

    name = "deepspeed"

    def __init__(self, zero_stage: int | None = None) -> None:
        self.zero_stage = zero_stage

    @classmethod
    def detect(cls, accelerator: Any, model: nn.Module) -> DeepSpeedBackend | None:
        """The backend of a run with accelerate's DeepSpeed plugin, ``None`` without it."""
        enabled, stage = deepspeed_zero_stage(accelerator)
        return cls(stage) if enabled else None

    def check(self, args: JDTrainingArguments, aggregator: Aggregator | None) -> NoReturn:
        raise deepspeed_refusal()

    def engine_choices(
        self, args: JDTrainingArguments, aggregator: Aggregator, world_size: int
    ) -> list[EngineChoice]:
        raise deepspeed_refusal()

    def build_engine(
        self, choice: EngineChoice, module: nn.Module, args: JDTrainingArguments, world_size: int
    ) -> JDEngine:
        raise deepspeed_refusal()
