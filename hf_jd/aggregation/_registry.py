"""Name registry behind ``--aggregator``: maps CLI names to aggregator classes."""

from __future__ import annotations

from typing import Any

from .._name_registry import NameRegistry
from ._aggregator_bases import Aggregator, GramianWeightedAggregator

# name -> "module:Class" (imported lazily); classes registered at run time are added by register_aggregator.
_REGISTRY: NameRegistry[Aggregator] = NameRegistry(
    "aggregator",
    Aggregator,
    "hf_jd.aggregation.Aggregator",
    __package__ or "hf_jd.aggregation",
    {
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
    },
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
