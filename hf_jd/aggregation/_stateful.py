"""The :class:`Stateful` protocol, the checks of a loaded state and of user-given loss values.

An aggregator or weighting is stateful when its output depends on the previous calls (moving
averages, learned weights, a random generator). Its state is its module ``extra_state``: only tensors
and plain values, so that a checkpoint is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._validation import ArgumentTypeError


@runtime_checkable
class Stateful(Protocol):
    """What a stateful aggregator or weighting offers (TorchJD's ``Stateful``, as a typing protocol).

    ``state_dict()`` / ``load_state_dict()`` save and restore the state (tensors and plain values),
    ``reset()`` forgets it: the next call behaves like the first call of a fresh instance.
    ``isinstance(x, Stateful)`` checks that the three methods exist.
    """

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> Any: ...

    def reset(self) -> None: ...


def read_state(owner: str, state: Any, spec: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """Return ``state`` if it is a dict with one entry of the given types per key of ``spec``.

    ``type(None)`` in a key's types allows ``None``; ``bool`` is never taken for ``int``. Raises a
    ``ValueError`` naming ``owner`` and the expected entries otherwise.
    """

    def fits(value: Any, types: tuple[type, ...]) -> bool:
        if isinstance(value, bool) and bool not in types:
            return False
        return isinstance(value, types)

    if isinstance(state, dict) and all(key in state and fits(state[key], t) for key, t in spec.items()):
        return state
    expected = ", ".join(
        f"{key!r} ({' or '.join('None' if t is type(None) else t.__name__ for t in types)})"
        for key, types in spec.items()
    )
    got = f"a dict with keys {sorted(state)}" if isinstance(state, dict) else type(state).__name__
    raise ValueError(
        f"Invalid state for {owner}: expected a dict with {expected}, as produced by its state_dict(), "
        f"got {got}."
    )


def cpu64(tensor: Tensor | None) -> Tensor | None:
    """A detached float64 CPU copy of ``tensor`` (``None`` stays ``None``)."""
    return None if tensor is None else tensor.detach().to(device="cpu", dtype=torch.float64).clone()


def as_losses(owner: str, losses: Tensor | Sequence[float]) -> Tensor:
    """The loss values given to ``set_losses``: a finite, non-empty 1-D float64 CPU tensor."""
    try:
        vector = torch.as_tensor(losses).detach().to(device="cpu", dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ArgumentTypeError(
            f"{owner}.set_losses needs a 1-D tensor of loss values, got {losses!r} ({error})."
        ) from None
    if vector.numel() == 0 or not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{owner}.set_losses needs finite loss values, got {vector.tolist()}.")
    return vector.clone()


def check_loss_count(owner: str, losses: Tensor, m: int) -> None:
    """Raise unless there is one loss value per objective."""
    if losses.numel() != m:
        raise ValueError(
            f"{owner} was given {losses.numel()} loss values (set_losses) but the Jacobian has {m} rows: "
            "give one loss per objective, in the order of the rows."
        )


def warn_restart(owner: str, before: int, now: int, what: str) -> None:
    """Warn that the state restarts because the number of objectives changed."""
    warnings.warn(
        f"{owner}: the number of objectives changed from {before} to {now}; its {what} restart(s) "
        "from the initial value.",
        stacklevel=3,
    )


def warn_shape_restart(owner: str, before: torch.Size, now: torch.Size, what: str) -> None:
    """Warn that the Jacobian-shaped state restarts because the Jacobian's shape changed."""
    warnings.warn(
        f"{owner}: the Jacobian's shape changed from {tuple(before)} to {tuple(now)}; its {what}.",
        stacklevel=3,
    )
