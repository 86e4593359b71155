r"""Exact Gramian of the *global* per-example Jacobian across processes.

Rank :math:`r` holds the rows :math:`J_r \in \mathbb{R}^{B_r \times n}` of its own examples. The global
Gramian needs the cross blocks :math:`J_r J_s^\top`. Parameters are assigned to ranks (balanced by
size); one all-to-all sends every rank's rows of parameter block :math:`p` to the block's owner, so
that the owner holds the column shard :math:`J_{[:, p]}` of the global Jacobian. Each rank computes
the partial Gramian of its shard, and one all-reduce sums them:

.. math:: G = \sum_{s} J_{[:, \mathcal P_s]} J_{[:, \mathcal P_s]}^\top \in \mathbb{R}^{B \times B}.

Traffic: about :math:`B_{\text{local}}` times DDP's gradient all-reduce. Every rank ends with the same
``G`` (the all-reduce result), hence the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._tensors import gramian_of_blocks
from ..gramian import assign_owners
from ._collectives import all_gather_sizes, all_reduce_, all_to_all_flat, rank, world_size


def global_gramian(blocks: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[int]]:
    """Return the global ``[B, B]`` Gramian and every rank's number of rows.

    ``blocks`` are this rank's Jacobian blocks, each ``[B_r, n_p]``, in the same parameter order on
    every rank. Rows are ordered rank by rank.
    """
    device = blocks[0].device
    local_rows = blocks[0].shape[0]
    sizes = all_gather_sizes(local_rows, device)
    size = world_size()
    if size == 1:
        return gramian_of_blocks(blocks, dtype), sizes
    max_rows = max(sizes)
    owners = assign_owners([block.shape[1] for block in blocks], size)
    send = []
    shard_width = []
    for destination in range(size):
        mine = [block.to(dtype) for block, owner in zip(blocks, owners) if owner == destination]
        width = sum(block.shape[1] for block in mine)
        shard_width.append(width)
        payload = torch.zeros(max_rows, width, dtype=dtype, device=device)
        if mine:
            payload[:local_rows] = torch.cat(mine, dim=1)
        send.append(payload.reshape(-1))
    mine_width = shard_width[rank()]
    received = all_to_all_flat(send, [max_rows * mine_width] * size)
    shard = torch.cat(
        [part.view(max_rows, mine_width)[: sizes[source]] for source, part in enumerate(received)], dim=0
    )
    gramian = shard @ shard.T
    all_reduce_(gramian, op="sum")
    return gramian, sizes


def local_slice(sizes: Sequence[int]) -> slice:
    """The rows of the global objective vector that belong to this rank."""
    start = sum(sizes[: rank()])
    return slice(start, start + sizes[rank()])
