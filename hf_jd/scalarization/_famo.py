r"""FAMO: Fast Adaptive Multitask Optimization, a loss weighting with O(1) cost per step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import check_non_negative_number, check_positive_number
from ._base import Scalarizer, check_count, check_losses, num_objectives, optional_vector

_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, used by the official implementation
_ADAM_EPS = 1e-8


class FAMO(Scalarizer):
    r"""Fast Adaptive Multitask Optimization: with task weights :math:`z = \mathrm{softmax}(\xi)`,

    .. math::
        \frac{1}{c} \sum_i z_i \log(L_i - b_i + \epsilon), \qquad
        c = \sum_i \frac{z_i}{L_i - b_i + \epsilon} \ \text{(no gradient)},

    whose gradient :math:`\sum_i \frac{z_i / c}{L_i - b_i + \epsilon} \nabla L_i` is a convex combination
    of the task gradients (:math:`b` the lower bounds ``min_losses``, :math:`\epsilon = 10^{-8}`). The
    logits :math:`\xi` are not learned through that backward: after the optimizer step,
    :meth:`update` measures each loss's log-decrease
    :math:`\delta_i = \log(L_i^{\text{before}} - b_i + \epsilon) - \log(L_i^{\text{after}} - b_i + \epsilon)`
    and takes one Adam step on :math:`\xi` along :math:`(\partial z / \partial \xi)^\top \delta + \gamma \xi`
    (learning rate ``w_lr``, L2 regularisation ``gamma``, Adam betas (0.9, 0.999), eps 1e-8), which moves
    weight towards the tasks that decreased least. Defaults are the official implementation's
    (``w_lr=0.025``, ``gamma=0.01``; the paper tunes :math:`\gamma` per benchmark). :math:`\xi` starts at 0.

    Liu, Feng, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023, arXiv:2306.03792.

    **Protocol** (``needs_post_step_update``): call the scalarizer on the losses, backward, optimizer step,
    then ``update(losses_after)`` with the losses recomputed on the same inputs after the step (no
    gradient needed). ``losses_before`` defaults to the losses of the most recent call; pass it explicitly
    (e.g. micro-batch or rank averages) when the last call is not the right reference.

    **Not learnable through the optimizer**: unlike TorchJD's FAMO (an ``nn.Parameter`` stepped by the
    user's own optimizer), :math:`\xi` and its Adam moments are buffers stepped inside :meth:`update`, so
    :meth:`parameters` is empty and nothing is added to the training optimizer. **State**
    (:meth:`state_dict`): ``logits``, ``exp_avg``, ``exp_avg_sq``, ``adam_step`` and, as extra state, the
    losses of the last call. :meth:`reset` restores the initial state.

    Args:
        shape: The number of objectives ``m`` (or ``[m]``, TorchJD's ``shape``).
        min_losses: Lower bounds :math:`b` of the losses (default 0: losses must be >= 0).
        w_lr: Adam learning rate of the logits.
        gamma: L2 regularisation coefficient of the logits (Adam's ``weight_decay``).
    """

    needs_post_step_update = True
    logits: Tensor
    min_losses: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_step: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        min_losses: Tensor | Sequence[float] | None = None,
        w_lr: float = 0.025,
        gamma: float = 0.01,
    ) -> None:
        super().__init__()
        m = num_objectives("FAMO", shape)
        bounds = optional_vector("FAMO", "min_losses", min_losses)
        if bounds is None:
            bounds = torch.zeros(m, dtype=torch.float64)
        elif bounds.numel() != m:
            raise ValueError(f"FAMO's min_losses has {bounds.numel()} entries but shape is {m}.")
        self.w_lr = check_positive_number("FAMO", "w_lr", w_lr)
        self.gamma = check_non_negative_number("FAMO", "gamma", gamma)
        self.eps = 1e-8
        self.register_buffer("min_losses", bounds, persistent=False)
        self.register_buffer("logits", torch.zeros(m))
        self.register_buffer("exp_avg", torch.zeros(m))
        self.register_buffer("exp_avg_sq", torch.zeros(m))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64))
        self._prev_losses: Tensor | None = None

    @property
    def weights(self) -> Tensor:
        """The current task weights :math:`z = \\mathrm{softmax}(\\xi)` (positive, summing to 1)."""
        return torch.softmax(self.logits, dim=0)

    def _shifted(self, losses: Tensor, which: str) -> Tensor:
        shifted = losses - self.min_losses.to(losses.device, losses.dtype) + self.eps
        if bool((shifted <= 0).any()):
            raise ValueError(
                f"FAMO takes log(loss - min_loss), but the {which} losses {losses.tolist()} are not above "
                f"min_losses {self.min_losses.tolist()}. Give lower bounds in min_losses (default 0)."
            )
        return shifted

    def forward(self, losses: Tensor, /) -> Tensor:
        check_count("FAMO", losses, self.logits.numel(), "logits")
        work = losses.to(torch.promote_types(losses.dtype, torch.float32))
        shifted = self._shifted(work, "current")
        z = self.weights.to(work.device, work.dtype)
        c = (z / shifted).sum().detach()
        self._prev_losses = losses.detach().clone()
        return ((z / c) * torch.log(shifted)).sum()

    @torch.no_grad()
    def update(self, losses_after: Tensor, losses_before: Tensor | None = None) -> None:
        """One Adam step of the logits from the loss decrease ``losses_before -> losses_after``.

        Call once after every optimizer step, with ``losses_after`` recomputed on the inputs of the
        losses of the most recent call (or pass ``losses_before``). Both are detached here.
        """
        before = self._prev_losses if losses_before is None else losses_before
        if before is None:
            raise RuntimeError("FAMO.update() needs losses_before, or a call of the scalarizer before it.")
        for name, vector in (("losses_after", losses_after), ("losses_before", before)):
            check_losses(f"FAMO.update's {name}", vector)
            check_count("FAMO", vector, self.logits.numel(), "logits")
        device = self.logits.device
        after = self._shifted(losses_after.detach().to(device, torch.float32), "after-step")
        before = self._shifted(before.detach().to(device, torch.float32), "before-step")
        delta = torch.log(before) - torch.log(after)
        z = self.weights
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # softmax VJP + L2 term
        self.adam_step += 1
        step = int(self.adam_step)
        self.exp_avg.mul_(_BETAS[0]).add_(grad, alpha=1 - _BETAS[0])
        self.exp_avg_sq.mul_(_BETAS[1]).addcmul_(grad, grad, value=1 - _BETAS[1])
        denom = (self.exp_avg_sq / (1 - _BETAS[1] ** step)).sqrt_().add_(_ADAM_EPS)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.w_lr / (1 - _BETAS[0] ** step))
        self._prev_losses = None

    def reset(self) -> None:
        for buffer in (self.logits, self.exp_avg, self.exp_avg_sq, self.adam_step):
            buffer.zero_()
        self._prev_losses = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"prev_losses": self._prev_losses}

    def set_extra_state(self, state: Any) -> None:
        if not (
            isinstance(state, dict)
            and (state.get("prev_losses") is None or isinstance(state["prev_losses"], Tensor))
        ):
            raise ValueError(
                "Invalid state for FAMO: expected a dict with 'prev_losses' (a tensor or None), as produced by "
                f"its state_dict(); got {state!r}."
            )
        self._prev_losses = state["prev_losses"]

    def __repr__(self) -> str:
        return f"FAMO(shape={self.logits.numel()}, w_lr={self.w_lr}, gamma={self.gamma})"
