"""Shared helpers of the ``hf_jd.trl`` configs and trainers.

TRL's trainers rebuild arguments of a foreign class as their own config (``SFTTrainer`` runs
``SFTConfig(**args.to_dict())``), which drops every field TRL does not know: the JD settings of a plain
:class:`hf_jd.JDTrainingArguments` would vanish and the run would train by plain gradient descent. A JD
TRL config therefore subclasses both dataclasses::

    @dataclass(repr=False)  # a regenerated __repr__ would print hub_token in clear
    class JDSFTConfig(SFTConfig, JDTrainingArguments):
        _VALID_DICT_FIELDS = merged_dict_fields(SFTConfig, JDTrainingArguments)
        __repr__ = masked_repr

and its trainer calls :func:`require_config` before TRL sees the arguments. ``repr=False`` alone is not
enough: TRL's configs are ``@dataclass`` with the generated ``__repr__``, which prints ``hub_token`` in clear
and comes first in the bases; :data:`masked_repr` is ``TrainingArguments``' own, which masks every
``*_token`` field.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from transformers import TrainingArguments

from ..training_args import JDTrainingArguments

Config = TypeVar("Config", bound=JDTrainingArguments)

#: ``TrainingArguments.__repr__``: the arguments with every ``*_token`` field masked (``<HUB_TOKEN>``).
masked_repr = TrainingArguments.__repr__


def merged_dict_fields(*classes: type) -> list[str]:
    """The ``_VALID_DICT_FIELDS`` of every class, in order, each once: the fields that
    ``TrainingArguments.__post_init__`` parses from JSON strings, for a config subclassing all of them."""
    names: list[str] = []
    for klass in classes:
        names.extend(getattr(klass, "_VALID_DICT_FIELDS", []))
    return list(dict.fromkeys(names))


def require_config(trainer_name: str, args: Any, config_class: type, trl_class: type) -> None:
    """Raise a ``TypeError`` naming ``config_class`` unless ``args`` is both a ``trl_class`` and a
    :class:`hf_jd.JDTrainingArguments` (``config_class`` is the combined config of ``hf_jd.trl``).

    Plain ``JDTrainingArguments`` would be rebuilt by TRL as its own config without the JD settings; a plain
    TRL config (or ``TrainingArguments``) has no JD settings at all. Both are refused before TRL sees them.
    """
    if isinstance(args, config_class) or (
        isinstance(args, trl_class) and isinstance(args, JDTrainingArguments)
    ):
        return
    given = type(args).__name__
    if isinstance(args, JDTrainingArguments):
        why = (
            f"TRL rebuilds arguments that are not a {trl_class.__name__} from their to_dict(), which drops the "
            "Jacobian-descent settings (aggregator, jd_*): the run would train by plain gradient descent"
        )
    elif isinstance(args, trl_class):
        why = f"a plain {trl_class.__name__} has no Jacobian-descent settings (aggregator, jd_engine, ...)"
    else:
        why = f"{given} has neither TRL's settings nor the Jacobian-descent ones"
    raise TypeError(
        f"{trainer_name} needs hf_jd.trl.{config_class.__name__} (TRL's {trl_class.__name__} and "
        f"hf_jd.JDTrainingArguments in one config); got {given}: {why}. Replace {given}(...) by "
        f"{config_class.__name__}(...) with the same arguments (from hf_jd.trl import {config_class.__name__})."
    )


def default_config(config_class: type[Config], model: Any, suffix: str) -> Config:
    """The config a TRL trainer builds when ``args`` is ``None`` (``output_dir="<model name>-<suffix>"``),
    as a ``config_class``."""
    if isinstance(model, str):
        name = model
    else:
        config = getattr(model, "config", None)
        name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    return config_class(output_dir=f"{name.rstrip('/').split('/')[-1]}-{suffix}")


def check_local_scope(trainer: Any, what: str) -> None:
    """Several processes with ``jd_scope="global"`` on the per-task route would average objective ``k`` of
    every rank as if it were one objective, though ranks hold different ones (``what``: sequences, pairs).
    Refused; ``jd_scope="local"`` (each rank aggregates its own objectives, the updates are averaged) is
    exact."""
    processes = trainer.accelerator.num_processes
    if processes > 1 and trainer.args.jd_scope == "global":
        raise ValueError(
            f"{type(trainer).__name__} on {processes} processes with jd_scope='global': the {what} reach the "
            f"engines through the per-task route, which would merge the k-th of every rank into one objective. "
            "Set jd_scope='local' (each rank aggregates its own objectives; the updates are averaged)."
        )


@contextmanager
def instance_attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.<name>`` is ``value`` inside the block; what it was (an instance value or none) is restored."""
    had_own = name in vars(owner)
    own = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, own)
        else:
            delattr(owner, name)


class MetricsOnce:
    """TRL's trainers record their training metrics (and add to ``num_tokens``) on every forward; a forward run
    again for the same micro-batch (``jd_engine="auto"`` falling back, a float64 Gramian) first takes back what
    the earlier run of that micro-batch recorded, so that the logs count each micro-batch once."""

    def __init__(self) -> None:
        self._mark: tuple[weakref.ref[Any], int, dict[str, int]] | None = None

    def before_forward(self, trainer: Any) -> None:
        """Call before each forward of the JD step (``trainer._jd_micro_batch`` is the micro-batch)."""
        micro_batch = trainer._jd_micro_batch
        if micro_batch is None:
            return
        metrics = trainer._metrics["train"]
        mark = self._mark
        if mark is not None and mark[0]() is micro_batch:
            trainer._total_train_tokens = mark[1]
            for key, values in metrics.items():
                del values[mark[2].get(key, 0) :]
            return
        lengths = {key: len(values) for key, values in metrics.items()}
        self._mark = (weakref.ref(micro_batch), trainer._total_train_tokens, lengths)
