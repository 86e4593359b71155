"""Distributed Jacobian descent: collectives, the global per-example Gramian, consistency checks, FSDP2."""

from ._collectives import (
    all_gather_vector,
    all_reduce_grads_,
    all_reduce_tensors_,
    any_across_ranks,
    rank,
    world_size,
)
from ._consistency import check_rank_consistency, parameter_checksum
from ._fsdp import ShardingError, is_fsdp2_model, sharded_parameters
from ._fsdp_engine import FSDPGramianEngine
from ._global_gramian import assign_blocks, global_gramian, local_slice

__all__ = [
    "FSDPGramianEngine",
    "ShardingError",
    "all_gather_vector",
    "all_reduce_grads_",
    "all_reduce_tensors_",
    "any_across_ranks",
    "assign_blocks",
    "check_rank_consistency",
    "global_gramian",
    "is_fsdp2_model",
    "local_slice",
    "parameter_checksum",
    "rank",
    "sharded_parameters",
    "world_size",
]
