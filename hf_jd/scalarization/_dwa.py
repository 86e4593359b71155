r"""Dynamic Weight Average (DWA): weights from the rate at which each loss decreased over past epochs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._validation import check_positive_number
from ._base import Scalarizer


class DWA(Scalarizer):
    r"""Dynamic Weight Average: :math:`\sum_k \lambda_k(t) L_k` with

    .. math::
        \lambda_k(t) = \frac{m \exp(r_k(t-1) / T)}{\sum_i \exp(r_i(t-1) / T)}, \qquad
        r_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)},

    where :math:`\bar L_k(e)` is the average of loss :math:`k` over the calls of epoch :math:`e` and
    :math:`T` the temperature; :math:`\lambda_k = 1` while fewer than two epochs are complete. The
    weights sum to :math:`m` and carry no gradient. Paper default: :math:`T = 2`.

    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019, arXiv:1803.10704.

    **Protocol.** Every call adds the (detached) losses to the current epoch's running sum. Call
    :meth:`step` once at the end of every epoch (``needs_epoch_step``): it closes the epoch's average and
    keeps the last two. Calling it every ``k`` optimizer steps instead gives the per-iteration variant
    some code bases use. Under several processes pass ``all_reduce_sum`` to :meth:`step` so that every
    rank averages over the global epoch and keeps the same weights.

    **State** (:meth:`state_dict`, as extra state): the running sum, the number of calls in the epoch
    and the last two epoch averages. :meth:`reset` clears it.

    Args:
        temperature: :math:`T > 0`; larger values give more uniform weights.
    """

    needs_epoch_step = True

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = check_positive_number("DWA", "temperature", temperature)
        self._loss_sum: Tensor | None = None
        self._count = 0
        self._history: list[Tensor] = []

    def weights(self, m: int, device: torch.device | None = None) -> Tensor:
        """The weights :math:`\\lambda(t)` (float32 or wider) that the next call uses for ``m`` losses."""
        if len(self._history) < 2:
            return torch.ones(m, device=device)
        older, newer = (h.to(device) for h in self._history)
        if older.numel() != m:
            raise ValueError(
                f"DWA's loss history is for {older.numel()} objectives but got {m} losses. "
                "Call reset() before changing the number of objectives."
            )
        rates = newer / older
        if not bool(torch.isfinite(rates).all()):
            raise ValueError(
                f"DWA's descent rates L(t-1)/L(t-2) are not finite ({rates.tolist()}): an epoch-average "
                "loss was 0. DWA needs losses that stay away from 0."
            )
        return m * torch.softmax(rates / self.temperature, dim=0)

    def forward(self, losses: Tensor, /) -> Tensor:
        weights = self.weights(losses.numel(), losses.device)
        observed = losses.detach().to(torch.promote_types(losses.dtype, torch.float32))
        if self._loss_sum is None:
            self._loss_sum = observed.clone()
        elif self._loss_sum.numel() != observed.numel():
            raise ValueError(
                f"DWA got {observed.numel()} losses after {self._loss_sum.numel()} earlier in this epoch; "
                "the number of objectives must not change (call reset() first)."
            )
        else:
            self._loss_sum = self._loss_sum.to(observed.device) + observed
        self._count += 1
        return (weights.to(losses.dtype) * losses).sum()

    def step(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """Close the current epoch: append its average loss to the history (the last two are kept).

        Args:
            all_reduce_sum: Under several processes, a function returning the sum over all ranks of a
                tensor (e.g. ``lambda t: accelerator.reduce(t, "sum")``); it is applied once, to the
                running sum and the call count packed in one tensor. Every rank must call ``step``.
        Does nothing if no loss was seen since the last call.
        """
        if self._loss_sum is None:
            return
        total, count = self._loss_sum, torch.tensor([float(self._count)], device=self._loss_sum.device)
        if all_reduce_sum is not None:
            packed = all_reduce_sum(torch.cat([total, count.to(total.dtype)]))
            total, count = packed[:-1], packed[-1:]
        self._history = [*self._history, (total / count).detach()][-2:]
        self._loss_sum, self._count = None, 0

    def reset(self) -> None:
        self._loss_sum, self._count, self._history = None, 0, []

    def get_extra_state(self) -> dict[str, Any]:
        return {"loss_sum": self._loss_sum, "count": self._count, "history": list(self._history)}

    def set_extra_state(self, state: Any) -> None:
        valid = (
            isinstance(state, dict)
            and (state.get("loss_sum") is None or isinstance(state.get("loss_sum"), Tensor))
            and isinstance(state.get("count"), int)
            and isinstance(state.get("history"), list)
            and all(isinstance(h, Tensor) for h in state["history"])
        )
        if not valid:
            raise ValueError(
                "Invalid state for DWA: expected a dict with 'loss_sum' (tensor or None), 'count' (int) and "
                f"'history' (list of tensors), as produced by its state_dict(); got {state!r}."
            )
        self._loss_sum, self._count, self._history = state["loss_sum"], state["count"], list(state["history"])

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature})"
