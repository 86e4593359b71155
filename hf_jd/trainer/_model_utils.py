"""Small model-level utilities of the trainer: DDP / DeepSpeed unwrapping, frozen batch norm, the rank-consistency
check."""

from __future__ import annotations

import sys
from typing import cast

from torch import nn
from transformers import TrainerCallback

from ..distributed import broadcast_object_list, check_rank_consistency, world_size


class RankConsistencyCallback(TrainerCallback):
    """Compares parameter checksums across ranks after every optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if model is not None:
            check_rank_consistency(unwrap_parallel(model).parameters(), step=state.global_step)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper or a DeepSpeed engine: the JD forward and the Gramian pass must not go
    through DDP's reducer or the hooks DeepSpeed's engine puts on its outputs (they would run DeepSpeed's
    gradient reduction at the end of the Gramian pass); the update is then the backend's own backward."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    deepspeed = sys.modules.get("deepspeed")  # loaded by accelerate whenever a DeepSpeed engine exists
    engine_class = getattr(deepspeed, "DeepSpeedEngine", None)
    if engine_class is not None and isinstance(model, engine_class):
        return cast(nn.Module, model.module)
    return model


def freeze_batch_norm(module: nn.Module) -> None:
    """Put every batch-norm layer in eval mode: it normalises with (and no longer updates) its running statistics."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def broadcast_state_from_rank_zero(method: nn.Module) -> None:
    """Give every rank rank 0's state of an aggregator or scalarizer (e.g. an unseeded generator)."""
    state = method.state_dict()
    if world_size() > 1 and state:
        holder = broadcast_object_list([state], src=0)
        method.load_state_dict(holder[0])
