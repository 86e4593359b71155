"""Preference vectors: user-given weights over the objectives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_pref_vector(value: Tensor | Sequence[float] | None) -> Tensor | None:
    """Convert a user preference vector (tensor, list from JSON, or ``None``) to a 1-D tensor."""
    if value is None:
        return None
    vector = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach()
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(
            f"A preference vector must be a non-empty 1-D list of weights, got shape {tuple(vector.shape)}."
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError("A preference vector must contain only finite values.")
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
