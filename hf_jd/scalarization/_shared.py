"""The helpers this package shares with :mod:`hf_jd.aggregation` (one definition each).

Argument checks (clear errors naming the argument) and the checkpointed seeded generator are defined
once, in aggregation's private modules; this is the only module of ``hf_jd.scalarization`` that
imports them (``tests/test_layering.py`` lists these two imports as known exceptions).
"""

from __future__ import annotations

from ..aggregation._seeded import SeededGenerator
from ..aggregation._validation import (
    ArgumentTypeError,
    as_weight_vector,
    check_integer,
    check_non_negative_number,
    check_positive_number,
)

__all__ = [
    "ArgumentTypeError",
    "SeededGenerator",
    "as_weight_vector",
    "check_integer",
    "check_non_negative_number",
    "check_positive_number",
]
