"""Preference vectors: user-given weights over the objectives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import as_weight_vector


def as_pref_vector(value: Tensor | Sequence[float] | None, owner: str = "The aggregator") -> Tensor | None:
    """Convert a user preference vector (tensor, list from JSON, or ``None``) to a 1-D tensor.

    Preferences are non-negative weights over the objectives, at least one of them positive: a negative
    preference would ask to *increase* a loss, and an all-zero vector gives a zero update.
    """
    if value is None:
        return None
    vector = as_weight_vector(owner, "pref_vector", value)
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
