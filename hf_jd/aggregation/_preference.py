"""Preference vectors: user-given weights over the objectives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import as_weight_vector
from ._attributes import owner_name
from ._weighting_bases import Weighting


def as_vector(owner: str, name: str, value: Tensor | Sequence[float], *, allow_empty: bool = False) -> Tensor:
    """A user-given 1-D vector of finite numbers, as a tensor (a list from JSON becomes float64).

    A floating tensor that does not require grad is kept as it is, not copied (as TorchJD does:
    ``aggregator.pref_vector is tensor`` after an assignment). ``allow_empty`` accepts a vector of size 0
    (TorchJD's ``Constant``, ``GradDrop``: usable only with no objective).
    """
    if allow_empty and _is_empty_vector(value):
        if not isinstance(value, Tensor):
            return torch.zeros(0, dtype=torch.float64)
        return value if value.is_floating_point() else value.to(torch.float64)
    vector = as_weight_vector(owner, name, value)
    if isinstance(value, Tensor) and value.is_floating_point() and not value.requires_grad:
        return value
    return vector


def _is_empty_vector(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.dim() == 1 and value.numel() == 0
    return isinstance(value, (list, tuple)) and len(value) == 0


def as_pref_vector(value: Tensor | Sequence[float] | None, owner: str = "The aggregator") -> Tensor | None:
    """Convert a user preference vector (tensor, list from JSON, or ``None``) to a 1-D tensor.

    Preferences are non-negative weights over the objectives, at least one of them positive: a negative
    preference would ask to *increase* a loss, and an all-zero vector gives a zero update.
    """
    if value is None:
        return None
    vector = as_vector(owner, "pref_vector", value)
    if bool((vector < 0).any()):
        raise ValueError(f"{owner}'s pref_vector must be non-negative, got {vector.tolist()}.")
    if not bool((vector > 0).any()):
        raise ValueError(
            f"{owner}'s pref_vector is all zeros, which gives a zero update at every step. Give at least one "
            "positive weight, or leave pref_vector unset for 1/m each."
        )
    return vector


def pref_weights(pref_vector: Tensor | None, gramian: Tensor) -> Tensor:
    """Return the preference weights for an ``[m, m]`` Gramian (default ``1/m`` each)."""
    m = gramian.shape[0]
    if pref_vector is None:
        return torch.full((m,), 1.0 / max(m, 1), dtype=gramian.dtype, device=gramian.device)
    if pref_vector.numel() != m:
        raise ValueError(
            f"The preference vector has {pref_vector.numel()} entries but there are {m} objectives "
            "(losses). Give one weight per loss, or leave pref_vector unset for 1/m each."
        )
    return pref_vector.to(dtype=gramian.dtype, device=gramian.device)


class PrefVector:
    """The ``pref_vector`` attribute of a weighting: checked on every assignment (:func:`as_pref_vector`),
    and mirrored, as in TorchJD, by the child weighting ``weighting``: ``ConstantWeighting(pref_vector)``,
    or ``default()`` (e.g. ``MeanWeighting()``) when it is ``None``."""

    def __init__(
        self, owner: str | None, default: Callable[[], Weighting], constant: Callable[[Tensor], Weighting]
    ) -> None:
        self.owner = owner
        self.default = default
        self.constant = constant

    def __get__(self, instance: Any, cls: Any = None) -> Tensor | None:
        if instance is None:
            return self  # type: ignore[return-value]
        try:
            return instance.__dict__["pref_vector"]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError("pref_vector") from None

    def __set__(self, instance: Any, value: Tensor | Sequence[float] | None) -> None:
        vector = as_pref_vector(value, owner_name(self.owner, instance))
        instance.weighting = self.default() if vector is None else self.constant(vector)
        instance.__dict__["pref_vector"] = vector
