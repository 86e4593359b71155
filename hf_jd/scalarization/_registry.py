"""Name registry behind ``--scalarizer``: maps CLI names to scalarizer classes."""

from __future__ import annotations

from typing import Any

from .._name_registry import NameRegistry
from ._base import Scalarizer

# name -> "module:Class" (imported lazily); classes registered at run time are added by register_scalarizer.
_REGISTRY: NameRegistry[Scalarizer] = NameRegistry(
    "scalarizer",
    Scalarizer,
    "hf_jd.scalarization.Scalarizer",
    __package__ or "hf_jd.scalarization",
    {
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
    },
)


def scalarizer_names() -> tuple[str, ...]:
    """The names accepted by :func:`get_scalarizer` and by ``--scalarizer``."""
    return _REGISTRY.names()


def scalarizer_class(name: str) -> type[Scalarizer]:
    """Return the class registered under ``name`` (case-insensitive, ``-`` and ``_`` alike)."""
    return _REGISTRY.get_class(name)


def get_scalarizer(name: str, **kwargs: Any) -> Scalarizer:
    """Build the scalarizer registered under ``name`` with keyword arguments ``kwargs``.

    Example: ``get_scalarizer("uncertainty_weighting", shape=3)``. Wrong or missing arguments raise a
    ``ValueError`` that shows the class's signature; invalid values raise the class's own clear error.
    """
    return _REGISTRY.build(name, **kwargs)


def register_scalarizer(name: str, cls: type[Scalarizer]) -> None:
    """Make a custom scalarizer class available as ``--scalarizer name``."""
    _REGISTRY.register(name, cls)
