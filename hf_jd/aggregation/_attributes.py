"""Hyper-parameters kept as attributes: validated on every assignment, or read through the weighting.

TorchJD exposes every constructor argument of its aggregators and weightings as a property whose
setter validates like the constructor (``aggregator.c = -1`` raises), and an aggregator's properties
read and set those of its weighting. These descriptors give hf_jd's classes the same behaviour with
one line per attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from torch import Tensor

_T = TypeVar("_T")


class Checked(Generic[_T]):
    """A constructor argument stored as an attribute and checked again on every assignment.

    ``check(owner, name, value)`` returns the value to store (e.g. a float) or raises a ``ValueError``
    naming the argument, exactly as in the constructor, which assigns through it too. ``owner`` (the
    method's name in the messages) defaults to the class name without its ``Weighting`` suffix.
    """

    def __init__(self, owner: str | None, check: Callable[[str, str, Any], _T]) -> None:
        self.owner = owner
        self.check = check
        self.name = ""

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, cls: Any = None) -> _T:
        if instance is None:
            return self  # type: ignore[return-value]
        try:
            return instance.__dict__[self.name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.name] = self.check(owner_name(self.owner, instance), self.name, value)


class Alias(Generic[_T]):
    """Another name of an attribute of the same object (TorchJD's name of an hf_jd argument: SDMGrad's
    ``lambda_`` is ``lamda``), read and assigned there."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.name = ""

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, cls: Any = None) -> _T:
        if instance is None:
            return self  # type: ignore[return-value]
        return getattr(instance, self.target)  # type: ignore[no-any-return]

    def __set__(self, instance: Any, value: Any) -> None:
        target = getattr(type(instance), self.target, None)
        if isinstance(target, Checked):  # checked under the name used, so that the message names it
            instance.__dict__[self.target] = target.check(
                owner_name(target.owner, instance), self.name, value
            )
        else:
            setattr(instance, self.target, value)


def owner_name(owner: str | None, instance: Any) -> str:
    """``owner``, or the method's name from the class of ``instance`` (``UPGradWeighting`` → ``UPGrad``)."""
    return owner if owner is not None else type(instance).__name__.removesuffix("Weighting")


class Delegated(Generic[_T]):
    """An aggregator's attribute that is its weighting's (read and assigned there, so validated there)."""

    def __init__(self, to: str = "gramian_weighting") -> None:
        self.to = to
        self.name = ""

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, cls: Any = None) -> _T:
        if instance is None:
            return self  # type: ignore[return-value]
        return getattr(getattr(instance, self.to), self.name)  # type: ignore[no-any-return]

    def __set__(self, instance: Any, value: Any) -> None:
        setattr(getattr(instance, self.to), self.name, value)


def vector_str(vector: Tensor | None) -> str:
    """A vector as TorchJD's short names show it: ``[1., 0.25]`` (two decimals, trailing zeros dropped)."""
    if vector is None:
        return ""
    return "[" + ", ".join(f"{float(value):.2f}".rstrip("0") for value in vector.reshape(-1)) + "]"


def pref_str(name: str, pref_vector: Tensor | None) -> str:
    """TorchJD's short name of a method with a preference vector: ``UPGrad``, ``UPGrad([1., 2.])``."""
    return name if pref_vector is None else f"{name}({vector_str(pref_vector)})"
