"""Validation of aggregator constructor arguments: clear errors that name the argument.

Aggregators are built from ``--aggregator_kwargs`` JSON, so a wrong type or an out-of-range value must
fail when the aggregator is constructed (hence when ``JDTrainingArguments`` is built), not at the
first training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_real(
    owner: str, name: str, value: object, *, minimum: float = -math.inf, strict: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite real number ``>= minimum`` (``> minimum`` if ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}'s {name} must be a finite number, got {value!r} ({type(value).__name__}).")
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{owner}'s {name} must be {bound}, got {value!r}.")
    return float(value)


def check_integer(owner: str, name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is an integer ``>= minimum`` (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}'s {name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{owner}'s {name} must be >= {minimum}, got {value!r}.")
    return value


def as_weight_vector(owner: str, name: str, value: Tensor | Sequence[float]) -> Tensor:
    """Convert a user-given weight list (tensor, or a list parsed from JSON) to a finite, non-empty 1-D tensor."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{owner}'s {name} must be a list of numbers, got the string {value!r}.")
    try:
        vector = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{owner}'s {name} must be a list of numbers, got {value!r} ({error}).") from None
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(
            f"{owner}'s {name} must be a non-empty 1-D list of numbers, got shape {tuple(vector.shape)}."
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{owner}'s {name} must contain only finite values, got {vector.tolist()}.")
    return vector
