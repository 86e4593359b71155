r"""Per-task JD over several processes with the task Jacobian sharded across ranks (reduce-scatter).

With ``k`` task losses averaged over ranks, the Jacobian of the global step is
:math:`J = \frac1N \sum_r J_r \in \mathbb{R}^{k \times n}`. Instead of all-reducing the full ``k × n``
:math:`J` (every rank then holds all of it), its columns are cut into ``N`` equal shards
:math:`\mathcal C_s` and one reduce-scatter leaves rank ``s`` with :math:`J_{[:, \mathcal C_s]}` only:

.. math::

   G = \sum_s J_{[:, \mathcal C_s \cap \mathcal S]} J_{[:, \mathcal C_s \cap \mathcal S]}^\top
   \quad\text{(one all-reduce of } k \times k\text{)},\qquad
   u_{\mathcal C_s} = \begin{cases} w^\top J_{[:, c]} & c \in \mathcal S \\ \mathbf 1^\top J_{[:, c]} & c \notin \mathcal S \end{cases}
   \quad\text{(one all-gather)},

where :math:`\mathcal S` are the columns of shared parameters (reached by at least two tasks; a
task-specific head gets its plain task gradient, as in TorchJD's ``mtl_backward``). Every rank receives
the same ``u`` and writes ``scale · u`` into ``.grad``: the gradients are identical on every rank with no
further all-reduce. Traffic per rank: :math:`(N-1)/N` of ``J`` (reduce-scatter) plus ``n/N`` per
rank of ``u`` (all-gather), against ``2(N-1)/N · k n`` for a ring all-reduce of ``J``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._tensors import add_to_grad
from ._collectives import all_gather_equal, all_reduce_, rank, reduce_scatter_flat, world_size

_SHARED_MIN_TASKS = 2


class ShardedTaskJacobian:
    """This rank's shard of the rank-mean task Jacobian, and what it takes to use it.

    Args:
        jacobians: this rank's per-parameter task Jacobians ``[k, *p.shape]`` (same order on every rank).
        shared: which parameters are shared (by the autograd graph); ``None``: decided by value from
            every rank's Jacobian (a task reaches a parameter where its gradient is nonzero on some rank).
    """

    def __init__(self, jacobians: Sequence[Tensor], shared: Sequence[bool] | None) -> None:
        size, me = world_size(), rank()
        k = jacobians[0].shape[0]
        device, dtype = jacobians[0].device, jacobians[0].dtype
        self.numels = [J[0].numel() for J in jacobians]
        self.total = sum(self.numels)
        self.width = width = -(-self.total // size)  # columns per shard (the last one padded)
        if shared is None:
            reach = torch.stack([(J.reshape(k, -1) != 0).any(dim=1) for J in jacobians], dim=1).float()
            all_reduce_(reach, op="max")
            shared = [bool(count >= _SHARED_MIN_TASKS) for count in reach.sum(dim=0).tolist()]
        self.shared = list(shared)
        # send[s] = J[:, columns of shard s], written once from the per-parameter blocks
        send = torch.zeros(size, k, width, dtype=dtype, device=device)
        #: (start, stop, shared) column ranges of this rank's shard, one per parameter piece
        self.ranges: list[tuple[int, int, bool]] = []
        offset = 0
        for J, numel, flag in zip(jacobians, self.numels, self.shared):
            block = J.reshape(k, numel)
            for shard in range(offset // width, (offset + numel - 1) // width + 1):
                low, high = max(offset, shard * width), min(offset + numel, (shard + 1) * width)
                send[shard, :, low - shard * width : high - shard * width] = block[
                    :, low - offset : high - offset
                ]
                if shard == me:
                    self.ranges.append((low - shard * width, high - shard * width, flag))
            offset += numel
        self.shard = reduce_scatter_flat(send.view(size, k * width)).view(k, width).div_(size)

    def is_finite(self) -> bool:
        """Whether the whole ``J`` is finite (a collective: the same answer on every rank)."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(self.shard).all()) else 1.0], device=self.shard.device)
        all_reduce_(bad, op="max")
        return not bool(bad.item() > 0)

    def gramian(self, dtype: torch.dtype) -> Tensor:
        """``G = J_S J_Sᵀ`` (``[k, k]``) over the shared columns, the same bits on every rank."""
        k = self.shard.shape[0]
        gramian = torch.zeros(k, k, dtype=dtype, device=self.shard.device)
        for start, stop, shared in self.ranges:
            if shared:
                columns = self.shard[:, start:stop].to(dtype)
                gramian.addmm_(columns, columns.T)
        all_reduce_(gramian, op="sum")
        return gramian

    def accumulate_grad(
        self, params: Sequence[nn.Parameter], weights: Tensor, scale: float, reached: Sequence[bool]
    ) -> None:
        """``p.grad += scale · u_p`` with ``u = Jᵀ w`` on shared columns and ``Σ_k J_k`` on the others, for the
        parameters ``reached`` (on any rank: the same on every rank); the others keep their ``.grad``."""
        local = weights.to(self.shard.dtype) @ self.shard
        for start, stop, shared in self.ranges:
            if not shared:
                local[start:stop] = self.shard[:, start:stop].sum(dim=0)
        update = all_gather_equal(local.mul_(scale))[: self.total]
        for param, part, hit in zip(params, update.split(self.numels), reached):
            if hit:
                add_to_grad(param, part.view_as(param))
