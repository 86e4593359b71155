"""Distributed Jacobian descent: collectives, the global per-example Gramian, the sharded per-task
Jacobian, consistency checks, FSDP2."""

from ._collectives import (
    RankCollectives,
    all_gather_equal,
    all_gather_flat,
    all_gather_vector,
    all_reduce_,
    all_reduce_grads_,
    all_reduce_tensors_,
    any_across_ranks,
    broadcast_object_list,
    max_across_ranks,
    on_any_rank,
    rank,
    reduce_scatter_flat,
    reduced,
    world_size,
)
from ._consistency import check_rank_consistency, parameter_checksum
from ._fsdp import ShardingError, is_fsdp2_model, sharded_parameters
from ._fsdp_engine import FSDPGramianEngine
from ._global_gramian import global_gramian, local_slice
from ._sharded_jacobian import ShardedTaskJacobian

__all__ = [
    "FSDPGramianEngine",
    "RankCollectives",
    "ShardedTaskJacobian",
    "ShardingError",
    "all_gather_equal",
    "all_gather_flat",
    "all_gather_vector",
    "all_reduce_",
    "all_reduce_grads_",
    "all_reduce_tensors_",
    "any_across_ranks",
    "broadcast_object_list",
    "check_rank_consistency",
    "global_gramian",
    "is_fsdp2_model",
    "local_slice",
    "max_across_ranks",
    "on_any_rank",
    "parameter_checksum",
    "rank",
    "reduce_scatter_flat",
    "reduced",
    "sharded_parameters",
    "world_size",
]
