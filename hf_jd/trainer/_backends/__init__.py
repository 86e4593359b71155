r"""The backend seam of ``JDTrainer``: one module per way of laying a run over processes.

* :mod:`._ddp` — one process or DDP (:class:`DdpBackend`): the engines' writers, then one all-reduce of
  ``.grad`` per optimizer step (``synchronise_gradients``);
* :mod:`._fsdp2` — FSDP2, ``fully_shard`` (:class:`Fsdp2Backend`): the sharded Gramian engine, whose
  writer reduce-scatters into the gradient shards on every micro-batch; FSDP1 refused;
* :mod:`._deepspeed` — DeepSpeed ZeRO-0/1/2/3 (:class:`DeepSpeedBackend`): the Gramian engine keeps the graph,
  and the update is DeepSpeed's own backward of :math:`s\,w^\top L` (the generic path);
* :mod:`._base` — :class:`Backend` (the interface) and the generic update path every backend inherits:
  weights from the Gramian, then the backend's own backward of :math:`s\,w^\top L`.

Each module holds its backend's detection, its refusals (each written once), its engine choices and
construction, how the update reaches the optimizer and how its gradients are checked.

The trainer's calls, in order::

    backend = select_backend(accelerator, model)        # before the aggregator is built
    backend.check(args, None)                            # refusals the arguments alone decide
    ...                                                  # aggregator built
    backend.check(args, aggregator)                      # refusals that depend on the aggregator
    choices = backend.engine_choices(args, aggregator, world_size())
    engines = EngineSelector(choices, args, backend)     # backend.build_engine(choice, module, args, n)
    ...                                                  # each micro-batch:
    jd_update(engine, aggregator, losses, scale, settings, backend)  # backend.write_update(...)
    backend.after_micro_batch(engine, args, accelerator.sync_gradients)
    if accelerator.sync_gradients and not backend.gradients_are_finite(engine): ...
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...distributed import is_fsdp2_model
from ._base import Backend, EngineChoice, backward_update, gramian_engine_choices
from ._ddp import DdpBackend, synchronise_gradients
from ._deepspeed import DeepSpeedBackend, deepspeed_refusal
from ._fsdp2 import Fsdp2Backend, fsdp1_refusal, uses_fsdp2

__all__ = [
    "Backend",
    "DdpBackend",
    "DeepSpeedBackend",
    "EngineChoice",
    "Fsdp2Backend",
    "backend_for_module",
    "backward_update",
    "deepspeed_refusal",
    "fsdp1_refusal",
    "gramian_engine_choices",
    "select_backend",
    "synchronise_gradients",
    "uses_fsdp2",
]


def select_backend(accelerator: Any, model: nn.Module) -> Backend:
    """The backend of a run: DeepSpeed (accelerate's plugin), else FSDP (a ``fully_shard`` model or
    accelerate's plugin, any version), else one process / DDP. Detection only: :meth:`Backend.check` refuses."""
    return (
        DeepSpeedBackend.detect(accelerator, model) or Fsdp2Backend.detect(accelerator, model) or DdpBackend()
    )


def backend_for_module(module: nn.Module) -> Backend:
    """The backend an engine for ``module`` alone needs (no accelerator at hand): FSDP2 for a ``fully_shard``
    module, else DDP's engines."""
    return Fsdp2Backend() if is_fsdp2_model(module) else DdpBackend()
