"""Name registry behind ``--aggregator``: maps CLI names to aggregator classes, generated from the specs.

Every class of this package decorated with :func:`~hf_jd.aggregation._spec.aggregator_spec` is found
here (the package's modules are scanned once, on first use), so adding an aggregator is its module
and its test: no list to extend. Classes registered at run time are added by
:func:`register_aggregator`.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from .._name_registry import NameRegistry
from ._aggregator_bases import Aggregator, GramianWeightedAggregator
from ._spec import AggregatorSpec, spec_of

_PACKAGE = __package__ or "hf_jd.aggregation"
# The default of ``--aggregator``: listed first, the others by name.
_DEFAULT = "upgrad"


@cache
def aggregator_specs() -> tuple[AggregatorSpec, ...]:
    """The spec of every built-in aggregator: ``upgrad`` (the default) first, then by name.

    Found by importing every module of ``hf_jd.aggregation`` (the package imports them all anyway)
    and taking the classes that declare a spec.
    """
    package = importlib.import_module(_PACKAGE)
    specs: dict[str, AggregatorSpec] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("__"):  # __main__ runs a command
            continue
        module = importlib.import_module(f"{_PACKAGE}.{info.name}")
        for value in vars(module).values():
            spec = spec_of(value) if isinstance(value, type) and value.__module__ == module.__name__ else None
            if spec is None:
                continue
            if spec.name in specs and specs[spec.name].cls is not spec.cls:
                raise TypeError(
                    f"Two aggregators are named {spec.name!r}: {specs[spec.name].path} and {spec.path}."
                )
            specs[spec.name] = spec
    return tuple(sorted(specs.values(), key=lambda spec: (spec.name != _DEFAULT, spec.name)))


class _SpecRegistry(NameRegistry[Aggregator]):
    """The name registry whose built-in entries are the specs' classes, read on first use (the method
    modules import this module, so the specs cannot be read while it is imported)."""

    _loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        registered = dict(self._entries)  # run-time registrations come after the built-in names
        self._entries.clear()  # in place: the dict object stays the same
        self._entries.update({spec.name: spec.cls for spec in aggregator_specs() if spec.cls is not None})
        self._entries.update(registered)

    def names(self) -> tuple[str, ...]:
        self._load()
        return super().names()

    def get_class(self, name: str) -> type[Aggregator]:
        self._load()
        return super().get_class(name)

    def register(self, name: str, cls: type[Aggregator]) -> None:
        self._load()
        super().register(name, cls)


_REGISTRY: NameRegistry[Aggregator] = _SpecRegistry(
    "aggregator", Aggregator, "hf_jd.aggregation.Aggregator", _PACKAGE, {}
)


def aggregator_names() -> tuple[str, ...]:
    """The names accepted by :func:`get_aggregator` and by ``--aggregator``."""
    return _REGISTRY.names()


def aggregator_class(name: str) -> type[Aggregator]:
    """Return the class registered under ``name`` (case-insensitive, ``-`` and ``_`` alike)."""
    return _REGISTRY.get_class(name)


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Build the aggregator registered under ``name`` with keyword arguments ``kwargs``.

    Example: ``get_aggregator("upgrad", pref_vector=[1, 2])``. Wrong or missing arguments raise a
    ``ValueError`` that shows the class's signature.
    """
    return _REGISTRY.build(name, **kwargs)


def needs_jacobian(aggregator: Aggregator) -> bool:
    """True when ``aggregator`` needs the explicit Jacobian (it is not Gramian-weighted)."""
    return not isinstance(aggregator, GramianWeightedAggregator)


def register_aggregator(name: str, cls: type[Aggregator]) -> None:
    """Make a custom aggregator class available as ``--aggregator name``."""
    _REGISTRY.register(name, cls)
