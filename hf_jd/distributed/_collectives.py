"""Collectives over ``torch.distributed`` used by the JD step (NCCL on GPU, gloo on CPU).

The JD backward never goes through DDP's reducer, so hf_jd synchronises gradients itself, once per
optimizer step, with the helpers below. They are no-ops on a single process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

_BUCKET_NUMEL = 25_000_000  # about 100 MB of float32 per all-reduce, like DDP's default bucket


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def all_reduce_tensors_(tensors: Sequence[Tensor], op: str = "sum") -> None:
    """In-place all-reduce of ``tensors`` (``op`` is ``"sum"`` or ``"mean"``), bucketed by dtype/device."""
    size = world_size()
    if size == 1 or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        bucket: list[Tensor] = []
        numel = 0
        for tensor in group:
            bucket.append(tensor)
            numel += tensor.numel()
            if numel >= _BUCKET_NUMEL:
                _reduce_bucket(bucket, op, size)
                bucket, numel = [], 0
        if bucket:
            _reduce_bucket(bucket, op, size)


def _reduce_bucket(bucket: list[Tensor], op: str, size: int) -> None:
    flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if op == "mean":
        flat.div_(size)
    offset = 0
    for tensor in bucket:
        numel = tensor.numel()
        tensor.copy_(flat[offset : offset + numel].view_as(tensor))
        offset += numel


def all_reduce_grads_(params: Sequence[Tensor], op: str = "mean") -> None:
    """All-reduce the ``.grad`` of ``params`` (a missing ``.grad`` counts as zero on that rank)."""
    if world_size() == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    all_reduce_tensors_([param.grad for param in params if param.grad is not None], op=op)


def any_across_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_gather_sizes(size: int, device: torch.device) -> list[int]:
    """Gather one integer per rank (e.g. each rank's number of local objectives)."""
    if world_size() == 1:
        return [size]
    local = torch.tensor([size], device=device, dtype=torch.long)
    gathered = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    return [int(value.item()) for value in gathered]


def all_gather_vector(vector: Tensor) -> Tensor:
    """The concatenation, in rank order, of every rank's 1-D ``vector`` (sizes may differ per rank)."""
    if world_size() == 1:
        return vector
    sizes = all_gather_sizes(vector.numel(), vector.device)
    padded = torch.zeros(max(sizes), dtype=vector.dtype, device=vector.device)
    padded[: vector.numel()] = vector
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])
