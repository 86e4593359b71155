"""The collectives of the JD step: Accelerate's operations where they exist, raw ``torch.distributed``
for the rest (all-to-all, reduce-scatter), all behind this one module.

The JD backward never goes through DDP's reducer, so hf_jd synchronises gradients itself, once per
optimizer step. All-reduce, all-gather and broadcast go through :mod:`accelerate.utils`
(``reduce``, ``gather``, ``broadcast``, ``broadcast_object_list``), so the same code serves NCCL,
gloo and the other backends Accelerate knows; ``torch.distributed`` is called directly only for the
all-to-all and the reduce-scatter, which Accelerate does not offer, for the collectives on an explicit
process group (FSDP2's shard group: ``*_on`` helpers), and when Accelerate's state does not span the
process group (a script that called ``init_process_group`` itself: Accelerate's operations would then be
the identity). Every other helper is a no-op (or the identity) on a single process.

This is the one module of ``hf_jd`` that moves data with ``torch.distributed`` (all-reduce, all-gather,
all-to-all, reduce-scatter, broadcast, send/receive); the others only ask for ranks, sizes and groups.
``tests/distributed/test_collectives_boundary.py`` checks that claim on the sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import broadcast_object_list as _accelerate_broadcast_object_list
from accelerate.utils import gather as _accelerate_gather_op
from accelerate.utils import reduce as _accelerate_reduce_op
from torch import Tensor

_BUCKET_NUMEL = 25_000_000  # about 100 MB of float32 per all-reduce, like DDP's default bucket


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _accelerate_knows_the_group() -> bool:
    """Whether Accelerate's state spans the default process group.

    Accelerate's operations are the identity when its state is not initialised (e.g. a plain ``torchrun``
    script that called ``init_process_group`` itself): using them then would silently skip the exchange.
    """
    return bool(PartialState._shared_state) and PartialState().num_processes == world_size()


def _accelerate_reduce(tensor: Tensor, reduction: str) -> Tensor:
    if _accelerate_knows_the_group():
        return _accelerate_reduce_op(tensor, reduction=reduction)
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if reduction == "max" else dist.ReduceOp.SUM)
    return reduced / world_size() if reduction == "mean" else reduced


def _accelerate_gather(tensor: Tensor) -> Tensor:
    if _accelerate_knows_the_group():
        return _accelerate_gather_op(tensor)
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def reduced(tensor: Tensor, op: str = "sum") -> Tensor:
    """A copy of ``tensor`` all-reduced over ranks (``op``: ``"sum"``, ``"mean"`` or ``"max"``); ``tensor``
    itself on one process. Every rank receives the same bits (each element is reduced once and sent)."""
    if world_size() == 1:
        return tensor
    return _accelerate_reduce(tensor, reduction=op)


def all_reduce_(tensor: Tensor, op: str = "sum") -> None:
    """In-place all-reduce of one tensor (``op``: ``"sum"``, ``"mean"`` or ``"max"``), through Accelerate."""
    if world_size() > 1:
        tensor.copy_(reduced(tensor, op))


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
                _reduce_bucket(bucket, op)
                bucket, numel = [], 0
        if bucket:
            _reduce_bucket(bucket, op)


def _reduce_bucket(bucket: list[Tensor], op: str) -> None:
    flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
    if flat.device.type in ("cpu", "cuda"):  # the bucket is ours: reduced in place, without Accelerate's copy
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if op == "mean":
            flat.div_(world_size())
    else:
        all_reduce_(flat, op)
    offset = 0
    for tensor in bucket:
        numel = tensor.numel()
        tensor.copy_(flat[offset : offset + numel].view_as(tensor))
        offset += numel


def all_reduce_grads_(params: Sequence[Tensor], op: str = "mean") -> None:
    """All-reduce the ``.grad`` of ``params``, as DDP does for the parameters used on some rank.

    A parameter with a ``.grad`` on at least one rank gets the reduced gradient on every rank (a missing
    ``.grad`` counts as zero there); a parameter with no ``.grad`` on any rank keeps ``.grad = None``
    everywhere, so the optimizer skips it on every rank alike.
    """
    if world_size() == 1 or not params:
        return
    used = on_any_rank([param.grad is not None for param in params], params[0].device)
    for param, flag in zip(params, used):
        if flag and param.grad is None:
            param.grad = torch.zeros_like(param)
    all_reduce_tensors_(
        [param.grad for param, flag in zip(params, used) if flag and param.grad is not None], op=op
    )


def on_any_rank(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of every rank's ``flags`` (one all-reduce; the same list on every rank)."""
    if world_size() == 1 or not flags:
        return list(flags)
    tensor = torch.tensor([float(flag) for flag in flags], device=device)
    all_reduce_(tensor, op="max")
    return [bool(value > 0) for value in tensor.tolist()]


def any_across_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    return max_across_ranks(int(flag), device) > 0


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's ``value`` (e.g. a failure code), on every rank."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], device=device)
    all_reduce_(tensor, op="max")
    return int(tensor.item())


def all_gather_ints(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's list of integers (the same length on every rank), in rank order."""
    local = torch.tensor(list(values), device=device, dtype=torch.long)
    if world_size() == 1:
        return [local.tolist()]
    return _accelerate_gather(local).view(world_size(), -1).tolist()


def all_gather_sizes(size: int, device: torch.device) -> list[int]:
    """Gather one integer per rank (e.g. each rank's number of local objectives)."""
    return [row[0] for row in all_gather_ints([size], device)]


def all_gather_flat(vector: Tensor, sizes: Sequence[int] | None = None) -> list[Tensor]:
    """Every rank's 1-D ``vector`` (lengths may differ per rank; pass ``sizes`` when known), in rank order."""
    if world_size() == 1:
        return [vector]
    if sizes is None:
        sizes = all_gather_sizes(vector.numel(), vector.device)
    padded = vector
    if vector.numel() != max(sizes):
        padded = torch.zeros(max(sizes), dtype=vector.dtype, device=vector.device)
        padded[: vector.numel()] = vector
    gathered = _accelerate_gather(padded.contiguous()).view(world_size(), -1)
    return [gathered[source, :size] for source, size in enumerate(sizes)]


def all_gather_equal(vector: Tensor) -> Tensor:
    """The concatenation, in rank order, of every rank's 1-D ``vector`` of one common length.

    Accelerate's ``gather`` (``all_gather_into_tensor``) on NCCL and the others; on gloo, whose
    ``all_gather`` is about 3x slower than its all-reduce of the gathered size (measured, 2 CPU processes,
    35 MB), an all-reduce of the zero-padded vector instead: exact (``x + 0 = x``), the same bits everywhere.
    """
    size = world_size()
    if size == 1:
        return vector
    if dist.get_backend() != "gloo":
        return _accelerate_gather(vector.contiguous())
    full = torch.zeros(size, vector.numel(), dtype=vector.dtype, device=vector.device)
    full[rank()] = vector
    all_reduce_(full, op="sum")
    return full.view(-1)


def all_gather_vector(vector: Tensor) -> Tensor:
    """The concatenation, in rank order, of every rank's 1-D ``vector`` (sizes may differ per rank)."""
    if world_size() == 1:
        return vector
    return torch.cat(all_gather_flat(vector))


def all_to_all_flat(parts: Sequence[Tensor], receive_sizes: Sequence[int]) -> list[Tensor]:
    """Send ``parts[d]`` (1-D) to rank ``d``; return what every rank sent here (``receive_sizes[s]`` each).

    Raw ``torch.distributed.all_to_all_single`` (Accelerate has no all-to-all).
    """
    if world_size() == 1:
        return [parts[0]]
    send = torch.cat([part.reshape(-1) for part in parts])
    receive = torch.empty(sum(receive_sizes), dtype=send.dtype, device=send.device)
    dist.all_to_all_single(
        receive,
        send,
        output_split_sizes=list(receive_sizes),
        input_split_sizes=[part.numel() for part in parts],
    )
    return list(receive.split(list(receive_sizes)))


def reduce_scatter_flat(chunks: Tensor) -> Tensor:
    """``chunks`` is ``[N, c]``: return ``Σ_r chunks_r[rank]`` (``[c]``), this rank's reduced chunk.

    ``reduce_scatter_tensor`` where the backend has it (NCCL); otherwise (gloo) an all-to-all of the
    chunks followed by a local sum in rank order, which moves the same bytes. Raw ``torch.distributed``
    (Accelerate has no reduce-scatter).
    """
    size = world_size()
    if size == 1:
        return chunks[0].clone()
    if dist.get_backend() != "gloo":
        out = torch.empty(chunks.shape[1], dtype=chunks.dtype, device=chunks.device)
        dist.reduce_scatter_tensor(out, chunks.contiguous())
        return out
    receive = torch.empty_like(chunks)
    dist.all_to_all_single(receive, chunks.contiguous())
    return receive.sum(dim=0)


def reduce_scatter_on(out: Tensor, tensor: Tensor, group: dist.ProcessGroup) -> None:
    """``out`` (``[c, ...]``) receives this rank's chunk of the sum over ``group`` of every rank's ``tensor``
    (``[N c, ...]``): raw ``reduce_scatter_tensor`` on an explicit group (FSDP2's shard group)."""
    dist.reduce_scatter_tensor(out, tensor, op=dist.ReduceOp.SUM, group=group)


def all_to_all_on(receive: Tensor, send: Tensor, group: dist.ProcessGroup) -> None:
    """Block ``d`` of ``send`` (its first dimension split in ``N`` equal blocks) goes to rank ``d`` of ``group``;
    ``receive`` holds, block by block, what every rank sent here: raw ``all_to_all_single`` on an explicit group."""
    dist.all_to_all_single(receive, send, group=group)


def all_reduce_sum_on_(tensor: Tensor, group: dist.ProcessGroup | None) -> None:
    """In-place sum of ``tensor`` over ``group`` (the default group when ``None``): raw ``all_reduce``, for a
    group that Accelerate's operations do not take (FSDP2's shard group)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def broadcast_object_list(objects: list[Any], src: int = 0) -> list[Any]:
    """Every rank receives rank ``src``'s ``objects`` (in place), through Accelerate."""
    if world_size() == 1:
        return objects
    if _accelerate_knows_the_group():
        return _accelerate_broadcast_object_list(objects, from_process=src)
    dist.broadcast_object_list(objects, src=src)
    return objects


class RankCollectives:
    """The collectives the Gramian engine's global step needs (see ``hf_jd.gramian.Collectives``)."""

    def world_size(self) -> int:
        return world_size()

    def rank(self) -> int:
        return rank()

    def gather_ints(self, values: Sequence[int], device: torch.device) -> list[list[int]]:
        return all_gather_ints(values, device)

    def gather_flat(self, vector: Tensor, sizes: Sequence[int]) -> list[Tensor]:
        return all_gather_flat(vector, sizes)

    def all_to_all(self, parts: Sequence[Tensor], receive_sizes: Sequence[int]) -> list[Tensor]:
        return all_to_all_flat(parts, receive_sizes)

    def all_reduce_sum_(self, tensor: Tensor) -> None:
        all_reduce_(tensor, op="sum")
