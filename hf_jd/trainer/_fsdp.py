r"""``JDTrainer`` on FSDP2: which sharded setups it serves, and the engine it routes them to.

With accelerate's FSDP plugin v2 (``fsdp_version: 2``; ``fsdp_config={"version": 2}``, the default of
``transformers`` 5), ``accelerator.prepare`` applies ``fully_shard`` to the model in place: the model's
parameters become ``DTensor`` shards. ``JDTrainer`` then runs the JD step with
:class:`hf_jd.distributed.FSDPGramianEngine`: the Gramian from the unsharded activations and
gradient-outputs each rank sees, and :math:`J^\top w` reduce-scattered into the gradient shards on
every micro-batch (so no gradient synchronisation follows). Per example and per task, ``jd_scope``
``"local"`` or ``"global"``, Gramian-weighted aggregators.

Refused, with the reason: FSDP1 (``FullyShardedDataParallel`` wraps flat parameters; use FSDP2),
DeepSpeed ZeRO (refused by the training arguments), ``jd_engine="jacobian"`` and aggregators that
need :math:`J` itself (the explicit Jacobian is never formed under FSDP2), and ``--scalarizer`` (not
tested under FSDP2).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..distributed import FSDPGramianEngine, is_fsdp2_model, world_size
from ..training_args import JDTrainingArguments
from ._engine_choice import EngineChoice
from ._engines import JDEngine


def accelerate_fsdp_version(accelerator: Any) -> int | None:
    """The FSDP version of accelerate's FSDP plugin, ``None`` without FSDP."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None:
        return None
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def check_fsdp(args: JDTrainingArguments, aggregator: Aggregator | None) -> None:
    """Refuse what the FSDP2 path does not serve (FSDP1 and DeepSpeed are refused by ``check_sharding``)."""
    if args.scalarizer is not None:
        raise ValueError("--scalarizer under FSDP2 is not supported yet; use an aggregator, or plain DDP.")
    if args.jd_engine == "jacobian":
        raise ValueError(
            "jd_engine='jacobian' under FSDP2: the explicit Jacobian would hold full-size gradients of every "
            "parameter. Use jd_engine='auto' or 'gramian' (the sharded Gramian engine)."
        )
    if aggregator is not None and not isinstance(aggregator, GramianWeightedAggregator):
        raise ValueError(
            f"aggregator {args.aggregator!r} needs the Jacobian itself, which is never formed under FSDP2; use a "
            "Gramian-weighted aggregator (e.g. 'upgrad', 'mgda', 'mean')."
        )


def fsdp_engine_choices(args: JDTrainingArguments) -> list[EngineChoice]:
    """FSDP2 candidates: the sharded Gramian engine, with and without broadcast expansion (no Jacobian engine)."""
    choices = [EngineChoice("gramian", expand_broadcast=args.jd_expand_broadcast)]
    if args.jd_expand_broadcast:
        choices.append(EngineChoice("gramian", expand_broadcast=False))
    return choices


def uses_fsdp2(model: nn.Module, accelerator: Any) -> bool:
    """Whether the run is sharded with FSDP2: the model already is, or accelerate will shard it."""
    return is_fsdp2_model(model) or accelerate_fsdp_version(accelerator) == 2


def build_fsdp_engine(choice: EngineChoice, module: nn.Module, args: JDTrainingArguments) -> JDEngine:
    """The sharded Gramian engine for a ``fully_shard`` module (the explicit Jacobian is refused)."""
    if choice.kind != "gramian":
        raise ValueError(f"{choice} cannot serve an FSDP2 model: its gradients must land in the shards.")
    scope = args.jd_scope if world_size() > 1 else "local"
    engine = FSDPGramianEngine(
        module, objectives=args.jd_objectives, scope=scope, expand_broadcast=choice.expand_broadcast
    )
    engine.check_supported()
    return engine
