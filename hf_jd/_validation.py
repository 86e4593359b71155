"""Validation of aggregator constructor arguments: clear errors that name the argument.

Aggregators are built from ``--aggregator_kwargs`` JSON, so a wrong type or an out-of-range value must
fail when the aggregator is constructed (hence when ``JDTrainingArguments`` is built), not at the
first training step. A value of the wrong type raises :class:`ArgumentTypeError`, which is both a
``TypeError`` and a ``ValueError`` (like numpy's ``AxisError``), so callers may catch either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class ArgumentTypeError(TypeError, ValueError):
    """An aggregator argument has the wrong type (e.g. a string where a number is needed)."""


def check_real(
    owner: str, name: str, value: object, *, minimum: float = -math.inf, strict: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite real number ``>= minimum`` (``> minimum`` if ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(
            f"{owner}'s {name} must be a finite number, got {value!r} ({type(value).__name__})."
        )
    if not math.isfinite(value):
        raise ValueError(f"{owner}'s {name} must be a finite number, got {value!r}.")
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{owner}'s {name} must be {bound}, got {value!r}.")
    return float(value)


def check_non_negative_number(owner: str, name: str, value: Any) -> float:
    """Return ``value`` as a float; raise unless it is a finite real number ``>= 0``."""
    return check_real(owner, name, value, minimum=0.0)


def check_positive_number(owner: str, name: str, value: Any) -> float:
    """Return ``value`` as a float; raise unless it is a finite real number ``> 0``."""
    return check_real(owner, name, value, minimum=0.0, strict=True)


def check_number_in(owner: str, name: str, value: Any, low: float, high: float) -> float:
    """Return ``value`` as a float; raise unless ``low <= value <= high``."""
    number = check_real(owner, name, value)
    if not low <= number <= high:
        raise ValueError(f"{owner}'s {name} must be in [{low}, {high}], got {value!r}.")
    return number


def check_integer(owner: str, name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is an integer ``>= minimum`` (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"{owner}'s {name} must be an integer, got {value!r} ({type(value).__name__})."
        )
    if value < minimum:
        raise ValueError(f"{owner}'s {name} must be >= {minimum}, got {value!r}.")
    return value


def check_seed(owner: str, seed: Any) -> int | None:
    """Return ``seed``; raise unless it is an integer or ``None``."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ArgumentTypeError(f"{owner}'s seed must be an integer or None, got {seed!r}.")
    return seed


def as_weight_vector(owner: str, name: str, value: Tensor | Sequence[float]) -> Tensor:
    """Convert a user-given weight list (tensor, or a list parsed from JSON) to a finite, non-empty 1-D tensor."""
    if isinstance(value, (str, bytes)):
        raise ArgumentTypeError(f"{owner}'s {name} must be a list of numbers, got the string {value!r}.")
    try:
        # float64 for numbers given as a list, a tensor's own floating dtype otherwise: a float64
        # tensor (TorchJD's usual argument) or a list of Python floats keeps every digit.
        if isinstance(value, Tensor) and value.is_floating_point():
            vector = value.detach()
        else:
            vector = torch.as_tensor(value, dtype=torch.float64).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ArgumentTypeError(
            f"{owner}'s {name} must be a list of numbers, got {value!r} ({error})."
        ) from None
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(
            f"{owner}'s {name} must be a non-empty 1-D list of numbers, got shape {tuple(vector.shape)}."
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{owner}'s {name} must contain only finite values, got {vector.tolist()}.")
    return vector
