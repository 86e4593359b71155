"""Name registry behind ``--scalarizer``: maps CLI names to scalarizer classes."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ._base import Scalarizer

# name -> "module:Class" (imported lazily) or a class registered at run time.
_REGISTRY: dict[str, str | type[Scalarizer]] = {
    "constant": "._linear:Constant",
    "mean": "._linear:Mean",
    "sum": "._linear:Sum",
    "random": "._random:Random",
    "geometric_mean": "._geometric_mean:GeometricMean",
    "dwa": "._dwa:DWA",
    "uncertainty_weighting": "._learned_scales:UncertaintyWeighting",
    "imtl_l": "._learned_scales:IMTLL",
    "famo": "._famo:FAMO",
    "stch": "._preference:STCH",
    "pbi": "._preference:PBI",
    "cosmos": "._preference:COSMOS",
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def scalarizer_names() -> tuple[str, ...]:
    """The names accepted by :func:`get_scalarizer` and by ``--scalarizer``."""
    return tuple(_REGISTRY)


def scalarizer_class(name: str) -> type[Scalarizer]:
    """Return the class registered under ``name`` (case-insensitive, ``-`` and ``_`` alike)."""
    if not isinstance(name, str) or _key(name) not in _REGISTRY:
        raise ValueError(f"Unknown scalarizer {name!r}. Valid scalarizers: {', '.join(scalarizer_names())}.")
    key = _key(name)
    entry = _REGISTRY[key]
    if isinstance(entry, str):
        module_name, class_name = entry.split(":")
        entry = getattr(importlib.import_module(module_name, __package__), class_name)
        _REGISTRY[key] = entry
    return entry


def get_scalarizer(name: str, **kwargs: Any) -> Scalarizer:
    """Build the scalarizer registered under ``name`` with keyword arguments ``kwargs``.

    Example: ``get_scalarizer("uncertainty_weighting", shape=3)``. Wrong or missing arguments raise a
    ``ValueError`` that shows the class's signature; invalid values raise the class's own clear error.
    """
    cls = scalarizer_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise ValueError(
            f"Invalid scalarizer_kwargs for {name!r}: {error}. {cls.__name__} accepts {inspect.signature(cls)}."
        ) from None
    return cls(**kwargs)


def register_scalarizer(name: str, cls: type[Scalarizer]) -> None:
    """Make a custom scalarizer class available as ``--scalarizer name``."""
    if not (isinstance(cls, type) and issubclass(cls, Scalarizer)):
        raise TypeError(f"{cls!r} is not a subclass of hf_jd.scalarization.Scalarizer.")
    _REGISTRY[_key(name)] = cls
