r"""FSDP2 (``fully_shard``): which sharded setups ``JDTrainer`` serves, and the engine it routes them to.

**Detection**: the model is already sharded by ``fully_shard``, or accelerate's FSDP plugin will shard
it. With the plugin v2 (``fsdp_version: 2``; ``fsdp_config={"version": 2}``, the default of
``transformers`` 5), ``accelerator.prepare`` applies ``fully_shard`` to the model in place: its
parameters become ``DTensor`` shards.

**Engines**: :class:`hf_jd.distributed.FSDPGramianEngine` only, with and without broadcast expansion —
the Gramian from the unsharded activations and gradient-outputs each rank sees. Per example and per
task, ``jd_scope`` ``"local"`` or ``"global"``, Gramian-weighted aggregators.

**Refused**, with the reason (each refusal written once; the arguments raise the same messages, see
:func:`hf_jd.training_args.fsdp2_refusal` and :func:`hf_jd.training_args.sharding_refusal`): FSDP1
(``FullyShardedDataParallel`` wraps flat parameters; use FSDP2), ``jd_engine="jacobian"`` and
aggregators that need :math:`J` itself (the explicit Jacobian is never formed under FSDP2), and
``--scalarizer`` (not tested under FSDP2).

**How the update reaches the optimizer**: :math:`J^\top w` is reduce-scattered into the ``DTensor``
gradient shards by the engine's writer on every micro-batch, so nothing follows the last micro-batch.

**Finiteness**: the local gradient shards, one decision agreed across ranks (the engine's
``gradients_are_finite``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...aggregation import Aggregator, GramianWeightedAggregator
from ...distributed import FSDPGramianEngine, is_fsdp2_model
from ...training_args import JDTrainingArguments, fsdp2_refusal, sharding_refusal
from .._compat import fsdp_plugin_version
from .._engines import JDEngine
from ._base import Backend, EngineChoice, gramian_engine_choices


def uses_fsdp2(model: nn.Module, accelerator: Any) -> bool:
    """Whether the run is sharded with FSDP2: the model already is, or accelerate will shard it."""
    return is_fsdp2_model(model) or fsdp_plugin_version(accelerator) == 2


def fsdp1_refusal() -> ValueError:
    """FSDP1 enabled through accelerate (the arguments refuse ``fsdp_config={'version': 1}`` themselves)."""
    return sharding_refusal("FSDP1", "the accelerate config or environment")


class Fsdp2Backend(Backend):
    """FSDP under ``JDTrainer`` (module docstring): version 2 served, version 1 refused.

    Args:
        version: the FSDP version in use (2: ``fully_shard``; 1: accelerate's FSDP1 plugin, refused).
    """

    name = "fsdp2"

    def __init__(self, version: int = 2) -> None:
        self.version = version

    @classmethod
    def detect(cls, accelerator: Any, model: nn.Module) -> Fsdp2Backend | None:
        """The backend of a model sharded (or to be sharded) with FSDP, ``None`` without FSDP."""
        if is_fsdp2_model(model):
            return cls(2)
        version = fsdp_plugin_version(accelerator)
        return None if version is None else cls(version)

    def check(self, args: JDTrainingArguments, aggregator: Aggregator | None) -> None:
        if self.version != 2:
            raise fsdp1_refusal()
        needs_jacobian = aggregator is not None and not isinstance(aggregator, GramianWeightedAggregator)
        refusal = fsdp2_refusal(args.jd_engine, args.scalarizer, args.aggregator, needs_jacobian)
        if refusal is not None:
            raise refusal
        if args.jd_gramian == "representation":
            raise ValueError(
                "FSDP2 with jd_gramian='representation' is not served yet: use DDP or DeepSpeed, or jd_gramian='exact'."
            )

    def engine_choices(
        self, args: JDTrainingArguments, aggregator: Aggregator, world_size: int
    ) -> list[EngineChoice]:
        return gramian_engine_choices(args)

    def build_engine(
        self, choice: EngineChoice, module: nn.Module, args: JDTrainingArguments, world_size: int
    ) -> JDEngine:
        """The sharded Gramian engine for a ``fully_shard`` module (the explicit Jacobian is refused)."""
        if choice.kind != "gramian":
            raise ValueError(f"{choice} cannot serve an FSDP2 model: its gradients must land in the shards.")
        scope = args.jd_scope if world_size > 1 else "local"
        engine = FSDPGramianEngine(
            module, objectives=args.jd_objectives, scope=scope, expand_broadcast=choice.expand_broadcast
        )
        engine.check_supported()
        return engine

    def write_update(
        self, engine: JDEngine, losses: Tensor, weights: Tensor, scale: float, *, per_task: bool
    ) -> None:
        """The engine's writer: ``Jᵀw`` reduce-scattered into the gradient shards (a collective)."""
        engine.accumulate_grad(weights, scale)
