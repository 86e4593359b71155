"""TODO(rewire): the FSDP2 names ``JDTrainer`` imported before the backend seam; they live in
:mod:`hf_jd.trainer._backends._fsdp2` now. Remove this module once the trainer calls ``select_backend``."""

from __future__ import annotations

from ..aggregation import Aggregator
from ..training_args import JDTrainingArguments
from ._backends import Fsdp2Backend, accelerate_fsdp_version, uses_fsdp2
from ._backends import fsdp2_engine_choices as fsdp_engine_choices

__all__ = ["accelerate_fsdp_version", "check_fsdp", "fsdp_engine_choices", "uses_fsdp2"]


def check_fsdp(args: JDTrainingArguments, aggregator: Aggregator | None) -> None:
    """TODO(rewire): ``Fsdp2Backend().check(args, aggregator)``."""
    Fsdp2Backend().check(args, aggregator)
