"""Validation of constructor arguments shared by the aggregators (clear errors naming the argument)."""

from __future__ import annotations

import math
from typing import Any


def _check_real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}'s {name} must be a real number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"{owner}'s {name} must be finite, got {value!r}.")
    return float(value)


def check_non_negative_number(owner: str, name: str, value: Any) -> float:
    """Return ``value`` as a float; raise unless it is a finite real number ``>= 0``."""
    number = _check_real(owner, name, value)
    if number < 0:
        raise ValueError(f"{owner}'s {name} must be >= 0, got {value!r}.")
    return number


def check_positive_number(owner: str, name: str, value: Any) -> float:
    """Return ``value`` as a float; raise unless it is a finite real number ``> 0``."""
    number = _check_real(owner, name, value)
    if number <= 0:
        raise ValueError(f"{owner}'s {name} must be > 0, got {value!r}.")
    return number


def check_number_in(owner: str, name: str, value: Any, low: float, high: float) -> float:
    """Return ``value`` as a float; raise unless ``low <= value <= high``."""
    number = _check_real(owner, name, value)
    if not low <= number <= high:
        raise ValueError(f"{owner}'s {name} must be in [{low}, {high}], got {value!r}.")
    return number


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """Return ``value``; raise unless it is an integer ``>= minimum`` (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}'s {name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{owner}'s {name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_seed(owner: str, seed: Any) -> int | None:
    """Return ``seed``; raise unless it is an integer or ``None``."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{owner}'s seed must be an integer or None, got {seed!r}.")
    return seed
