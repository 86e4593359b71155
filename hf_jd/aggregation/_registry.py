"""Name registry behind ``--aggregator``: maps CLI names to aggregator classes."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ._aggregator_bases import Aggregator, GramianWeightedAggregator

# name -> "module:Class" (imported lazily) or a class registered at run time.
_REGISTRY: dict[str, str | type[Aggregator]] = {
    "upgrad": "._upgrad:UPGrad",
    "dualproj": "._dualproj:DualProj",
    "mgda": "._mgda:MGDA",
    "pcgrad": "._pcgrad:PCGrad",
    "imtl_g": "._imtl_g:IMTLG",
    "mean": "._mean:Mean",
    "sum": "._sum:Sum",
    "constant": "._constant:Constant",
    "random": "._random:Random",
    "trimmed_mean": "._trimmed_mean:TrimmedMean",
    "cagrad": "._cagrad:CAGrad",
    "config": "._config:ConFIG",
    "aligned_mtl": "._aligned_mtl:AlignedMTL",
    "gradvac": "._gradvac:GradVac",
    "krum": "._krum:Krum",
    "graddrop": "._graddrop:GradDrop",
    "nash_mtl": "._nash_mtl:NashMTL",
    "fairgrad": "._fairgrad:FairGrad",
    "db_mtl": "._db_mtl:DBMTL",
    "gradnorm": "._gradnorm:GradNorm",
    "excess_mtl": "._excess_mtl:ExcessMTL",
    "moco": "._moco:MoCo",
    "modo": "._modo:MoDo",
    "sdmgrad": "._sdmgrad:SDMGrad",
    "cr_mogm": "._cr_mogm:CRMOGM",
    "pcd": "._pcd:PCD",
    "imtl": "._imtl:IMTL",
}


def aggregator_names() -> tuple[str, ...]:
    """The names accepted by :func:`get_aggregator` and by ``--aggregator``."""
    return tuple(_REGISTRY)


def aggregator_class(name: str) -> type[Aggregator]:
    """Return the class registered under ``name`` (case-insensitive)."""
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"Unknown aggregator {name!r}. Valid aggregators: {', '.join(aggregator_names())}.")
    entry = _REGISTRY[key]
    if isinstance(entry, str):
        module_name, class_name = entry.split(":")
        entry = getattr(importlib.import_module(module_name, __package__), class_name)
        _REGISTRY[key] = entry
    return entry


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Build the aggregator registered under ``name`` with keyword arguments ``kwargs``.

    Example: ``get_aggregator("upgrad", pref_vector=[1, 2])``.
    """
    cls = aggregator_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise ValueError(
            f"Invalid aggregator_kwargs for {name!r}: {error}. "
            f"{cls.__name__} accepts {inspect.signature(cls)}."
        ) from None
    return cls(**kwargs)


def needs_jacobian(aggregator: Aggregator) -> bool:
    """True when ``aggregator`` needs the explicit Jacobian (it is not Gramian-weighted)."""
    return not isinstance(aggregator, GramianWeightedAggregator)


def register_aggregator(name: str, cls: type[Aggregator]) -> None:
    """Make a custom aggregator class available as ``--aggregator name``."""
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise TypeError(f"{cls!r} is not a subclass of hf_jd.aggregation.Aggregator.")
    _REGISTRY[name.strip().lower()] = cls
