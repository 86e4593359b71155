"""Which JD engine a run uses, and what ``jd_engine="auto"`` falls back to.

The candidates are tried in order; ``auto`` moves to the next one, with one warning naming the cause,
when a candidate cannot serve the model (static check), crashes on the first step, or fails the
exactness self-check:

1. the Gramian engine (no explicit ``J``), outputs of leading dimension 1 expanded to the batch;
2. the Gramian engine without that expansion (for model code that cannot take the expanded tensor,
   e.g. relative-attention models that repeat it themselves);
3. the explicit-Jacobian engine (exact for any loss vector and any model autograd can differentiate).

With several processes and ``jd_scope="global"``, per-example objectives keep this order (the Gramian
engine forms the global Gramian, ``hf_jd.gramian._global``); per-task objectives use 3 alone (the task
Jacobian is sharded across ranks by a reduce-scatter).

``jd_engine="gramian"`` keeps 1–2 and raises instead of reaching 3; ``jd_engine="jacobian"`` is 3 alone.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..distributed import world_size
from ..gramian import GramianMismatchError
from ..training_args import JDTrainingArguments
from ._engines import JDEngine
from ._jacobian_backend import JacobianBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    """One candidate engine and its settings."""

    kind: Literal["gramian", "jacobian"]
    expand_broadcast: bool = True

    def __str__(self) -> str:
        if self.kind == "jacobian":
            return "the explicit-Jacobian engine"
        return "the Gramian engine" + ("" if self.expand_broadcast else " without broadcast expansion")


def engine_choices(args: JDTrainingArguments, aggregator: Aggregator, world_size: int) -> list[EngineChoice]:
    """The engines to try, in order, for these settings."""
    jacobian = [EngineChoice("jacobian")]
    if args.jd_engine == "jacobian" or not isinstance(aggregator, GramianWeightedAggregator):
        return jacobian
    if world_size > 1 and args.jd_scope == "global" and args.jd_objectives == "per_task":
        if args.jd_engine == "gramian":
            raise ValueError(
                "jd_engine='gramian' computes each process's per-task Gramian locally; with several processes "
                "and jd_scope='global' per-task JD uses the explicit Jacobian, sharded across ranks: use "
                "jd_engine='auto' or 'jacobian', or set jd_scope='local'."
            )
        return jacobian
    gramian = [EngineChoice("gramian", expand_broadcast=args.jd_expand_broadcast)]
    if args.jd_expand_broadcast:
        gramian.append(EngineChoice("gramian", expand_broadcast=False))
    return gramian + (jacobian if args.jd_engine == "auto" else [])


def build_engine(
    choice: EngineChoice, module: nn.Module, args: JDTrainingArguments, world_size: int
) -> JDEngine:
    """Instantiate ``choice`` for ``module``; the Gramian engine runs its static check here."""
    from ..distributed import is_fsdp2_model

    if is_fsdp2_model(module):  # FSDP2: the sharded Gramian engine (hf_jd/trainer/_fsdp.py)
        from ._fsdp import build_fsdp_engine

        return build_fsdp_engine(choice, module, args)
    per_task = args.jd_objectives == "per_task"
    if choice.kind == "jacobian":
        chunk = 1 if args.torch_compile else args.jd_parallel_chunk_size
        average = per_task and world_size > 1 and args.jd_scope == "global"
        return JacobianBackend(
            module, per_task=per_task, parallel_chunk_size=chunk, average_over_ranks=average
        )
    from ..distributed import RankCollectives
    from ..gramian import GramianEngine

    collectives = RankCollectives() if world_size > 1 and args.jd_scope == "global" else None
    engine = GramianEngine(
        module,
        objectives=args.jd_objectives,
        expand_broadcast=choice.expand_broadcast,
        collectives=collectives,
    )
    engine.check_supported()
    return engine


class EngineSelector:
    """The engine of a run and the fallback state of ``auto``: which candidate is in use, whether it has
    completed a step, and when its exactness self-check is due."""

    def __init__(self, choices: list[EngineChoice], args: JDTrainingArguments) -> None:
        self.choices = choices
        self.args = args
        self.index = 0
        self.engine: JDEngine | None = None
        #: the current engine completed a step (its first self-check passed)
        self.confirmed = False
        self._last_verified_step = -1

    @property
    def choice(self) -> EngineChoice:
        return self.choices[self.index]

    def current(self, module: nn.Module) -> JDEngine:
        """The current engine, built on first use; a candidate that cannot serve the model is skipped."""
        while self.engine is None:
            choice = self.choice
            try:
                self.engine = build_engine(choice, module, self.args, world_size())
            except Exception as error:
                if not self.fall_back(error, rerun=False):
                    raise
            else:
                logger.info("JDTrainer uses %s.", choice)
        return self.engine

    def verification_due(self, global_step: int) -> bool:
        """The exactness self-check runs on the engine's first step and every ``jd_verify_every`` steps
        (on the first micro-batch of those steps)."""
        if not self.confirmed:
            return True
        every = self.args.jd_verify_every
        if not every or global_step % every or self._last_verified_step == global_step:
            return False
        self._last_verified_step = global_step
        return True

    def fall_back(self, error: Exception, rerun: bool) -> bool:
        """Move ``auto`` to the next engine after ``error``; ``False`` when there is none left.

        A static refusal (``rerun=False``: the engine could not be built for this model) or a failed
        exactness self-check skips every candidate of the same kind: their settings cannot help.
        """
        failed = self.choice
        index = self.index + 1
        if not rerun or isinstance(error, GramianMismatchError):  # the settings of the kind cannot help
            while index < len(self.choices) and self.choices[index].kind == failed.kind:
                index += 1
        if index >= len(self.choices):
            return False
        self.index, self.engine, self.confirmed = index, None, False
        chosen = self.choice
        cause = f"{type(error).__name__}: {error}"
        if rerun:
            message = (
                f"hf_jd: {failed} failed on the first step ({cause}). The micro-batch is run again, with the same "
                f"random state, with {chosen}, which is used from now on."
            )
        else:
            message = f"hf_jd: {failed} cannot serve this model ({cause}); using {chosen}."
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        return True
