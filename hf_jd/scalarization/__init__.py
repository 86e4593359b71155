"""Scalarizers: a loss vector (one loss per objective) → one scalar loss, then ONE ordinary backward.

The baselines that Jacobian descent is compared against, with TorchJD's ``torchjd.scalarization`` names
where it has them. Fixed: :class:`Mean`, :class:`Sum`, :class:`Constant`, :class:`GeometricMean`,
:class:`STCH`, :class:`PBI`, :class:`COSMOS`; random: :class:`Random` (RLW, seeded, checkpointed);
stateful with a per-epoch hook: :class:`DWA`; learned through the optimizer: :class:`UncertaintyWeighting`
(alias ``UW``), :class:`IMTLL`; updated after each optimizer step: :class:`FAMO`.

>>> import torch
>>> from hf_jd.scalarization import Mean
>>> Mean()(torch.tensor([1.0, 2.0, 3.0]))
tensor(2.)
"""

from ._base import Scalarizer
from ._dwa import DWA
from ._famo import FAMO
from ._geometric_mean import GeometricMean
from ._learned_scales import IMTLL, UW, UncertaintyWeighting
from ._linear import Constant, Mean, Sum
from ._preference import COSMOS, PBI, STCH
from ._random import Random
from ._registry import get_scalarizer, register_scalarizer, scalarizer_class, scalarizer_names

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "STCH",
    "UW",
    "Constant",
    "GeometricMean",
    "Mean",
    "Random",
    "Scalarizer",
    "Sum",
    "UncertaintyWeighting",
    "get_scalarizer",
    "register_scalarizer",
    "scalarizer_class",
    "scalarizer_names",
]
