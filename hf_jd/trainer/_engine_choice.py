"""Which JD engine a run uses, and what ``jd_engine="auto"`` falls back to.

The candidates are tried in order; ``auto`` moves to the next one, with one warning naming the cause,
when a candidate cannot serve the model (static check), crashes on the first step, or fails the
exactness self-check:

1. the Gramian engine (no explicit ``J``), outputs of leading dimension 1 expanded to the batch;
2. the Gramian engine without that expansion (for model code that cannot take the expanded tensor,
   e.g. relative-attention models that repeat it themselves);
3. the explicit-Jacobian engine (exact for any loss vector and any model autograd can differentiate).

``jd_engine="gramian"`` keeps 1–2 and raises instead of reaching 3; ``jd_engine="jacobian"`` is 3 alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..training_args import JDTrainingArguments
from ._engines import JDEngine
from ._jacobian_backend import JacobianBackend


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
    if world_size > 1 and args.jd_scope == "global":
        if args.jd_engine == "gramian":
            raise ValueError(
                "jd_engine='gramian' computes each process's Gramian locally; with several processes and "
                "jd_scope='global' use jd_engine='auto' or 'jacobian', or set jd_scope='local'."
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
    per_task = args.jd_objectives == "per_task"
    if choice.kind == "jacobian":
        chunk = 1 if args.torch_compile else args.jd_parallel_chunk_size
        average = per_task and world_size > 1 and args.jd_scope == "global"
        return JacobianBackend(
            module, per_task=per_task, parallel_chunk_size=chunk, average_over_ranks=average
        )
    from ..gramian import GramianEngine

    engine = GramianEngine(module, objectives=args.jd_objectives, expand_broadcast=choice.expand_broadcast)
    engine.check_supported()
    return engine
