"""A name → class registry with lazy imports: what ``--aggregator NAME`` and ``--scalarizer NAME`` resolve.

Names are case-insensitive and ``-`` equals ``_``. Built-in entries are ``"module:Class"`` strings,
imported on first use (so that listing the names imports nothing heavy); classes registered at run time
are stored as they are. Imports nothing from hf_jd, so any package may use it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def normalised_name(name: str) -> str:
    """``" Nash-MTL "`` → ``"nash_mtl"``."""
    return name.strip().lower().replace("-", "_")


class NameRegistry(Generic[T]):
    """Names of one kind of method (``kind``: "aggregator", "scalarizer") and their classes.

    Args:
        kind: the word used in messages and in the kwargs field's name (``<kind>_kwargs``).
        base: the class every entry must subclass.
        base_path: how messages name ``base`` (e.g. ``"hf_jd.aggregation.Aggregator"``).
        package: the package the ``"module:Class"`` entries are relative to.
        entries: the built-in ``name -> "module:Class"`` entries.
    """

    def __init__(self, kind: str, base: type, base_path: str, package: str, entries: dict[str, str]) -> None:
        self.kind = kind
        self.base = base
        self.base_path = base_path
        self.package = package
        self._entries: dict[str, str | type[T]] = dict(entries)

    def names(self) -> tuple[str, ...]:
        """The accepted names, built-in first, in registration order."""
        return tuple(self._entries)

    def get_class(self, name: str) -> type[T]:
        """The class registered under ``name``; an unknown name lists the valid ones."""
        key = normalised_name(name) if isinstance(name, str) else None
        if key is None or key not in self._entries:
            raise ValueError(f"Unknown {self.kind} {name!r}. Valid {self.kind}s: {', '.join(self.names())}.")
        entry = self._entries[key]
        if isinstance(entry, str):
            module_name, class_name = entry.split(":")
            entry = getattr(importlib.import_module(module_name, self.package), class_name)
            self._entries[key] = entry
        return entry

    def build(self, name: str, **kwargs: Any) -> T:
        """An instance of ``name`` built with ``kwargs``; wrong or missing keywords show the signature."""
        cls = self.get_class(name)
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as error:
            raise ValueError(
                f"Invalid {self.kind}_kwargs for {name!r}: {error}. {cls.__name__} accepts {inspect.signature(cls)}."
            ) from None
        return cls(**kwargs)

    def register(self, name: str, cls: type[T]) -> None:
        """Make ``cls`` available under ``name`` (replacing a previous entry of that name)."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a subclass of {self.base_path}.")
        self._entries[normalised_name(name)] = cls
