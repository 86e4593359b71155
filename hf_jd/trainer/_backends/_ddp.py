r"""One process, or DDP: every rank holds the whole model and writes its own update into ``.grad``.

**Detection**: the default, when neither DeepSpeed nor FSDP is in use (``select_backend``). The JD
backward never goes through DDP's reducer (the trainer runs the unwrapped module), so the ranks'
gradients are synchronised by hand.

**Engines** (``jd_engine="auto"`` tries them in order, falling back with one warning):

1. the Gramian engine (no explicit ``J``), outputs of leading dimension 1 expanded to the batch;
2. the Gramian engine without that expansion (for model code that cannot take the expanded tensor,
   e.g. relative-attention models that repeat it themselves);
3. the explicit-Jacobian engine (exact for any loss vector and any model autograd can differentiate).

With several processes and ``jd_scope="global"``, per-example objectives keep this order (the Gramian
engine forms the global Gramian, ``hf_jd.gramian._global``); per-task objectives use 3 alone (the task
Jacobian is sharded across ranks by a reduce-scatter). ``jd_engine="gramian"`` keeps 1–2;
``jd_engine="jacobian"`` is 3 alone; aggregators that need ``J`` itself use 3.

**How the update reaches the optimizer**: the engine's one-backward writer (``accumulate_grad``) adds
this rank's update to ``.grad`` on every micro-batch; after the last micro-batch of an optimizer step
:func:`synchronise_gradients` all-reduces ``.grad`` once, matching the JD scope (mean of the local
steps; sum of the ranks' shares ``J_rᵀ w_r`` of the global per-example step; nothing for the global
per-task step, whose ``J`` was already averaged over ranks). With ``update="backward"`` the generic path
of :class:`~._base.Backend` writes instead (the explicit-Jacobian engine, keeping its graph), and the
global per-task step, written from each rank's own ``J_r``, is averaged over ranks.

**Finiteness**: the full ``.grad`` of the engine's parameters (identical on every rank once synchronised).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from ...aggregation import Aggregator, GramianWeightedAggregator
from ...distributed import RankCollectives, all_reduce_grads_, world_size
from ...gramian import GramianEngine, RepresentationEngine
from ...training_args import JDTrainingArguments
from .._engines import JDEngine
from .._jacobian_backend import JacobianBackend
from ._base import Backend, EngineChoice


def engine_choices(args: JDTrainingArguments, aggregator: Aggregator, world_size: int) -> list[EngineChoice]:
    """The engines to try, in order, for these settings (module docstring)."""
    if args.jd_gramian == "representation":
        return [EngineChoice("representation")]
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
    choice: EngineChoice,
    module: nn.Module,
    args: JDTrainingArguments,
    world_size: int,
    keep_graph: bool = False,
) -> JDEngine:
    """Instantiate ``choice`` for ``module``; the Gramian engine runs its static check here.

    ``keep_graph``: the engine keeps the graph of the losses for the generic update path.
    """
    per_task = args.jd_objectives == "per_task"
    collectives = RankCollectives() if world_size > 1 and args.jd_scope == "global" else None
    if choice.kind == "representation":
        return RepresentationEngine(module, args.jd_representation, collectives)
    if choice.kind == "jacobian":
        chunk = 1 if args.torch_compile else args.jd_parallel_chunk_size
        average = per_task and world_size > 1 and args.jd_scope == "global"
        return JacobianBackend(
            module,
            per_task=per_task,
            parallel_chunk_size=chunk,
            average_over_ranks=average,
            keep_graph=keep_graph,
        )
    engine = GramianEngine(
        module,
        objectives=args.jd_objectives,
        expand_broadcast=choice.expand_broadcast,
        collectives=collectives,
        keep_graph=keep_graph,
    )
    engine.check_supported()
    return engine


def synchronise_gradients(
    params: Sequence[nn.Parameter], scope: str, objectives: str, *, rank_local: bool = False
) -> None:
    """Once per optimizer step: the all-reduce that DDP would have done, matching the JD scope.

    ``rank_local``: the global per-task update was written from this rank's own Jacobian (the generic path,
    or the representation Gramian's global weights) rather than from the rank-mean one, so it is averaged
    like a local step.
    """
    if world_size() == 1:
        return
    if scope == "local" or (objectives == "per_task" and rank_local):
        all_reduce_grads_(params, op="mean")
    elif objectives == "per_example":
        all_reduce_grads_(params, op="sum")  # Σ_r J_rᵀ w_r = Jᵀ w
    # per-task global: J was already averaged over ranks, every rank holds the same .grad.


class DdpBackend(Backend):
    """One process or DDP (module docstring).

    Args:
        update: ``"engine"`` (default): the engine's one-backward writer; ``"backward"``: the generic path
            (a backward of ``wᵀL`` through the graph the explicit-Jacobian engine keeps), e.g. to check a
            backend's own backward against the writers.
    """

    name = "ddp"

    def __init__(self, update: Literal["engine", "backward"] = "engine") -> None:
        if update not in ("engine", "backward"):
            raise ValueError(f"update must be 'engine' or 'backward', got {update!r}.")
        self.update = update

    def check(self, args: JDTrainingArguments, aggregator: Aggregator | None) -> None:
        if self.update == "backward" and args.jd_engine == "gramian":
            raise ValueError(
                "jd_engine='gramian' with the generic update path: the Gramian engine frees the graph of the "
                "losses in its one backward, and the generic path back-propagates wᵀL through it. Use "
                "jd_engine='auto' or 'jacobian'."
            )

    def engine_choices(
        self, args: JDTrainingArguments, aggregator: Aggregator, world_size: int
    ) -> list[EngineChoice]:
        if self.update == "backward":
            return [EngineChoice("jacobian")]
        return engine_choices(args, aggregator, world_size)

    def build_engine(
        self, choice: EngineChoice, module: nn.Module, args: JDTrainingArguments, world_size: int
    ) -> JDEngine:
        return build_engine(choice, module, args, world_size, keep_graph=self.update == "backward")

    def write_update(
        self, engine: JDEngine, losses: Tensor, weights: Tensor, scale: float, *, per_task: bool
    ) -> None:
        if self.update == "backward":
            super().write_update(engine, losses, weights, scale, per_task=per_task)
        else:
            engine.accumulate_grad(weights, scale)

    def after_micro_batch(self, engine: JDEngine, args: JDTrainingArguments, sync_gradients: bool) -> None:
        """After the last micro-batch of an optimizer step: :func:`synchronise_gradients` (unless the engine
        synchronised them itself)."""
        if sync_gradients and not engine.synchronises_gradients:
            rank_local = self.update == "backward" or isinstance(engine, RepresentationEngine)
            synchronise_gradients(engine.params, args.jd_scope, args.jd_objectives, rank_local=rank_local)
