"""Aggregators and weightings for Jacobian descent.

An :class:`Aggregator` maps a Jacobian ``J`` (one row per objective) to an update vector. Most are
:class:`GramianWeightedAggregator`: a :class:`Weighting` of the Gramian ``J Jᵀ`` followed by
``Jᵀ w``, which lets the Gramian engine and the distributed path avoid holding ``J``.

Each method declares an :class:`AggregatorSpec` next to its class (:func:`aggregator_spec`); the name
registry, ``hf-jd aggregators`` and the README tables (``python -m hf_jd.aggregation --write README.md``)
are generated from the specs (:func:`aggregator_specs`).
"""

from ._aggregator_bases import Aggregator, GramianWeightedAggregator, WeightedAggregator
from ._aligned_mtl import AlignedMTL, AlignedMTLWeighting
from ._cagrad import CAGrad, CAGradWeighting
from ._config import ConFIG, ConFIGWeighting
from ._constant import Constant, ConstantWeighting
from ._cr_mogm import CRMOGM, CRMOGMWeighting
from ._db_mtl import DBMTL
from ._dual_cone import project_weights, solver_names
from ._dualproj import DualProj, DualProjWeighting
from ._excess_mtl import ExcessMTL, ExcessMTLWeighting
from ._fairgrad import FairGrad, FairGradWeighting
from ._graddrop import GradDrop
from ._gradnorm import GradNorm, GradNormWeighting
from ._gradvac import GradVac, GradVacWeighting
from ._imtl import IMTL, IMTLWeighting
from ._imtl_g import IMTLG, IMTLGWeighting
from ._krum import Krum, KrumWeighting
from ._mean import Mean, MeanWeighting
from ._mgda import MGDA, MGDAWeighting
from ._moco import MoCo
from ._modo import MoDo, MoDoWeighting
from ._nash_mtl import NashMTL, NashMTLWeighting
from ._pcd import PCD, PCDWeighting
from ._pcgrad import PCGrad, PCGradWeighting
from ._random import Random, RandomWeighting
from ._registry import (
    aggregator_class,
    aggregator_names,
    aggregator_specs,
    get_aggregator,
    needs_jacobian,
    register_aggregator,
)
from ._sdmgrad import SDMGrad, SDMGradWeighting
from ._spec import AggregatorSpec, Paper, aggregator_spec
from ._stateful import LossAware, Stateful
from ._sum import Sum, SumWeighting
from ._tables import markdown_table
from ._trimmed_mean import TrimmedMean
from ._upgrad import UPGrad, UPGradWeighting
from ._weighting_bases import Weighting

__all__ = [
    "IMTLG",
    "MGDA",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "ConFIG",
    "ConFIGWeighting",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "FairGrad",
    "FairGradWeighting",
    "GradDrop",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "Mean",
    "MeanWeighting",
    "MGDAWeighting",
    "NashMTL",
    "NashMTLWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "Weighting",
    "aggregator_class",
    "aggregator_names",
    "get_aggregator",
    "needs_jacobian",
    "project_weights",
    "register_aggregator",
    "solver_names",
    "CRMOGM",
    "CRMOGMWeighting",
    "DBMTL",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "GradNorm",
    "GradNormWeighting",
    "IMTL",
    "IMTLWeighting",
    "MoCo",
    "MoDo",
    "MoDoWeighting",
    "PCD",
    "PCDWeighting",
    "SDMGrad",
    "SDMGradWeighting",
    "Stateful",
    "WeightedAggregator",
    "AggregatorSpec",
    "LossAware",
    "Paper",
    "aggregator_spec",
    "aggregator_specs",
    "markdown_table",
]
