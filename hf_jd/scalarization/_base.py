"""The :class:`Scalarizer` base class and the checks every scalarizer shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._validation import ArgumentTypeError, as_weight_vector, check_integer


class Scalarizer(nn.Module, ABC):
    r"""Maps a loss vector :math:`L \in \mathbb{R}^m` (one loss per objective) to one scalar loss.

    Training then runs ONE ordinary backward of that scalar: the baseline that Jacobian descent is
    compared against. Calling the module checks the losses first (a non-empty 1-D floating-point
    tensor of finite values, on any device and of any floating dtype) and returns a 0-dim tensor.

    Subclasses implement :meth:`forward`. Stateful ones override :meth:`reset` and keep their state in
    :meth:`state_dict` as tensors and plain values only (loadable with ``torch.load(weights_only=True)``);
    learnable ones hold ``nn.Parameter``\ s, returned by :meth:`parameters` as usual. Two class flags tell
    a training loop which extra hook a scalarizer needs:

    * ``needs_epoch_step``: call ``step()`` once at the end of every epoch (:class:`DWA`);
    * ``needs_post_step_update``: call ``update(losses_after)`` after every optimizer step (:class:`FAMO`).
    """

    needs_epoch_step: ClassVar[bool] = False
    needs_post_step_update: ClassVar[bool] = False

    def __call__(self, losses: Tensor, /) -> Tensor:
        check_losses(type(self).__name__, losses)
        return super().__call__(losses)

    @abstractmethod
    def forward(self, losses: Tensor, /) -> Tensor:
        """Return the scalarized loss (a 0-dim tensor) of the loss vector ``losses`` (shape ``[m]``)."""

    def reset(self) -> None:
        """Restore the state the scalarizer had when it was built (nothing to do when stateless)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_losses(owner: str, losses: object) -> Tensor:
    """Return ``losses`` if it is a non-empty 1-D floating-point tensor of finite values; raise otherwise."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"{owner} expects the losses as a torch.Tensor, got {type(losses).__name__}.")
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            f"{owner} expects a non-empty 1-D tensor of losses (one per objective), got shape "
            f"{tuple(losses.shape)}. Stack the task losses with torch.stack([...]), or flatten per-example losses."
        )
    if not losses.is_floating_point():
        raise TypeError(f"{owner} expects floating-point losses, got dtype {losses.dtype}.")
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        values = losses.detach()[~finite].tolist()
        raise ValueError(
            f"{owner} got non-finite losses at positions {bad} (values {values}). A loss overflowed or is "
            "undefined: check the model outputs and the labels, lower the learning rate, or use bf16 instead of fp16."
        )
    return losses


def check_count(owner: str, losses: Tensor, expected: int, what: str) -> None:
    """Raise unless there are exactly ``expected`` losses (``what`` says where ``expected`` comes from)."""
    if losses.numel() != expected:
        raise ValueError(
            f"{owner} has {what} for {expected} objectives but got {losses.numel()} losses. Give one loss per "
            "objective, always in the same order (with per-example losses, the batch size must not change: "
            "use dataloader_drop_last)."
        )


def num_objectives(owner: str, shape: int | Sequence[int]) -> int:
    """The number of objectives ``m`` from TorchJD's ``shape`` argument: ``m`` or ``(m,)`` (losses are 1-D)."""
    if isinstance(shape, Sequence) and not isinstance(shape, (str, bytes)):
        if len(shape) != 1:
            raise ValueError(
                f"{owner}'s shape must be the number of objectives m (or [m]): the losses are a 1-D vector, "
                f"got {list(shape)!r}."
            )
        shape = shape[0]
    return check_integer(owner, "shape", shape, minimum=1)


def preference_vector(owner: str, name: str, value: Tensor | Sequence[float]) -> Tensor:
    """A user-given preference vector (float64): finite, 1-D, non-negative and not all zeros."""
    vector = float64_vector(owner, name, value)
    if bool((vector < 0).any()):
        raise ValueError(f"{owner}'s {name} must be non-negative, got {vector.tolist()}.")
    if not bool((vector > 0).any()):
        raise ValueError(f"{owner}'s {name} are all zeros; give at least one positive weight.")
    return vector


def optional_vector(owner: str, name: str, value: Tensor | Sequence[float] | None) -> Tensor | None:
    """A user-given finite 1-D vector (e.g. a reference point), in float64, or ``None``."""
    return None if value is None else float64_vector(owner, name, value)


def float64_vector(owner: str, name: str, value: Tensor | Sequence[float]) -> Tensor:
    """A user-given finite, non-empty 1-D vector as a float64 CPU tensor (not rounded through float32)."""
    as_weight_vector(owner, name, value)  # the checks and their messages
    return torch.as_tensor(value, dtype=torch.float64).detach().to("cpu", copy=True)


def same_device(vector: Tensor, losses: Tensor) -> Tensor:
    """``vector`` (kept in float64) on the device and in the dtype of ``losses``."""
    return vector.to(device=losses.device, dtype=losses.dtype)


__all__ = [
    "ArgumentTypeError",
    "Scalarizer",
    "check_count",
    "check_losses",
    "float64_vector",
    "num_objectives",
    "optional_vector",
    "preference_vector",
    "same_device",
]
